"""Serf's queries: a cluster-wide request that spreads as gossip and is answered straight to its origin.

The query spreads as a broadcast (so it reaches members we have no direct
route to, with the same retransmit budget as any update); every member, the
origin included, sees it once as a ``query`` event and answers with
``respond``, in a datagram to the origin.
"""

from __future__ import annotations

from gossip.dissemination import Dissemination
from gossip.effects import EventKind
from gossip.table import MemberTable
from gossip.wire import MAX_QUERY_PAYLOAD, Address, Query, QueryResponse

#: How long a query is remembered (so its copies gossiped back to us are not
#: run twice) and how long its origin waits for answers at most.
QUERY_MEMORY = 120.0


class Queries:
    def __init__(self, table: MemberTable, dissemination: Dissemination) -> None:
        self.table = table
        self.dissemination = dissemination
        #: Queries seen, (origin, id) -> when to forget them.
        self._seen: dict[tuple[str, int], float] = {}
        #: Our own queries still collecting answers: id -> member -> payload.
        self.responses: dict[int, dict[str, bytes]] = {}

    def start(self, now: float, name: str, payload: bytes) -> int:
        """Ask every member to run ``name`` with ``payload``; returns the query id."""
        if len(payload) > MAX_QUERY_PAYLOAD:
            raise ValueError(f"query payload over {MAX_QUERY_PAYLOAD} bytes")
        qid = self.table.next_seq()
        self.responses[qid] = {}
        self.on_query(now, Query(qid, self.table.name, self.table.addr, name, payload))
        return qid

    def respond(self, origin: str, origin_addr: Address, qid: int, payload: bytes) -> None:
        if origin == self.table.name:
            answers = self.responses.get(qid)
            if answers is not None:
                answers[origin] = payload
            return
        self.dissemination.send(origin_addr, [QueryResponse(qid, self.table.name, payload)])

    def finish(self, qid: int) -> dict[str, bytes]:
        return self.responses.pop(qid, {})

    def on_query(self, now: float, q: Query) -> None:
        key = (q.origin, q.id)
        if key in self._seen:
            return
        origin = self.table.members.get(q.origin)
        if origin is None or not origin.status.up:
            self.table.drop("query_unknown_origin")
            return
        self._seen[key] = now + QUERY_MEMORY
        self.dissemination.broadcast(f"query:{q.origin}:{q.id}", q)
        self.table.counters.stats["queries"] += 1
        self.table.event(EventKind.QUERY, origin=q.origin, origin_addr=q.origin_addr, id=q.id, name=q.name,
                         payload=q.payload)

    def on_response(self, now: float, src: Address, msg: QueryResponse) -> None:
        answers = self.responses.get(msg.id)
        if answers is not None and msg.source in self.table.members:
            answers[msg.source] = msg.payload

    def prune(self, now: float) -> None:
        """Forget queries older than QUERY_MEMORY."""
        self._seen = {k: t for k, t in self._seen.items() if t > now}
