"""Lifeguard's dynamic suspicion timeout.

A suspicion starts at the max timeout and falls toward the min as independent
members confirm it (Lifeguard section IV-B; memberlist suspicion.go): the
timeout is max - (max - min) * log(n + 1) / log(k + 1) after n of the k
expected confirmations.  A false suspicion raised by one slow node therefore
lasts long enough to be refuted, while a real failure that many see is
declared quickly.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import ItemsView, Iterator


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


class Suspicions:
    """Every live suspicion by member, with the earliest deadline at hand.

    The deadlines are a heap with stale entries left in place (a refuted or
    confirmed suspicion's old deadline) and skipped when they reach the top:
    while a partition splits a cluster a member holds hundreds of suspicions,
    and the next deadline is asked after every packet.
    """

    def __init__(self) -> None:
        self._live: dict[str, Suspicion] = {}
        self._heap: list[tuple[float, str]] = []

    def __contains__(self, name: object) -> bool:
        return name in self._live

    def __getitem__(self, name: str) -> Suspicion:
        return self._live[name]

    def __len__(self) -> int:
        return len(self._live)

    def get(self, name: str) -> Suspicion | None:
        return self._live.get(name)

    def items(self) -> ItemsView[str, Suspicion]:
        return self._live.items()

    def start(self, name: str, sus: Suspicion) -> None:
        self._live[name] = sus
        heapq.heappush(self._heap, (sus.deadline, name))

    def confirm(self, name: str, source: str) -> bool:
        """Count ``source``'s confirmation of the suspicion of ``name``; True if it was new."""
        sus = self._live[name]
        if not sus.confirm(source):
            return False
        heapq.heappush(self._heap, (sus.deadline, name))  # it moved earlier
        return True

    def discard(self, name: str) -> None:
        """End the suspicion of ``name``, if any (refuted, confirmed dead, or forgotten)."""
        self._live.pop(name, None)  # its heap entry goes stale

    def next_deadline(self) -> float:
        """The earliest live suspicion's deadline (inf: none); stale heap entries are discarded on the way."""
        heap, live = self._heap, self._live
        while heap:
            deadline, name = heap[0]
            sus = live.get(name)
            if sus is not None and sus.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return math.inf

    def expire(self, now: float) -> Iterator[str]:
        """End every suspicion due at ``now``, yielding the name of each in deadline order."""
        while True:
            if now < self.next_deadline():
                return
            _, name = heapq.heappop(self._heap)
            del self._live[name]
            yield name
