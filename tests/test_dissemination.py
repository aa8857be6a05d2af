"""gossip.dissemination: whom we gossip to, and what rides on each datagram."""

from __future__ import annotations

import random

import pytest

from gossip.config import LOCAL
from gossip.dissemination import Dissemination
from gossip.effects import SendPacket
from gossip.keyring import SEAL_OVERHEAD
from gossip.member import Member, Status
from gossip.table import MemberTable
from gossip.wire import Address, Alive, Ping, decode_packet


def A(i: int) -> Address:
    return (f"10.0.{i // 250}.{i % 250 + 1}", 7946)


def cluster(n: int, seed: int = 1) -> tuple[MemberTable, Dissemination]:
    t = MemberTable(Member("m0", A(0), 0, Status.ALIVE), LOCAL, random.Random(seed), 0.0)
    for i in range(1, n):
        t.admit(0.0, Member(f"m{i}", A(i), 0, Status.ALIVE))
    return t, Dissemination(t, SEAL_OVERHEAD, 0.0)


@pytest.mark.parametrize("n", [10, 65, 500])  # exact sampling, and random probes into the name list
def test_gossip_targets_are_distinct_eligible_and_never_ourselves(n: int) -> None:
    t, d = cluster(n)
    now = 100.0
    for i in range(1, n, 3):
        t.set_status(now - LOCAL.gossip_to_the_dead - 1.0, t.members[f"m{i}"], Status.DEAD, "long ago")
    for i in range(2, n, 3):
        t.set_status(now - 0.1, t.members[f"m{i}"], Status.DEAD, "a moment ago")
    eligible = {m.name for m in d.targets(now)}
    assert "m0" not in eligible and all(int(x[1:]) % 3 != 1 for x in eligible)
    assert any(t.members[x].status is Status.DEAD for x in eligible)  # the recently dead may still refute
    for _ in range(20):
        picked = [m.name for m in d.random_targets(now, 4)]
        assert len(picked) == len(set(picked)) == min(4, len(eligible)) and set(picked) <= eligible


def test_queued_updates_ride_on_a_datagram_up_to_its_budget() -> None:
    t, d = cluster(5)
    for i in range(400):
        d.broadcast(f"x{i}", Alive(f"x{i}", 1, A(i), {"role": "web" * 5}))
    d.send(A(1), [Ping(1, "m1", "m0")])
    (effect,) = t.outbox
    assert isinstance(effect, SendPacket)
    msgs = decode_packet(effect.payload)
    assert isinstance(msgs[0], Ping) and 1 < len(msgs) < 400
    assert len(effect.payload) <= LOCAL.udp_packet_size - SEAL_OVERHEAD
    assert t.counters.stats["msg_out.alive"] == len(msgs) - 1


def test_a_fresh_update_brings_the_next_gossip_round_forward() -> None:
    t, d = cluster(5)
    assert d.next_deadline() == float("inf")  # nothing to say: no round due
    t.now = 0.01
    d.broadcast("m1", Alive("m1", 1, A(1)))
    assert d.next_deadline() == max(0.01, LOCAL.eager_gossip_gap)
    d.tick(d.next_deadline())
    assert t.outbox and all(isinstance(e, SendPacket) for e in t.outbox)
