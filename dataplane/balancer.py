"""Which instance of a service gets the next proxied connection.

Pure state machine, like :mod:`dataplane.mux`: no I/O, no clock, no event loop.
Every method takes ``now`` (seconds, from whatever monotonic clock the caller
uses) and all randomness comes from the ``random.Random`` handed in, so a test
or a simulation replays exactly.

Why peak-EWMA with power of two choices by default: round robin and least
connections know nothing about latency, so a slow instance keeps getting its
share; scanning every instance for the cheapest one makes every proxy stampede
onto the same one.  Two random candidates compared on expected latency times
load avoids both (Mitzenmacher's P2C as used by Finagle and Linkerd), and the
*peak* EWMA reacts to a latency spike at once but forgets it only slowly.

Locality.  The mesh spans nodes at very different distances, and the issue asks
to "prefer the lowest-RTT instances when they have capacity; spill over when
they are saturated or failing".  The rule, applied before the policy:

* The *local tier* is every candidate whose RTT estimate is within
  ``max(local_factor * min_rtt, min_rtt + local_slack)`` of the lowest RTT
  among the candidates (defaults 2x and 10 ms: on a LAN everything within ten
  milliseconds is "here" -- RTT samples taken by busy agents jitter by a few,
  and a 2 ms band sent all traffic to one instance under load; across
  regions, within twice the nearest).
  A candidate without an RTT estimate is not in the tier: we prefer what we
  have measured.  If no candidate has an estimate, every candidate is in it.
* The policy chooses among the tier members that have capacity (fewer than
  ``spill_outstanding`` outstanding connections).  Only when none has capacity
  does it choose among all candidates (counted as ``stats["spill_over"]``).
* Failing instances are not this module's business: the outlier detector
  (:mod:`dataplane.outlier`) removes them before the balancer sees them, so a
  tier that empties by ejection spills over by construction.

Suspects last.  A candidate whose node gossip suspects (``Candidate.suspect``)
is chosen only when every other usable candidate is gone (counted as
``stats["suspect_passed_over"]`` when set aside, ``stats["suspect_only"]`` when
only suspects are left).  A suspect has stopped answering probes: most often it
has died and will be declared so in a few probe rounds, and a connection sent
there meanwhile waits out a dial to a host that is gone.  But a suspicion may
be false (a slow or lossy peer refutes it), so its instances stay listed and
beat routing nowhere; the proxy's retries reach them after the others failed.

API
---
``Balancer(policy, rng, *, decay_time=10.0, default_rtt=0.030, failure_penalty=1.0,
local_factor=2.0, local_slack=0.010, spill_outstanding=64, prefer_local=True)``

* ``pick(now, candidates) -> key | None`` -- None only for an empty list.
* ``started(now, key)`` -- a connection to ``key`` is being attempted/opened.
* ``observe(now, key, latency, ok)`` -- a connect finished (feeds the EWMA only).
* ``finished(now, key, latency=None, ok=True)`` -- the connection is gone;
  with a latency or ``ok=False`` it also observes, for callers that report
  the connect outcome and the end of the connection in one call.
* ``forget(key)``; ``outstanding(key)``; ``ewma(now, key)``; ``stats``.

Weights in [0, 1] come from slow start (:class:`dataplane.outlier.OutlierDetector`).
A weight of 0 removes a candidate, unless every candidate has weight 0, in
which case all are used as if equal (Envoy's "panic" idea: routing somewhere
beats routing nowhere).  Values outside [0, 1] are clamped.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

__all__ = [
    "DEFAULT_DECAY_TIME",
    "DEFAULT_FAILURE_PENALTY",
    "DEFAULT_POLICY",
    "DEFAULT_RTT",
    "POLICIES",
    "SAMPLE_WEIGHT_FLOOR",
    "Balancer",
    "Candidate",
    "PeakEwma",
]

K = TypeVar("K", bound=Hashable)

#: Linkerd's EWMA_DECAY (linkerd2-proxy): a spike is mostly forgotten after ~10 s.
DEFAULT_DECAY_TIME: Final = 10.0
#: Linkerd's EWMA_DEFAULT_RTT (30 ms): the estimate for an instance never measured
#: and with no network RTT known either.
DEFAULT_RTT: Final = 0.030
#: A failed connect is observed as a connect that took this long (at least).
DEFAULT_FAILURE_PENALTY: Final = 1.0
#: Costs are floored here so that outstanding connections always count, even for
#: an instance whose estimate is 0 (Finagle charges `Penalty + pending` in that case).
_MIN_ESTIMATE: Final = 1e-6
#: The least weight a lower sample has, however soon it follows the one before.  Finagle weighs a
#: sample by the time since the last (``1 - exp(-elapsed / decay_time)``), which suits one sample per
#: connection; per request, samples come a millisecond apart and weigh 1e-4 each, so the estimate is
#: the largest spike of the last ten seconds whatever came after it.  With the floor, five ordinary
#: samples take most of a spike away: a peak is still taken at once, and an instance that stays slow
#: stays expensive, since its samples stay high.
SAMPLE_WEIGHT_FLOOR: Final = 0.2

DEFAULT_POLICY: Final = "p2c_peak_ewma"
POLICIES: Final = frozenset({"p2c_peak_ewma", "round_robin", "least_connections"})


class PeakEwma:
    """Finagle's peak-EWMA latency estimate (finagle PeakEwma.scala; tower peak_ewma.rs).

    A sample above the current estimate replaces it at once, so one slow connect
    makes an instance unattractive immediately; a lower sample only pulls the
    estimate down with weight ``1 - exp(-elapsed / decay_time)``, so recovery is
    cautious.  Observations are unevenly spaced, hence the weight depends on the
    time since the previous one rather than being a constant alpha.

    Between observations the estimate decays toward zero, as Finagle's ``get()``
    (which observes 0) and tower's ``decay()`` do: an instance that was slow once
    and therefore gets no traffic must eventually look cheap enough to be tried
    again, or it would be shunned forever on stale evidence.  Reading does not
    change the state, so the result does not depend on how often it is read.

    Before the first observation the estimate is a *prior*.  If the caller passes
    the network RTT to the instance (a fresh measurement each time) that is it,
    as is.  Otherwise it is ``default`` decayed from ``born`` (when the instance
    was first seen) like an old observation, as tower does: a guess must not
    keep an instance that nobody has measured out of use forever.
    """

    __slots__ = ("decay_time", "default", "_value", "_stamp", "_observed")

    def __init__(
        self, decay_time: float = DEFAULT_DECAY_TIME, default: float = DEFAULT_RTT, born: float = 0.0
    ) -> None:
        if not decay_time > 0:
            raise ValueError("decay_time must be > 0")
        self.decay_time = decay_time
        self.default = default
        self._value = max(default, 0.0)
        self._stamp = born
        self._observed = False

    @property
    def observed(self) -> bool:
        return self._observed

    def _decay(self, now: float) -> float:
        """exp(-elapsed / tau); a clock that steps back counts as no time (as Finagle)."""
        return math.exp(-max(now - self._stamp, 0.0) / self.decay_time)

    def value(self, now: float, prior: float | None = None) -> float:
        if not self._observed and prior is not None:
            return max(prior, 0.0)
        return self._value * self._decay(now)

    def observe(self, now: float, sample: float) -> None:
        # (Once per request in http mode: comparisons rather than max() calls, and _decay inline.)
        if not sample > 0.0:
            if math.isnan(sample):
                return
            sample = 0.0
        if not self._observed:
            # The first measurement replaces the prior outright.
            self._value, self._stamp, self._observed = sample, now, True
            return
        elapsed = now - self._stamp
        w = math.exp(-elapsed / self.decay_time) if elapsed > 0.0 else 1.0  # a clock stepping back: no time
        current = self._value * w
        if sample > current:
            self._value = sample  # peak: take it at once
        else:
            # Finagle: cost * w + rtt * (1 - w), where cost * w is the decayed estimate; the sample's
            # weight is floored (see SAMPLE_WEIGHT_FLOOR).
            a = 1.0 - w
            if a < SAMPLE_WEIGHT_FLOOR:
                a = SAMPLE_WEIGHT_FLOOR
            self._value = self._value * (1.0 - a) + sample * a
        if now > self._stamp:
            self._stamp = now

    def cost(self, now: float, outstanding: int, prior: float | None = None) -> float:
        """Expected latency of one more connection: estimate * (outstanding + 1) (Finagle).

        ``value`` and ``_decay`` inline, comparisons for max(): a P2C pick asks this twice."""
        if not self._observed and prior is not None:
            v = max(prior, 0.0)
        else:
            elapsed = now - self._stamp
            v = self._value * math.exp(-elapsed / self.decay_time) if elapsed > 0.0 else self._value
        return max(v, _MIN_ESTIMATE) * (outstanding + 1 if outstanding > 0 else 1)


@dataclass(slots=True)
class Candidate(Generic[K]):
    """One instance the caller is willing to use now.

    ``rtt``: the network RTT estimate in seconds (latency probes), or None.
    ``weight``: slow-start weight in [0, 1]; 1 for an instance in full service.
    ``suspect``: its node is suspected by gossip: chosen only when nothing else is left.
    """

    key: K
    rtt: float | None = None
    weight: float = 1.0
    suspect: bool = False


class _Instance:
    __slots__ = ("ewma", "outstanding", "rtt", "credit")

    def __init__(self, ewma: PeakEwma, credit: float) -> None:
        self.ewma = ewma
        self.outstanding = 0
        self.rtt: float | None = None
        #: Smooth weighted round robin credit (unused by the other policies).
        self.credit = credit


class Balancer(Generic[K]):
    """Per-service choice of instance; one Balancer per upstream service."""

    def __init__(
        self,
        policy: str,
        rng: random.Random,
        *,
        decay_time: float = DEFAULT_DECAY_TIME,
        default_rtt: float = DEFAULT_RTT,
        failure_penalty: float = DEFAULT_FAILURE_PENALTY,
        local_factor: float = 2.0,
        local_slack: float = 0.010,
        spill_outstanding: int = 64,
        prefer_local: bool = True,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown balancing policy {policy!r}; expected one of {sorted(POLICIES)}")
        if spill_outstanding < 1:
            raise ValueError("spill_outstanding must be >= 1")
        self.policy = policy
        self.rng = rng
        self.decay_time = decay_time
        self.default_rtt = default_rtt
        self.failure_penalty = failure_penalty
        self.local_factor = local_factor
        self.local_slack = local_slack
        self.spill_outstanding = spill_outstanding
        self.prefer_local = prefer_local
        self.stats: Counter[str] = Counter()
        self._instances: dict[K, _Instance] = {}

    # -- state -------------------------------------------------------------

    def _get(self, now: float, key: K) -> _Instance:
        inst = self._instances.get(key)
        if inst is None:
            # A random starting credit desynchronises round robin across proxies
            # (Envoy seeds each load balancer for the same reason), without
            # changing the rotation itself.
            inst = _Instance(PeakEwma(self.decay_time, self.default_rtt, now), self.rng.random())
            self._instances[key] = inst
        return inst

    def outstanding(self, key: K) -> int:
        inst = self._instances.get(key)
        return inst.outstanding if inst is not None else 0

    def ewma(self, now: float, key: K) -> float | None:
        """The latency estimate used for ``key`` (its prior if never observed); None if unknown."""
        inst = self._instances.get(key)
        if inst is None:
            return None
        return inst.ewma.value(now, inst.rtt)

    def forget(self, key: K) -> None:
        """Drop all state for an instance that left the catalog.

        A later ``finished`` for one of its connections is ignored; if the key
        comes back meanwhile, such a late ``finished`` decrements the new
        count, which is clamped at zero.
        """
        self._instances.pop(key, None)

    def started(self, now: float, key: K) -> None:
        inst = self._instances.get(key)
        (inst if inst is not None else self._get(now, key)).outstanding += 1

    def observe(self, now: float, key: K, latency: float | None, ok: bool) -> None:
        """Feed a connect outcome to the estimate, leaving the outstanding count alone.

        A failure is observed as at least ``failure_penalty`` seconds: a refused
        connect is *fast*, and a latency-seeking balancer would otherwise pour
        traffic into the instance that fails quickest.  (Finagle leaves failures
        to failure accrual; here the outlier detector ejects only after several,
        and the penalty steers away from the first one on.)
        """
        inst = self._instances.get(key)
        if inst is None:
            return
        if ok:
            if latency is not None:
                inst.ewma.observe(now, latency)
        else:
            inst.ewma.observe(now, max(latency if latency is not None else 0.0, self.failure_penalty))

    def finished(self, now: float, key: K, latency: float | None = None, ok: bool = True) -> None:
        """The connection counted by ``started`` is over (closed, or never opened).

        ``latency``/``ok``, if given, are observed as by :meth:`observe`;
        ``latency=None, ok=True`` only decrements.
        """
        inst = self._instances.get(key)
        if inst is None:
            return
        if inst.outstanding > 0:
            inst.outstanding -= 1
        if latency is not None or not ok:
            self.observe(now, key, latency, ok)

    # -- choice ------------------------------------------------------------

    def pick(self, now: float, candidates: Sequence[Candidate[K]]) -> K | None:
        if not candidates:
            return None
        if len(candidates) == 1:  # what the general way below comes to for one, without its lists
            only = candidates[0]
            if only.suspect:
                self.stats["suspect_only"] += 1
            if only.rtt is not None:  # (a lone candidate's RTT compares with nothing: callers may skip it)
                self._get(now, only.key).rtt = only.rtt
            elif only.key not in self._instances:
                self._get(now, only.key)
            return only.key
        trusted = [c for c in candidates if not c.suspect]
        if trusted and len(trusted) < len(candidates):
            self.stats["suspect_passed_over"] += 1
            candidates = trusted
        elif not trusted:
            self.stats["suspect_only"] += 1
        usable = [(c, c.weight if c.weight < 1.0 else 1.0) for c in candidates if c.weight > 0.0]  # (NaN: not)
        if not usable:
            usable = [(c, 1.0) for c in candidates]
        instances = self._instances
        for c, _ in usable:
            inst = instances.get(c.key)
            if inst is None:
                inst = self._get(now, c.key)
            inst.rtt = c.rtt
        if len(usable) == 1:  # its own tier, whatever its load: what _local_pool would leave
            return usable[0][0].key
        pool = self._local_pool(usable) if self.prefer_local else usable
        if len(pool) == 1:
            return pool[0][0].key
        if self.policy == "round_robin":
            return self._round_robin(pool)
        if self.policy == "least_connections":
            return self._least_connections(pool)
        return self._p2c(now, pool)

    def _local_pool(self, usable: list[tuple[Candidate[K], float]]) -> list[tuple[Candidate[K], float]]:
        rtts = [c.rtt for c, _ in usable if c.rtt is not None and not math.isnan(c.rtt)]
        if not rtts:
            tier = usable
        else:
            lo = max(min(rtts), 0.0)
            bound = max(self.local_factor * lo, lo + self.local_slack)
            tier = [(c, w) for c, w in usable if c.rtt is not None and c.rtt <= bound]
        with_room = [(c, w) for c, w in tier if self._instances[c.key].outstanding < self.spill_outstanding]
        if with_room:
            return with_room
        if len(tier) < len(usable):
            self.stats["spill_over"] += 1
        return usable

    def _p2c(self, now: float, pool: list[tuple[Candidate[K], float]]) -> K:
        # Power of two choices (Mitzenmacher; Finagle P2CPeakEwma): two distinct
        # random candidates, the lower cost wins.  A slow-start weight scales
        # the cost up, so a warming instance wins proportionally less often.
        #
        # The pair's choice is random, weighted by the inverse of cost (a 2x
        # cheaper instance wins 2/3 of the time, a 10x cheaper one 10/11), not
        # "the lower one wins": latency samples of equally fast instances
        # jitter by more than their differences, and a peak-EWMA holds a spike
        # until later samples wear it down, so a strict comparison gives a
        # one-at-a-time client's requests 2/3 to whichever instance looks
        # fastest just now and none to the one last seen slow, which then gets
        # no sample to recover with.  Not by the inverse square either: an
        # instance whose cost one stall made 10x would win 1/101 of its pairs,
        # too few samples to wear the stall off.
        # A real difference still decides: a failing instance (observed at 1 s)
        # loses to a 1 ms one a thousand times to one, and the outlier detector
        # ejects it after a few.
        n = len(pool)
        i = int(self.rng.random() * n)
        j = int(self.rng.random() * (n - 1))
        a, b = pool[i], pool[j + 1 if j >= i else j]  # two distinct, every pair as likely (random.sample's cost, less)
        instances = self._instances
        ia, ib = instances[a[0].key], instances[b[0].key]
        ca = ia.ewma.cost(now, ia.outstanding, a[0].rtt) / a[1]  # (_cost's, without its call)
        cb = ib.ewma.cost(now, ib.outstanding, b[0].rtt) / b[1]
        wa, wb = cb, ca
        return a[0].key if self.rng.random() * (wa + wb) < wa else b[0].key

    def _round_robin(self, pool: list[tuple[Candidate[K], float]]) -> K:
        # Smooth weighted round robin (nginx): every candidate earns its weight,
        # the richest is chosen and pays the total.  Equal weights give a plain
        # rotation; unequal ones interleave in proportion to weight, which is
        # what Envoy's EDF scheduler does with slow-start weights.
        total = 0.0
        best: _Instance | None = None
        best_key = pool[0][0].key
        for c, w in pool:
            inst = self._instances[c.key]
            inst.credit += w
            total += w
            if best is None or inst.credit > best.credit:
                best, best_key = inst, c.key
        assert best is not None
        best.credit -= total
        return best_key

    def _least_connections(self, pool: list[tuple[Candidate[K], float]]) -> K:
        weights = [w for _, w in pool]
        if all(w == weights[0] for w in weights):
            fewest = min(self._instances[c.key].outstanding for c, _ in pool)
            tied = [c.key for c, _ in pool if self._instances[c.key].outstanding == fewest]
            return tied[0] if len(tied) == 1 else self.rng.choice(tied)
        # Unequal weights: Envoy's least-request switches to a weighted choice on
        # weight / (active + 1) ** bias (bias 1.0); here sampled at random.
        effective = [w / (self._instances[c.key].outstanding + 1) for c, w in pool]
        return self.rng.choices([c.key for c, _ in pool], weights=effective)[0]
