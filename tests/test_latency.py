"""Latency in the membership state machine: RTT samples from acks, Vivaldi coordinates on the wire.

Two or three real :class:`Membership` machines exchange their packets by hand
with a chosen one-way delay, so every RTT sample is known exactly.
"""

from __future__ import annotations

import random

import pytest

from gossip.config import LOCAL
from gossip.coordinate import Coordinate
from gossip.latency import Latency
from gossip.member import Member, Status
from gossip.swim import Membership, SendPacket
from gossip.table import MemberTable
from gossip.wire import (
    Ack,
    Address,
    Alive,
    DecodeError,
    PushPull,
    decode_packet,
    decode_stream,
    encode_packet,
    encode_stream,
)


def A(name: str) -> Address:
    return (f"{name}.test", 7946)


def make(name: str, peers: list[str]) -> Membership:
    m = Membership(name, A(name), LOCAL, rng=random.Random(name))
    for p in peers:
        m.receive(0.0, A("z"), encode_packet([Alive(p, 0, A(p))]))
    m.drain()
    return m


def run(machines: dict[str, Membership], until: float, one_way: dict[frozenset[str], float]) -> None:
    """Deliver every datagram after its link's one-way delay, ticking each machine at its deadlines."""
    now = 0.0
    in_flight: list[tuple[float, str, str, bytes]] = []  # (arrival, src, dst, payload)
    while now < until:
        for name, m in machines.items():
            effects, _ = m.drain()
            for eff in effects:
                if isinstance(eff, SendPacket):
                    dst = eff.addr[0].removesuffix(".test")
                    if dst in machines:
                        delay = one_way[frozenset((name, dst))]
                        in_flight.append((now + delay, name, dst, eff.payload))
        in_flight.sort()
        deadlines = [m.next_deadline() for m in machines.values()]
        nxt = min([*deadlines, *(a for a, *_ in in_flight[:1]), until])
        now = max(now, nxt)
        while in_flight and in_flight[0][0] <= now:
            _, src, dst, payload = in_flight.pop(0)
            machines[dst].receive(now, A(src), payload)
        for m in machines.values():
            if m.next_deadline() <= now:
                m.tick(now)


def test_direct_acks_give_measured_rtt_and_move_coordinates() -> None:
    a, b = make("a", ["b"]), make("b", ["a"])
    run({"a": a, "b": b}, 20.0, {frozenset("ab"): 0.005})
    est = a.rtt_estimate("a", "b")
    assert est is not None and est[1] == "measured"
    assert est[0] == pytest.approx(0.010, rel=0.05)
    # Both moved away from the origin, and their coordinates agree with the RTT.
    assert a.vivaldi.coordinate != Coordinate.origin()
    cb = a.coordinate_of("b")
    assert cb is not None
    assert a.vivaldi.coordinate.distance_to(cb) == pytest.approx(0.010, rel=0.3)


def test_a_pair_never_probed_is_estimated_from_coordinates() -> None:
    # a-b and b-c links only: a learns c's coordinate from b, never probes it... but it
    # does probe c in SWIM, so ask about b<->c, which a never measures itself.
    ms = {n: make(n, [p for p in "abc" if p != n]) for n in "abc"}
    delays = {frozenset("ab"): 0.002, frozenset("bc"): 0.010, frozenset("ac"): 0.012}
    run(ms, 60.0, delays)
    a = ms["a"]
    est = a.rtt_estimate("b", "c")
    assert est is not None and est[1] == "coordinates"
    assert est[0] == pytest.approx(0.020, rel=0.35)
    measured = a.rtt_estimate("a", "c")
    assert measured is not None and measured == (pytest.approx(0.024, rel=0.05), "measured")


def test_indirect_acks_teach_nothing_about_latency() -> None:
    a = make("a", ["b", "c"])
    a.tick(5.0)
    effects, _ = a.drain()
    ping_to = [e for e in effects if isinstance(e, SendPacket)][0]
    target = ping_to.addr[0].removesuffix(".test")
    seq = decode_packet(ping_to.payload)[0].seq  # type: ignore[union-attr]
    # A relayed ack (what a ping-req helper forwards) carries no coordinate.
    a.receive(5.9, A("c" if target == "b" else "b"), encode_packet([Ack(seq, target)]))
    assert a.coordinate_of(target) is None
    assert a.vivaldi.coordinate == Coordinate.origin()


def test_a_bad_coordinate_is_dropped_and_counted() -> None:
    a = make("a", ["b"])
    a.tick(5.0)
    effects, _ = a.drain()
    ping = [e for e in effects if isinstance(e, SendPacket)][0]
    seq = decode_packet(ping.payload)[0].seq  # type: ignore[union-attr]
    nan = float("nan")
    a.receive(5.01, A("b"), encode_packet([Ack(seq, "b", (nan,) * 11)]))
    assert a.counters.drops["bad_coordinate"] == 1
    assert a.coordinate_of("b") is None
    assert a.vivaldi.coordinate.is_valid()
    # Wrong dimensionality is refused the same way.
    a.tick(20.0)
    effects, _ = a.drain()
    ping = [e for e in effects if isinstance(e, SendPacket)][0]
    seq = decode_packet(ping.payload)[0].seq  # type: ignore[union-attr]
    a.receive(20.01, A("b"), encode_packet([Ack(seq, "b", (0.001,) * 5)]))
    assert a.counters.drops["bad_coordinate"] == 2


def test_a_join_hands_the_newcomer_every_coordinate_a_periodic_push_pull_only_its_own() -> None:
    seed = make("s", ["p", "q"])
    for name in ("p", "q"):
        seed.coordinates[name] = Coordinate((0.001 * (ord(name) - 111),) + (0.0,) * 7, 0.5, 0.0, 1e-5)
    newcomer = make("n", [])
    joined = seed.handle_stream(1.0, A("n"), newcomer.push_pull_payload(True))
    assert joined is not None
    [reply] = decode_stream(joined)
    assert isinstance(reply, PushPull)
    # (The newcomer's own is there too, since one reply serves a batch of joiners: it ignores that one.)
    assert set(reply.coords) - {"n"} == {"s", "p", "q"}
    newcomer.complete_push_pull(1.0, A("s"), "join", joined)
    assert newcomer.rtt_estimate("p", "q") is not None
    periodic = seed.handle_stream(2.0, A("n"), newcomer.push_pull_payload(False))
    assert periodic is not None
    [reply] = decode_stream(periodic)
    assert isinstance(reply, PushPull) and set(reply.coords) == {"s"}


def test_coordinates_on_the_wire_round_trip_as_float32() -> None:
    coord = (0.001, -0.002, 0.0, 0.5, 1e-5, 0.0, 0.0, 0.0, 1.4, 0.0001, 1e-5)
    [ack] = decode_packet(encode_packet([Ack(1, "a", coord)]))
    assert isinstance(ack, Ack) and ack.coord == pytest.approx(coord, rel=1e-6)
    [pp] = decode_stream(encode_stream([PushPull("a", False, [], coords={"a": coord})]))
    assert isinstance(pp, PushPull) and pp.coords["a"] == pytest.approx(coord, rel=1e-6)


@pytest.mark.parametrize("bad", [b"", b"\x00\x00\x00", "text", 5, [1.0, 2.0], b"\x00" * 4 * 65])
def test_malformed_coordinates_are_decode_errors(bad: object) -> None:
    import msgpack

    packet = msgpack.packb([1, [{"t": "ack", "seq": 1, "from": "a", "c": bad}]], use_bin_type=True)
    with pytest.raises(DecodeError):
        decode_packet(packet)


def test_a_push_pull_replaces_the_senders_coordinate_and_only_fills_gaps_for_others() -> None:
    table = MemberTable(Member("a", A("a"), 0, Status.ALIVE), LOCAL, random.Random(1), 0.0)
    for name in ("b", "c"):
        table.admit(0.0, Member(name, A(name), 0, Status.ALIVE))
    lat = Latency(table)

    def at(x: float) -> tuple[float, ...]:
        return tuple(Coordinate(vec=(x,) + (0.0,) * 7, error=1.5, adjustment=0.0, height=1e-5).to_wire())

    lat.merge("b", {"b": at(0.01), "c": at(0.02), "unknown": at(0.03), "a": at(0.04)})
    assert set(lat.coordinates) == {"b", "c"}  # not ours, not a stranger's
    lat.merge("b", {"b": at(0.05), "c": at(0.06)})
    assert lat.coordinates["b"].vec[0] == pytest.approx(0.05)  # the sender's own: always the freshest
    assert lat.coordinates["c"].vec[0] == pytest.approx(0.02)  # a third party's: only where we had none
    table.forget("c")
    assert "c" not in lat.coordinates
