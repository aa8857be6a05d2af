"""The transmit-limited broadcast queue (memberlist queue.go).

Updates ride on pings, acks and gossip rounds.  Each is sent at most
retransmit_mult * ceil(log10(N + 1)) times -- enough, by SWIM's epidemic
argument, to reach every member with high probability -- and the least-sent
go first, so a fresh update is never starved by old ones.  A newer update about
a member replaces any queued older one: only the latest state is worth sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter


@dataclass
class _Item:
    key: str
    payload: bytes
    transmits: int
    order: int
    #: -len(payload) and -order, so that the sort key is a C attrgetter, not a lambda.
    neg_len: int = 0
    neg_order: int = 0


_PRIORITY = attrgetter("transmits", "neg_len", "neg_order")


class BroadcastQueue:
    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, payload: bytes) -> None:
        """Queue an encoded message; it invalidates any queued one with the same key."""
        self._order += 1
        self._items[key] = _Item(key, payload, 0, self._order, -len(payload), -self._order)

    def pending(self, key: str) -> bool:
        return key in self._items

    def reset(self) -> None:
        self._items.clear()

    def get(self, budget: int, limit: int, per_item_overhead: int = 0) -> list[bytes]:
        """Take as many updates as fit in ``budget`` bytes, least-transmitted first.

        Ties go to the longest and then the newest, as memberlist's btree
        ordering does.  Each taken update counts one transmit; one that reaches
        ``limit`` transmits leaves the queue.
        """
        if budget <= 0 or not self._items:
            return []
        ordered = sorted(self._items.values(), key=_PRIORITY)
        out: list[bytes] = []
        used = 0
        for item in ordered:
            cost = len(item.payload) + per_item_overhead
            if used + cost > budget:
                continue
            used += cost
            out.append(item.payload)
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
        return out
