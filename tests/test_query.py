"""Gossip queries (gossip.swim.start_query): spread once to everyone, answered straight to the origin."""

from __future__ import annotations

import random

import msgpack
import pytest

from gossip.config import LOCAL
from gossip.swim import Event, Membership, SendPacket
from gossip.wire import (
    MAX_QUERY_PAYLOAD,
    Address,
    Alive,
    DecodeError,
    Query,
    QueryResponse,
    decode_packet,
    encode_packet,
)


def A(name: str) -> Address:
    return (f"{name}.test", 7946)


def make(name: str, peers: str) -> Membership:
    m = Membership(name, A(name), LOCAL, rng=random.Random(name))
    for p in peers:
        m.receive(0.0, A("z"), encode_packet([Alive(p, 0, A(p))]))
    m.drain()
    return m


def queries(events: list[Event]) -> list[dict[str, object]]:
    return [e.fields for e in events if e.kind == "query"]


def deliver_all(ms: dict[str, Membership], until: float) -> dict[str, list[dict[str, object]]]:
    """Run the machines with instant delivery; collect each one's query events."""
    seen: dict[str, list[dict[str, object]]] = {n: [] for n in ms}
    now = 0.0
    while now < until:
        moved = True
        while moved:
            moved = False
            for name, m in ms.items():
                effects, events = m.drain()
                seen[name] += queries(events)
                for eff in effects:
                    if isinstance(eff, SendPacket):
                        dst = eff.addr[0].removesuffix(".test")
                        if dst in ms:
                            ms[dst].receive(now, A(name), eff.payload)
                            moved = True
        now = min(m.next_deadline() for m in ms.values())
        for m in ms.values():
            if m.next_deadline() <= now:
                m.tick(now)
    return seen


def test_a_query_reaches_every_member_once_and_their_answers_come_back() -> None:
    ms = {n: make(n, "abcde".replace(n, "")) for n in "abcde"}
    qid = ms["a"].start_query(0.0, "keys", b"payload")
    seen = deliver_all(ms, 5.0)
    for name in "abcde":
        assert len(seen[name]) == 1, (name, seen[name])  # gossiped many times, run once
        q = seen[name][0]
        assert q["origin"] == "a" and q["id"] == qid and q["payload"] == b"payload" and q["name"] == "keys"
        ms[name].respond_query(5.0, "a", A("a"), qid, f"ok from {name}".encode())
    deliver_all(ms, 6.0)
    answers = ms["a"].finish_query(qid)
    assert answers == {n: f"ok from {n}".encode() for n in "abcde"}
    assert ms["a"].finish_query(qid) == {}  # finished: late answers are not kept
    assert ms["b"].counters.stats["queries"] == 1


def test_queries_from_unknown_members_are_dropped_and_answers_to_nobody_ignored() -> None:
    m = make("a", "b")
    m.receive(1.0, A("x"), encode_packet([Query(7, "stranger", A("x"), "keys", b"p")]))
    _, events = m.drain()
    assert queries(events) == [] and m.counters.drops["query_unknown_origin"] == 1
    m.receive(1.0, A("b"), encode_packet([QueryResponse(12345, "b", b"late")]))
    assert m.query_responses == {}


def test_query_payloads_are_bounded() -> None:
    m = make("a", "b")
    with pytest.raises(ValueError):
        m.start_query(0.0, "keys", b"x" * (MAX_QUERY_PAYLOAD + 1))
    big = msgpack.packb([1, [{"t": "query", "id": 1, "o": "b", "a": ["h", 1], "n": "keys",
                              "p": b"x" * (MAX_QUERY_PAYLOAD + 1)}]], use_bin_type=True)
    with pytest.raises(DecodeError):
        decode_packet(big)
    q = Query(1, "b", ("h", 1), "keys", b"\x00\xff")
    assert decode_packet(encode_packet([q, QueryResponse(1, "a", b"r")])) == [q, QueryResponse(1, "a", b"r")]
