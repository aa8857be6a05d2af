"""A retry budget: retries never multiply an outage.

Per-request retry limits alone let a failing service see up to (1 + retries)
times its normal load exactly when it can least take it.  Finagle's and
Linkerd's answer is a budget shared by all requests of a client: retries may
add at most ``ratio`` of the requests made recently, plus a small floor per
second so a service with little traffic can still retry at all.  Linkerd's
defaults: ratio 0.2, 10 retries a second, over a 10 s window.

Kept as counts in one-second buckets over the window (no per-request list),
so memory and cost stay constant whatever the rate.  Pure: callers pass
``now`` (seconds, any monotonic clock).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Linkerd's retry budget defaults (retryRatio, minRetriesPerSecond, ttl).
DEFAULT_RATIO = 0.2
DEFAULT_MIN_PER_SECOND = 10.0
DEFAULT_TTL = 10.0


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    ratio: float = DEFAULT_RATIO
    min_per_second: float = DEFAULT_MIN_PER_SECOND
    ttl: float = DEFAULT_TTL

    def __post_init__(self) -> None:
        if not (0 <= self.ratio <= 1000 and math.isfinite(self.ratio)):
            raise ValueError("retry budget ratio must be a number from 0 to 1000")
        if not (0 <= self.min_per_second <= 1_000_000 and math.isfinite(self.min_per_second)):
            raise ValueError("retry budget min_per_second must be >= 0")
        if not 1 <= self.ttl <= 3600:
            raise ValueError("retry budget ttl must be from 1 to 3600 seconds")


class RetryBudget:
    def __init__(self, config: BudgetConfig | None = None) -> None:
        self.config = config or BudgetConfig()
        self._slots = max(1, int(math.ceil(self.config.ttl)))
        self._requests = [0] * self._slots
        self._retries = [0] * self._slots
        self._second = 0
        #: Retries refused since start (the ``routes``/metrics figure).
        self.exhausted = 0

    def _advance(self, now: float) -> int:
        second = int(now)
        gap = second - self._second
        if gap > 0:
            for k in range(1, min(gap, self._slots) + 1):
                slot = (self._second + k) % self._slots
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._second = second
        return self._second % self._slots

    def request(self, now: float) -> None:
        """A first attempt was made: it earns ``ratio`` of a retry."""
        second = int(now)  # (asked per HTTP request: the common case is the same second, with no _advance)
        self._requests[self._advance(now) if second != self._second else second % self._slots] += 1

    def try_retry(self, now: float) -> bool:
        """Take one retry from the budget, or say there is none left (counted)."""
        if not self.can_retry(now):
            self.exhausted += 1
            return False
        self._retries[self._advance(now)] += 1
        return True

    def can_retry(self, now: float) -> bool:
        """Whether a retry is left now; takes none."""
        self._advance(now)
        cfg = self.config
        return sum(self._retries) + 1 <= cfg.ratio * sum(self._requests) + cfg.min_per_second * cfg.ttl
