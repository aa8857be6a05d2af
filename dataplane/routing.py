"""An upstream's routing table: which instance gets the next connection, and why.

The proxy asks a :class:`Router` (one per upstream) for an instance, reports
how each attempt went, and shows the router's view as ``routes``.  The router
joins three pieces, each with its own state machine and tests:

* the passing instances, from the registry through the read-only directory;
* :mod:`dataplane.outlier`: instances that keep failing are ejected, tried
  once (half-open) when their time is up, and ramp back in slow start;
* :mod:`dataplane.balancer`: among the instances left, P2C over peak-EWMA
  latency times load (or round robin / least connections), preferring the
  nearest by estimated RTT (Vivaldi coordinates or measured probes).

What a connection teaches the balancer and the outlier detector: the time
from the start of the attempt to the first byte back from the instance (what
the caller waits for: network, both agents, and the instance's own response
time) is its latency sample, and that first byte is its success.  An L4 proxy
sees no requests, so the first reply of each connection is all it has.  A
connect is not a success: an instance that accepts and then resets, or closes
before a byte of answer while the client is still sending, is failing, as
Envoy counts a connection that ends before the response as a locally
originated failure; it is reported through :meth:`Router.closed` with the
reason, observed as a failure (the balancer's penalty, not a fast sample) and
counted towards ejection.  Without a reply there is no latency sample; a
connection that still ends cleanly after the client's end (an instance that
only takes data) is no failure, and one the client resets teaches nothing.

Refusals are policy, not health.  The agent that hosts an instance decides by
its intentions, for the (source, destination) pair, before it connects the
instance; so a refusal is the answer of that whole *agent*, for every
instance of the service on it, and it is not a fast answer: it says nothing
about latency.  The router remembers the node as refusing this upstream's
source, offers its instances only when nothing else is left (the answer
costs one round trip and no instance), and asks it again on one connection
every ``base_ejection_time``, since intentions are not gossiped and a policy
can change; an allowed connection clears the mark.

Limits (Envoy's circuit-breaker thresholds): at most ``max_connections`` open
and ``max_pending`` connects in flight per upstream; past either, a new client
is refused at once and counted, never queued without bound.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, get_args

from dataplane.balancer import DEFAULT_POLICY, POLICIES, Balancer, Candidate
from dataplane.outlier import OutlierConfig, OutlierDetector, State

#: Envoy's defaults for both thresholds.
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_PENDING = 1024

Key = tuple[str, str]  # (node, instance id)


@dataclass(frozen=True)
class RoutingOptions:
    lb: str = DEFAULT_POLICY
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending: int = DEFAULT_MAX_PENDING
    outlier: OutlierConfig = field(default_factory=OutlierConfig)

    def __post_init__(self) -> None:
        if self.lb not in POLICIES:
            raise ValueError(f"unknown load-balancing policy {self.lb!r}: use {', '.join(sorted(POLICIES))}")
        if self.max_connections < 1 or self.max_pending < 1:
            raise ValueError("max_connections and max_pending must be at least 1")


class Instance(Protocol):
    """What the router needs of an endpoint (dataplane.proxy.Endpoint)."""

    @property
    def node(self) -> str: ...

    @property
    def instance_id(self) -> str: ...


class PathView(Protocol):
    """Latency and paths, read from membership and the tunnels (agent.directory)."""

    def rtt_to(self, node: str) -> tuple[float, str] | None:
        """Estimated RTT to a member in seconds, and its source ("measured" or "coordinates")."""
        ...

    def path_to(self, node: str) -> list[str]:
        """Member names from this node to ``node``, both ends included."""
        ...


#: Why a connection to an instance failed, as ``routes`` shows it (``last_failure``).
CONNECT_FAILED = "connect_failed"
TIMEOUT = "timeout"
RESET_BEFORE_REPLY = "reset_before_reply"
CLOSED_BEFORE_REPLY = "closed_before_reply"
#: HTTP only: a response head that did not parse, and a 5xx answer.
BAD_RESPONSE = "bad_response"
HTTP_5XX = "http_5xx"
#: HTTP only: the instance's connection broke, or ended, after the answer's head and before its end.
ANSWER_CUT_OFF = "answer_cut_off"
#: The counter each pick adds to, by the state of the instance it chose (made once, not per pick).
_PICKED: Final[dict[State, str]] = {state: f"picked.{state}" for state in get_args(State)}


@dataclass(slots=True)
class Attempt:
    """One connection the router handed out; report its life through the router."""

    key: Key
    started: float
    connected: bool = False
    observed: bool = False
    open: bool = True
    #: An HTTP answer's head said it went well: the outlier detector hears so once the answer ends whole.
    answer_pending: bool = False


@dataclass
class _Refusal:
    """A node whose intentions refused this upstream's source."""

    since: float
    #: From then on one connection may ask the node again.
    recheck_at: float
    #: When the outstanding recheck began, or None.
    asking: float | None = None


class Router:
    def __init__(self, service: str, options: RoutingOptions | None = None,
                 rng: random.Random | None = None) -> None:
        self.service = service
        self.options = options or RoutingOptions()
        self.balancer: Balancer[Key] = Balancer(self.options.lb, rng or random.Random())
        self.outlier: OutlierDetector[Key] = OutlierDetector(self.options.outlier)
        self.stats: Counter[str] = Counter()
        self.open = 0
        self.pending = 0
        self._known: set[Key] = set()
        #: The list sync() last saw: the directory hands out the same list until something changes.
        self._synced: object = None
        #: Nodes that refused this upstream's source, by node name.
        self._refused: dict[str, _Refusal] = {}
        #: The latest failure per instance: (reason, when).
        self._last_failure: dict[Key, tuple[str, float]] = {}
        #: The outlier state of the instance the last pick chose, as it chose it.
        self.picked_state: State = "active"

    # -- admission (circuit-breaker thresholds) ------------------------------------------

    def admit(self) -> str | None:
        """None if a new client may be served now; else the counted reason it is refused."""
        refused = self.refusal()
        if refused is not None:
            self.stats[f"overflow_{refused}"] += 1
        return refused

    def refusal(self) -> str | None:
        """The limit a new client would exceed now, if any (``admit`` counts it)."""
        if self.open >= self.options.max_connections:
            return "max_connections"
        if self.pending >= self.options.max_pending:
            return "max_pending"
        return None

    # -- choice ---------------------------------------------------------------------

    def sync(self, now: float, endpoints: Sequence[Instance]) -> None:
        """Follow the catalog: forget instances that left; slow-start ones that join a running upstream."""
        if endpoints is self._synced:
            return
        self._synced = endpoints
        keys = {(e.node, e.instance_id) for e in endpoints}
        if keys == self._known:
            return
        if self._known:
            for key in keys - self._known:
                self.outlier.joined(now, key)
        for key in self._known - keys:
            # An instance that failed its health check keeps its ejection history
            # in the detector only while listed; the balancer forgets its load.
            self.balancer.forget(key)
            self.outlier.forget(key)
            self._last_failure.pop(key, None)
        nodes = {node for node, _ in keys}
        for node in set(self._refused) - nodes:
            del self._refused[node]
        self._known = keys

    def pick(self, now: float, endpoints: Sequence[Instance], exclude: frozenset[Key],
             rtt_of: Callable[[str], float | None], last_resort: bool = True) -> Instance | None:
        """An instance for the next attempt, or None.

        Instances on nodes known to refuse are left out while any other is
        available, except one connection per node every recheck interval;
        with ``last_resort`` they are offered when nothing else is left.
        """
        self.sync(now, endpoints)
        by_key: dict[Key, Instance] = {}
        allowing: list[Candidate[Key]] = []
        refusing: list[Candidate[Key]] = []
        offer, refused = self.outlier.offer, self._refused
        lone = len(endpoints) == 1  # its RTT compares with nothing (the balancer takes it as it is)
        for e in endpoints:
            key = (e.node, e.instance_id)
            weight = None if key in exclude else offer(now, key)
            if weight is None:
                continue
            by_key[key] = e
            suspect = bool(getattr(e, "suspect", False))  # dataplane.proxy.Endpoint's; others have none
            candidate = Candidate(key, None if lone else rtt_of(e.node), weight, suspect)
            refusal = refused.get(e.node)
            (allowing if refusal is None or self._due(now, refusal) else refusing).append(candidate)
        candidates = allowing or (refusing if last_resort else [])
        if not candidates:
            if endpoints and not exclude and not refusing:
                self.stats["all_ejected"] += 1
            return None
        chosen = self.balancer.pick(now, candidates)
        if chosen is None:
            return None
        self.outlier.trial_started(now, chosen)
        refusal = self._refused.get(chosen[0])
        if refusal is not None:
            refusal.asking = now
            self.stats["refusal_rechecks" if allowing else "refused_last_resort"] += 1
        state = self.picked_state = self.outlier.state(now, chosen)
        self.stats[_PICKED[state]] += 1
        return by_key[chosen]

    def refuses(self, node: str) -> bool:
        """Whether ``node``'s intentions are known to refuse this upstream's source."""
        return node in self._refused

    def _recheck_interval(self) -> float:
        # A refusal is set aside as long as an ejection starts out: asking again
        # costs one round trip to the refusing agent and no instance anything.
        return self.options.outlier.base_ejection_time

    def _due(self, now: float, r: _Refusal) -> bool:
        if now < r.recheck_at:
            return False
        return r.asking is None or now - r.asking >= self._recheck_interval()

    # -- outcomes -------------------------------------------------------------------

    def attempt(self, now: float, key: Key) -> Attempt:
        self.balancer.started(now, key)
        self.pending += 1
        return Attempt(key, now)

    def failed(self, now: float, a: Attempt, instance_fault: bool = True, reason: str = CONNECT_FAILED) -> None:
        """The attempt was not connected.  ``instance_fault`` False: the client left or the task was
        cancelled, which says nothing about the instance."""
        if not a.open:
            return
        a.open = False
        self.pending -= 1
        refusal = self._refused.get(a.key[0])
        if refusal is not None:
            refusal.asking = None  # no answer to the recheck: the next connection may ask
        if instance_fault:
            self._failure(now, a, reason)
        else:
            self.balancer.finished(now, a.key)

    def denied(self, now: float, a: Attempt) -> None:
        """The instance's agent refused this upstream's source: remember the node, not a latency."""
        if not a.open:
            return
        a.open = False
        self.pending -= 1
        self.balancer.finished(now, a.key)
        node = a.key[0]
        refusal = self._refused.get(node)
        if refusal is None:
            self._refused[node] = _Refusal(now, now + self._recheck_interval())
            self.stats["refusals"] += 1
        else:
            refusal.recheck_at, refusal.asking = now + self._recheck_interval(), None
            self.stats["refusals_again"] += 1

    def connected(self, now: float, a: Attempt) -> None:
        """The instance is connected: its agent allows this source; health waits for the reply."""
        a.connected = True
        self.pending -= 1
        self.open += 1
        if self._refused.pop(a.key[0], None) is not None:
            self.stats["refusals_lifted"] += 1

    def first_reply(self, now: float, a: Attempt) -> None:
        if not a.observed and a.open:
            a.observed = True
            self.balancer.observe(now, a.key, now - a.started, ok=True)
            self.outlier.on_success(now, a.key)

    def answered(self, now: float, a: Attempt, ok: bool) -> None:
        """An HTTP response head (per request, in ``http`` mode): its latency is the sample, and a 5xx
        is a failure towards ejection, as Envoy's ``consecutive_5xx`` counts it (connect failures and
        resets count there too, so gateway failures, 502-504 and those, are a subset of it and need
        no counter of their own while both thresholds are equal, as they are by default)."""
        if a.observed or not a.open:
            return
        a.observed = True
        self.balancer.observe(now, a.key, now - a.started, ok=ok)
        if ok:
            # Counted at its end (closed): an instance that cuts every answer off after its head
            # would otherwise count a success per request, and never be ejected.
            a.answer_pending = True
        else:
            self._instance_failed(now, a.key, HTTP_5XX)
            self.stats["http_5xx"] += 1

    def closed(self, now: float, a: Attempt, failure: str | None = None, clean: bool = False) -> None:
        """The connection is over.

        ``failure``: the instance reset or closed it before its first reply byte
        (RESET_BEFORE_REPLY, CLOSED_BEFORE_REPLY), counted against it; ignored once
        it has replied, except after an HTTP answer's good head (``answered``),
        which ``failure`` says was cut off before its end.  Otherwise, with no reply, ``clean`` (both directions
        ended without error) is a success for the outlier detector -- an
        instance that takes data and never answers (a sink) is not failing --
        and anything else, the client's reset or an idle timeout, teaches
        nothing.  Without a reply there is no latency sample either: a short
        one would make the instance look fast for a connection it never served.
        """
        if not a.open:
            return
        if failure is not None and a.connected and not a.observed:
            a.open = False
            self.open -= 1
            self._failure(now, a, failure)
            return
        a.open = False
        if a.answer_pending:
            # An HTTP answer whose head was fine (answered): whole, it is a success; broken off after
            # its head, a gateway failure (Envoy's consecutive_gateway_failure counts it so too).
            if clean:
                self.outlier.on_success(now, a.key)
            elif failure is not None:
                self._instance_failed(now, a.key, failure)
                self.stats["answers_cut_off"] += 1
        if a.connected:
            self.open -= 1
            if clean and not a.observed:
                self.outlier.on_success(now, a.key)
        else:
            self.pending -= 1
        self.balancer.finished(now, a.key)

    def _instance_failed(self, now: float, key: Key, reason: str) -> None:
        """A failure towards ejection, and the last one ``routes`` shows for the instance."""
        self.outlier.on_failure(now, key, max(1, len(self._known)))
        self._last_failure[key] = (reason, now)

    def _failure(self, now: float, a: Attempt, reason: str) -> None:
        self.balancer.finished(now, a.key, now - a.started, ok=False)
        self._instance_failed(now, a.key, reason)
        self.stats["connect_failures" if not a.connected else "failures_before_reply"] += 1

    # -- the view -------------------------------------------------------------------

    def view(self, now: float, endpoints: Sequence[Instance], paths: PathView,
             local_node: str) -> list[dict[str, Any]]:
        """One row per instance: the contract's routes fields plus the balancer's inputs."""
        self.sync(now, endpoints)
        rows = []
        for e in endpoints:
            key = (e.node, e.instance_id)
            rtt = (0.0, "local") if e.node == local_node else paths.rtt_to(e.node)
            state = self.outlier.state(now, key)
            ewma = self.balancer.ewma(now, key)
            until = self.outlier.ejected_until(key)
            last = self._last_failure.get(key)
            refusal = self._refused.get(e.node)
            rows.append({
                "service": self.service,
                "instance": e.instance_id,
                "node": e.node,
                "path": paths.path_to(e.node),
                "rtt_ms": None if rtt is None else round(rtt[0] * 1000.0, 3),
                "rtt_source": None if rtt is None else rtt[1],
                "weight": round(self.outlier.weight(now, key), 3) if state != "half-open" else 0.0,
                # The contract's three states; half-open (one trial allowed) shows as ejected.
                "state": "ejected" if state in ("ejected", "half-open") else state,
                "half_open": state == "half-open",
                "ejected_for_s": None if until is None else round(max(0.0, until - now), 1),
                "outstanding": self.balancer.outstanding(key),
                "latency_ms": None if ewma is None else round(ewma * 1000.0, 3),
                "policy": self.options.lb,
                # Its node is suspected by gossip: chosen only when no other instance is left.
                "suspect": bool(getattr(e, "suspect", False)),
                # This node's intentions refuse the upstream's source: not routed to while
                # another instance is left, asked again from time to time.
                "refused": refusal is not None,
                "refused_for_s": None if refusal is None else round(max(0.0, now - refusal.since), 1),
                # The latest failure of a connection to it, whatever its state now.
                "last_failure": None if last is None else last[0],
                "last_failure_ago_s": None if last is None else round(max(0.0, now - last[1]), 1),
            })
        return rows
