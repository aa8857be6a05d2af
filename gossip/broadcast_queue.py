"""The transmit-limited broadcast queue (memberlist queue.go).

Updates ride on pings, acks and gossip rounds.  Each is sent at most
retransmit_mult * ceil(log10(N + 1)) times -- enough, by SWIM's epidemic
argument, to reach every member with high probability -- and the least-sent
go first, so a fresh update is never starved by old ones.  A newer update about
a member replaces any queued older one in place: only the latest state is worth
sending.

Two lessons memberlist and Serf learned at ten thousand nodes:

* The queue is bounded relative to the cluster (Serf's queue depth:
  ``max(min_depth, 2 * N)``); past it the least valuable updates -- lowest
  priority, most transmitted, oldest -- are dropped, and every drop is counted
  (``dropped``) for the agent to log.  An unbounded queue under churn grows
  without end and each packet's sort gets slower.
* Alive messages (joins, refutations) go ahead of everything else
  (``PRIORITY_ALIVE``): a refutation stuck behind a backlog of other updates
  arrives after its suspicion timed out, and a member is declared dead for
  nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

#: Priority classes: lower goes first.
PRIORITY_ALIVE = 0
PRIORITY_OTHER = 1
#: Serf's MinQueueDepth: the bound never goes below this.
DEFAULT_MIN_DEPTH = 4096


@dataclass
class _Item:
    key: str
    payload: bytes
    transmits: int
    order: int
    prio: int = PRIORITY_OTHER
    #: -len(payload) and -order, so that the sort key is a C attrgetter, not a lambda.
    neg_len: int = 0
    neg_order: int = 0


_PRIORITY = attrgetter("prio", "transmits", "neg_len", "neg_order")


class BroadcastQueue:
    def __init__(self, min_depth: int = DEFAULT_MIN_DEPTH) -> None:
        self._items: dict[str, _Item] = {}
        self._order = 0
        self.min_depth = min_depth
        self.max_depth = min_depth
        #: Updates dropped because the queue was full, ever.
        self.dropped = 0

    def set_cluster_size(self, n_members: int) -> None:
        self.max_depth = max(self.min_depth, 2 * n_members)

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, key: str, payload: bytes, priority: int = PRIORITY_OTHER) -> None:
        """Queue an encoded message; it invalidates any queued one with the same key."""
        self._order += 1
        self._items[key] = _Item(key, payload, 0, self._order, prio=priority, neg_len=-len(payload),
                                 neg_order=-self._order)
        if len(self._items) > self.max_depth:
            self._prune()

    def _prune(self) -> None:
        # Down to 90% of the bound, so a burst pays for one sort per tenth of it.
        keep = max(1, self.max_depth * 9 // 10)
        excess = len(self._items) - keep
        ranked = sorted(self._items.values(),
                        key=lambda i: (-i.prio, -i.transmits, i.order))
        for item in ranked[:excess]:
            del self._items[item.key]
        self.dropped += excess

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
