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

import bisect

#: Priority classes: lower goes first.
PRIORITY_ALIVE = 0
PRIORITY_OTHER = 1
#: Serf's MinQueueDepth: the bound never goes below this.
DEFAULT_MIN_DEPTH = 4096

#: A queued update's place in the order: (priority, transmits, -len, -order, key).
#: Lowest first: alive before the rest, then least transmitted, then longest,
#: then newest (memberlist's btree ordering).  ``order`` is unique, so the key
#: never takes part in a comparison.
_Entry = tuple[int, int, int, int, str]
_INF = float("inf")
#: Up to this many queued updates, get() walks the list instead of searching it.
_WALK_BELOW = 48


class BroadcastQueue:
    """The queue, kept sorted in one list, so that taking a datagram's worth of
    updates costs a binary search per update taken, as memberlist's btree walk
    does, not a sort of the whole queue: while a partition splits a cluster of
    1,000 a member holds hundreds of updates, and every packet it sends asks."""

    def __init__(self, min_depth: int = DEFAULT_MIN_DEPTH) -> None:
        self._sorted: list[_Entry] = []
        #: key -> (its entry in _sorted, payload)
        self._items: dict[str, tuple[_Entry, bytes]] = {}
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
        old = self._items.get(key)
        if old is not None:
            self._remove(old[0])
        self._order += 1
        entry = (priority, 0, -len(payload), -self._order, key)
        bisect.insort(self._sorted, entry)
        self._items[key] = (entry, payload)
        if len(self._items) > self.max_depth:
            self._prune()

    def _remove(self, entry: _Entry) -> None:
        i = bisect.bisect_left(self._sorted, entry)
        del self._sorted[i]

    def _prune(self) -> None:
        # Down to 90% of the bound, so a burst pays for one sort per tenth of it.
        # Dropped first: lowest priority, then most transmitted, then oldest.
        keep = max(1, self.max_depth * 9 // 10)
        excess = len(self._items) - keep
        ranked = sorted(self._sorted, key=lambda e: (-e[0], -e[1], -e[3]))
        for entry in ranked[:excess]:
            del self._items[entry[4]]
        self._sorted = [e for e in self._sorted if e[4] in self._items]
        self.dropped += excess

    def discard(self, key: str) -> None:
        """Forget the queued message with this key, if any."""
        old = self._items.pop(key, None)
        if old is not None:
            self._remove(old[0])

    def pending(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> list[str]:
        return list(self._items)

    def reset(self) -> None:
        self._items.clear()
        self._sorted.clear()

    def get(self, budget: int, limit: int, per_item_overhead: int = 0) -> list[bytes]:
        """Take as many updates as fit in ``budget`` bytes, in the queue's order.

        The result is what walking the whole order and taking every update
        that still fits would give: within one (priority, transmits) tier the
        entries run longest first, so the first that fits ``free`` bytes is
        found by binary search, and after it only shorter ones can fit.  Each
        taken update counts one transmit; one that reaches ``limit`` transmits
        leaves the queue.
        """
        lst = self._sorted
        if budget <= 0 or not lst:
            return []
        out: list[bytes] = []
        taken: list[_Entry] = []
        items = self._items
        free = budget - per_item_overhead  # the longest payload that still fits
        if len(lst) <= _WALK_BELOW:
            # A short queue (the usual case): walking it in order is cheapest.
            rest = []
            for entry in lst:
                payload = items[entry[4]][1]
                if len(payload) <= free:
                    taken.append(entry)
                    out.append(payload)
                    free -= len(payload) + per_item_overhead
                else:
                    rest.append(entry)
            if not taken:
                return out
            lst[:] = rest
        else:
            i = 0
            while i < len(lst) and free >= 0:
                prio, transmits = lst[i][0], lst[i][1]
                # The first entry of this tier whose payload fits (-len >= -free).
                i = bisect.bisect_left(lst, (prio, transmits, -free, -_INF), i)
                if i < len(lst) and lst[i][0] == prio and lst[i][1] == transmits:
                    entry = lst.pop(i)  # taken out, so it is not found again in this call
                    taken.append(entry)
                    payload = items[entry[4]][1]
                    out.append(payload)
                    free -= len(payload) + per_item_overhead
                    continue
                # Nothing more fits in this tier: on to the next.
                i = bisect.bisect_left(lst, (prio, transmits + 1, -_INF, -_INF), i)
        for prio, transmits, neg_len, neg_order, key in taken:
            if transmits + 1 >= limit:
                del items[key]
            else:
                entry = (prio, transmits + 1, neg_len, neg_order, key)
                bisect.insort(lst, entry)
                items[key] = (entry, items[key][1])
        return out
