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

What a connection teaches the balancer: the time from the start of the
attempt to the first byte back from the instance (what the caller waits for:
network, both agents, and the instance's own response time), or the connect
time when it closes without a reply.  An L4 proxy sees no requests, so the
first reply of each connection is its latency sample.

Limits (Envoy's circuit-breaker thresholds): at most ``max_connections`` open
and ``max_pending`` connects in flight per upstream; past either, a new client
is refused at once and counted, never queued without bound.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dataplane.balancer import DEFAULT_POLICY, POLICIES, Balancer, Candidate
from dataplane.outlier import OutlierConfig, OutlierDetector

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


@dataclass
class Attempt:
    """One connection the router handed out; report its life through the router."""

    key: Key
    started: float
    connected: bool = False
    observed: bool = False
    open: bool = True


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

    # -- admission (circuit-breaker thresholds) ------------------------------------------

    def admit(self) -> str | None:
        """None if a new client may be served now; else the counted reason it is refused."""
        if self.open >= self.options.max_connections:
            self.stats["overflow_max_connections"] += 1
            return "max_connections"
        if self.pending >= self.options.max_pending:
            self.stats["overflow_max_pending"] += 1
            return "max_pending"
        return None

    # -- choice ---------------------------------------------------------------------

    def sync(self, now: float, endpoints: Sequence[Instance]) -> None:
        """Follow the catalog: forget instances that left; slow-start ones that join a running upstream."""
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
        self._known = keys

    def pick(self, now: float, endpoints: Sequence[Instance], exclude: frozenset[Key],
             rtt_of: Callable[[str], float | None]) -> Instance | None:
        self.sync(now, endpoints)
        by_key: dict[Key, Instance] = {}
        candidates: list[Candidate[Key]] = []
        for e in endpoints:
            key = (e.node, e.instance_id)
            if key in exclude or not self.outlier.available(now, key):
                continue
            by_key[key] = e
            candidates.append(Candidate(key, rtt_of(e.node), self.outlier.weight(now, key)))
        if not candidates:
            if endpoints and not exclude:
                self.stats["all_ejected"] += 1
            return None
        chosen = self.balancer.pick(now, candidates)
        if chosen is None:
            return None
        self.outlier.trial_started(now, chosen)
        self.stats[f"picked.{self.outlier.state(now, chosen)}"] += 1
        return by_key[chosen]

    # -- outcomes -------------------------------------------------------------------

    def attempt(self, now: float, key: Key) -> Attempt:
        self.balancer.started(now, key)
        self.pending += 1
        return Attempt(key, now)

    def failed(self, now: float, a: Attempt, instance_fault: bool = True) -> None:
        """The attempt reached no instance.  ``instance_fault`` False: a denial, not the instance's doing."""
        if not a.open:
            return
        a.open = False
        self.pending -= 1
        if instance_fault:
            self.balancer.finished(now, a.key, now - a.started, ok=False)
            self.outlier.on_failure(now, a.key, max(1, len(self._known)))
            self.stats["connect_failures"] += 1
        else:
            self.balancer.finished(now, a.key)

    def connected(self, now: float, a: Attempt) -> None:
        a.connected = True
        self.pending -= 1
        self.open += 1
        self.outlier.on_success(now, a.key)

    def first_reply(self, now: float, a: Attempt) -> None:
        if not a.observed and a.open:
            a.observed = True
            self.balancer.observe(now, a.key, now - a.started, ok=True)

    def closed(self, now: float, a: Attempt) -> None:
        if not a.open:
            return
        a.open = False
        if a.connected:
            self.open -= 1
        else:
            self.pending -= 1
        self.balancer.finished(now, a.key, None if a.observed else now - a.started, ok=True)

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
            })
        return rows
