"""Passive health per upstream instance: outlier ejection, half-open trial, slow start.

Active probes say whether a node is alive; they do not say whether one service
instance on it serves them.  The proxy learns that from its own
connections (a connect that fails, or a connection the instance resets or
closes before its first byte of answer: dataplane.routing), so it reports
every outcome here and asks, per instance, whether to
use it and with what weight.  Pure state machine: no I/O, no clock (every call
takes ``now`` in seconds), one detector per upstream service (the
``max_ejection_percent`` cap is a fraction of that service's instances).

Life of an instance::

    active --N consecutive failures--> ejected --ejection time over--> half-open
    half-open --trial succeeds--> slow-start --window over--> active
    half-open --trial fails--> ejected (longer)

* Ejection follows Envoy's consecutive-5xx detector (outlier detection
  architecture overview; outlier_detection_impl.cc): after
  ``consecutive_failures`` failures in a row, eject for
  ``base_ejection_time * multiplier``, capped at ``max_ejection_time``.  The
  multiplier grows by one per ejection and, as in Envoy, shrinks by one for
  every ``backoff_decay_interval`` the instance then stays in service, so a host
  that flaps keeps getting longer ejections while one that failed once long ago
  starts again from the base time.
* The cap, as Envoy's ``ejectHost`` computes it today: an ejection is allowed
  only if ``100 * (ejected + 1) / total <= max_ejection_percent``.  With two
  instances and 50% one may be ejected; with one instance none may, unless
  ``always_eject_one`` (Envoy's ``always_eject_one_host``, default off; older
  Envoy docs described this as the unconditional rule).  A refusal is counted
  and, like Envoy, the consecutive count restarts, so the next run of failures
  tries again.  Half-open instances still count as ejected.
* Half-open is Finagle's failure-accrual probe rather than Envoy's return to
  full service: a host that was down for minutes gets one connection, not its
  full share, until it has shown it can take one.  While the trial is out the
  instance is unavailable; its outcome decides.  A trial whose outcome never
  arrives is abandoned after ``trial_timeout`` and another is allowed.
* Slow start is Envoy's (slow start mode, ``SlowStartConfig``):
  ``weight = max(min_weight, time_factor ** (1 / aggression))`` with
  ``time_factor = max(elapsed, 1 ms) / window``.  Failures during slow start
  count towards ejection as in active.

API
---
``OutlierDetector(config=OutlierConfig())``

* ``on_success(now, key)``, ``on_failure(now, key, total_instances)`` -- one
  connection outcome each (a timeout is a failure).
* ``available(now, key) -> bool``; ``weight(now, key) -> float`` (0 when not
  available); ``trial_started(now, key)`` after picking an instance (a no-op
  unless it is half-open, so it is safe to call on every pick).
* ``state(now, key)`` -> "active" | "ejected" | "half-open" | "slow-start";
  ``ejected_until(key)``; ``multiplier(now, key)``.
* ``joined(now, key)`` -- optional: start a newly added instance in slow start
  (Envoy slow-starts endpoints that join an existing cluster).
* ``forget(key)``; ``stats`` (Counter: ejections, ejections_refused_max_percent,
  half_open_trials, trial_failures, slow_starts, returned).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

__all__ = ["OutlierConfig", "OutlierDetector", "State"]

K = TypeVar("K", bound=Hashable)

State = Literal["active", "ejected", "half-open", "slow-start"]

#: Envoy floors the slow-start elapsed time at 1 ms so the weight is never 0.
_MIN_ELAPSED: Final = 0.001


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    #: Envoy consecutive_5xx default (5).
    consecutive_failures: int = 5
    #: Envoy base_ejection_time default (30 s).
    base_ejection_time: float = 30.0
    #: Envoy max_ejection_time default (300 s): the multiplier stops mattering here.
    max_ejection_time: float = 300.0
    #: Envoy max_ejection_percent default (50%).
    max_ejection_percent: float = 50.0
    #: Envoy always_eject_one_host (default false): allow one ejection whatever the cap.
    always_eject_one: bool = False
    #: Envoy's detection interval (10 s): each one spent in service forgives one ejection.
    backoff_decay_interval: float = 10.0
    #: Not in Envoy (no half-open there): how long a silent trial blocks the next one.
    trial_timeout: float = 30.0
    #: Envoy SlowStartConfig.slow_start_window; 0 disables slow start.
    slow_start_window: float = 30.0
    #: Envoy SlowStartConfig.min_weight_percent default 10%.
    slow_start_min_weight: float = 0.1
    #: Envoy SlowStartConfig.aggression default 1.0 (linear ramp).
    slow_start_aggression: float = 1.0

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if self.base_ejection_time <= 0 or self.max_ejection_time < self.base_ejection_time:
            # Envoy rejects max_ejection_time < base_ejection_time the same way.
            raise ValueError("need 0 < base_ejection_time <= max_ejection_time")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be within [0, 100]")
        if self.backoff_decay_interval <= 0 or self.trial_timeout <= 0:
            raise ValueError("backoff_decay_interval and trial_timeout must be > 0")
        if self.slow_start_window < 0 or not 0 < self.slow_start_min_weight <= 1:
            raise ValueError("need slow_start_window >= 0 and 0 < slow_start_min_weight <= 1")
        if not self.slow_start_aggression > 0:
            raise ValueError("slow_start_aggression must be > 0")


class _Host:
    __slots__ = ("failures", "ejected", "until", "trial_at", "slow_start_at", "backoff", "backoff_since")

    def __init__(self) -> None:
        self.failures = 0
        #: Ejected or half-open (half-open once now >= until).
        self.ejected = False
        self.until = 0.0
        #: When the outstanding half-open trial began, or None.
        self.trial_at: float | None = None
        #: Start of slow start, or None when not slow-starting.
        self.slow_start_at: float | None = None
        #: Envoy's ejectTimeBackoff as of ``backoff_since``.
        self.backoff = 0
        self.backoff_since = 0.0


class OutlierDetector(Generic[K]):
    def __init__(self, config: OutlierConfig | None = None) -> None:
        self.config = config if config is not None else OutlierConfig()
        self.stats: Counter[str] = Counter()
        self._hosts: dict[K, _Host] = {}

    # -- queries -----------------------------------------------------------

    def state(self, now: float, key: K) -> State:
        h = self._hosts.get(key)
        if h is None:
            return "active"
        if h.ejected:
            return "half-open" if now >= h.until else "ejected"
        if h.slow_start_at is not None and now - h.slow_start_at < self.config.slow_start_window:
            return "slow-start"
        return "active"

    def available(self, now: float, key: K) -> bool:
        """May the balancer be offered this instance now?"""
        h = self._hosts.get(key)
        if h is None or not h.ejected:
            return True
        if now < h.until:
            return False
        # Half-open: exactly one trial at a time.
        return h.trial_at is None or now - h.trial_at >= self.config.trial_timeout

    def offer(self, now: float, key: K) -> float | None:
        """``weight`` if the instance is ``available``, else None: the two questions a pick asks of
        every instance, answered with one look-up (the common case: no history at all)."""
        h = self._hosts.get(key)
        if h is None:
            return 1.0
        if not self.available(now, key):
            return None
        return self.weight(now, key)

    def weight(self, now: float, key: K) -> float:
        """0 when unavailable; a free half-open trial is offered at full weight
        (the one-trial gate, not the weight, limits it, and a low weight would
        postpone the only evidence that could bring the instance back)."""
        if not self.available(now, key):
            return 0.0
        if self.state(now, key) != "slow-start":
            return 1.0
        h = self._hosts[key]
        assert h.slow_start_at is not None
        cfg = self.config
        time_factor = max(now - h.slow_start_at, _MIN_ELAPSED) / cfg.slow_start_window
        ramp = time_factor if cfg.slow_start_aggression == 1.0 else time_factor ** (1.0 / cfg.slow_start_aggression)
        return min(1.0, max(cfg.slow_start_min_weight, ramp))

    def ejected_until(self, key: K) -> float | None:
        h = self._hosts.get(key)
        return h.until if h is not None and h.ejected else None

    def multiplier(self, now: float, key: K) -> int:
        """Envoy's ejection backoff: the next ejection lasts base * (this + 1), capped."""
        h = self._hosts.get(key)
        return self._backoff(now, h) if h is not None else 0

    def ejected_count(self) -> int:
        return sum(1 for h in self._hosts.values() if h.ejected)

    # -- events ------------------------------------------------------------

    def joined(self, now: float, key: K) -> None:
        h = self._host(key)
        if not h.ejected:
            self._begin_slow_start(now, h)

    def trial_started(self, now: float, key: K) -> None:
        h = self._hosts.get(key)
        if h is None or not h.ejected or not self.available(now, key):
            return
        h.trial_at = now
        self.stats["half_open_trials"] += 1

    def on_success(self, now: float, key: K) -> None:
        h = self._hosts.get(key)
        if h is None:
            return
        if h.ejected:
            if now < h.until:
                return  # a late outcome of a connection from before the ejection
            # The trial worked: back in service, gently.
            h.ejected, h.trial_at, h.failures = False, None, 0
            h.backoff_since = now
            self.stats["returned"] += 1
            self._begin_slow_start(now, h)
            return
        h.failures = 0

    def on_failure(self, now: float, key: K, total_instances: int) -> None:
        h = self._host(key)
        if h.ejected:
            if now < h.until:
                return
            # The trial failed: eject again, one step longer.  Already counted
            # as ejected, so the cap has nothing to say.
            self.stats["trial_failures"] += 1
            self._eject(now, h)
            return
        h.failures += 1
        if h.failures < self.config.consecutive_failures:
            return
        h.failures = 0  # Envoy resets the counter whether or not it ejects
        ejected = self.ejected_count()
        total = max(total_instances, ejected + 1, 1)
        allowed = 100.0 * (ejected + 1) / total <= self.config.max_ejection_percent
        if not allowed and not (self.config.always_eject_one and ejected == 0):
            self.stats["ejections_refused_max_percent"] += 1
            return
        self._eject(now, h)

    def forget(self, key: K) -> None:
        self._hosts.pop(key, None)

    # -- internals ---------------------------------------------------------

    def _host(self, key: K) -> _Host:
        h = self._hosts.get(key)
        if h is None:
            h = self._hosts[key] = _Host()
        return h

    def _backoff(self, now: float, h: _Host) -> int:
        if h.ejected or h.backoff == 0:
            return h.backoff
        # Envoy decrements once per detection interval spent in service.
        forgiven = math.floor(max(now - h.backoff_since, 0.0) / self.config.backoff_decay_interval)
        return max(h.backoff - forgiven, 0)

    def _eject(self, now: float, h: _Host) -> None:
        cfg = self.config
        backoff = self._backoff(now, h)
        # Envoy stops growing the backoff once base * backoff reaches max + base.
        if backoff * cfg.base_ejection_time < cfg.max_ejection_time + cfg.base_ejection_time:
            backoff += 1
        h.backoff = backoff
        h.ejected, h.trial_at, h.slow_start_at, h.failures = True, None, None, 0
        h.until = now + min(cfg.base_ejection_time * backoff, cfg.max_ejection_time)
        self.stats["ejections"] += 1

    def _begin_slow_start(self, now: float, h: _Host) -> None:
        if self.config.slow_start_window > 0:
            h.slow_start_at = now
            self.stats["slow_starts"] += 1
