"""Lifeguard's dynamic suspicion timeout.

A suspicion starts at the max timeout and falls toward the min as independent
members confirm it (Lifeguard section IV-B; memberlist suspicion.go): the
timeout is max - (max - min) * log(n + 1) / log(k + 1) after n of the k
expected confirmations.  A false suspicion raised by one slow node therefore
lasts long enough to be refuted, while a real failure that many see is
declared quickly.
"""

from __future__ import annotations

import math


class Suspicion:
    def __init__(self, now: float, source: str, k: int, min_timeout: float, max_timeout: float) -> None:
        self.start = now
        self.k = k
        self.min = min_timeout
        self.max = max_timeout if k >= 1 else min_timeout
        self.confirmers: set[str] = {source}
        self.deadline = now + self.max

    @property
    def confirmations(self) -> int:
        # The member that raised the suspicion is not a confirmation.
        return len(self.confirmers) - 1

    def remaining_timeout(self) -> float:
        if self.k < 1:
            return self.min
        frac = math.log(self.confirmations + 1.0) / math.log(self.k + 1.0)
        raw = self.max - frac * (self.max - self.min)
        return max(self.min, math.floor(raw * 1000.0) / 1000.0)

    def confirm(self, source: str) -> bool:
        """Count a confirmation from an independent member; True if it was new."""
        if source in self.confirmers or self.confirmations >= self.k:
            return False
        self.confirmers.add(source)
        self.deadline = self.start + self.remaining_timeout()
        return True

    def expired(self, now: float) -> bool:
        return now >= self.deadline
