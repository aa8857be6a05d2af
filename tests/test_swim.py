"""gossip.swim: the rules of the membership state machine, then whole clusters.

The first part drives one Membership by hand: encoded packets in, decoded
effects out, time passed explicitly.  The second part runs clusters on the
deterministic simulator of simulations/sim.py, on a network where every
link is alike (``NetModel.uniform``) and every invariant check is on.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.config import LAN, LOCAL, GossipConfig
from gossip.keyring import SEAL_OVERHEAD
from gossip.member import Status, overrides
from gossip.state import JOIN_DIRECT
from gossip.swim import LEAVE_DIRECT, SETTLE_MAX, Event, Membership, SendPacket, StartPushPull, TcpProbe
from gossip.wire import (
    Ack,
    Address,
    Alive,
    Dead,
    MemberRecord,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Query,
    Suspect,
    decode_packet,
    decode_stream,
    encode_packet,
    encode_stream,
    pack_packet,
)
from simulations.sim import NetModel, Sim

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow])


# -- driving one machine by hand -------------------------------------------------------


def _ack_of(msg: object) -> tuple[int, str]:
    """An ack's seq and source (a direct ack also carries a coordinate)."""
    assert isinstance(msg, Ack)
    return (msg.seq, msg.source)


def A(name: str) -> Address:
    """Every test member lives at a predictable address."""
    return (f"{name}.test", 7946)


def name_of(addr: Address) -> str:
    return addr[0].removesuffix(".test")


@dataclass
class Out:
    #: (time, destination name, payload, decoded messages)
    packets: list[tuple[float, str, bytes, list[Message]]] = field(default_factory=list)
    push_pulls: list[StartPushPull] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def to(self, name: str) -> list[list[Message]]:
        return [msgs for _, dst, _, msgs in self.packets if dst == name]

    def to_all(self) -> list[list[Message]]:
        return [msgs for _, _, _, msgs in self.packets]

    def messages(self) -> list[Message]:
        return [m for _, _, _, msgs in self.packets for m in msgs]

    def of_kind(self, kind: str) -> list[dict[str, object]]:
        return [e.fields for e in self.events if e.kind == kind]

    def member_events(self, name: str) -> list[dict[str, object]]:
        return [f for f in self.of_kind("member") if f["name"] == name]

    def extend(self, other: Out) -> None:
        self.packets += other.packets
        self.push_pulls += other.push_pulls
        self.events += other.events


def drain(m: Membership, now: float = 0.0) -> Out:
    effects, events = m.drain()
    out = Out(events=list(events))
    for eff in effects:
        if isinstance(eff, SendPacket):
            out.packets.append((now, name_of(eff.addr), eff.payload, decode_packet(eff.payload)))
        else:
            out.push_pulls.append(eff)
    return out


def machine(name: str = "a", peers: Iterable[str] = (), config: GossipConfig = LOCAL,
            now: float = 0.0, **kwargs: object) -> Membership:
    m = Membership(name, A(name), config, rng=random.Random(f"test:{name}"), now=now,
                   **kwargs)  # type: ignore[arg-type]
    for p in peers:
        feed(m, now, Alive(p, 0, A(p)))
    m.drain()
    return m


def feed(m: Membership, now: float, *msgs: Message, src: str = "z") -> None:
    m.receive(now, A(src), encode_packet(list(msgs)))


def status(m: Membership, name: str) -> str | None:
    member = m.members.get(name)
    return None if member is None else member.status.value


def queued(m: Membership) -> list[Message]:
    """What is waiting in the broadcast queue, without disturbing it."""
    q = copy.deepcopy(m.broadcasts)
    return decode_packet(pack_packet(q.get(10**9, 10**9)))


def snapshot(m: Membership) -> object:
    return (
        [(x.name, x.addr, x.incarnation, x.status, dict(x.tags)) for x in m.member_list()],
        m.me.incarnation, len(m.broadcasts), queued(m), m.awareness.score,
    )


Responder = Callable[[str, list[Message]], list[Message]]


def answering(up: Iterable[str], nack: bool = True) -> Responder:
    """Simulated peers: those in ``up`` ack pings and serve ping-reqs; the rest are silent."""
    alive = set(up)

    def respond(dst: str, msgs: list[Message]) -> list[Message]:
        reply: list[Message] = []
        if dst not in alive:
            return reply
        for msg in msgs:
            if isinstance(msg, Ping) and msg.target == dst:
                reply.append(Ack(msg.seq, dst))
            elif isinstance(msg, PingReq):
                if msg.target in alive:
                    reply.append(Ack(msg.seq, msg.target))
                elif nack and msg.want_nack:
                    reply.append(Nack(msg.seq, dst))
        return reply

    return respond


def pump(m: Membership, until: float, respond: Responder | None = None) -> Out:
    """Tick m at each of its deadlines up to ``until``; peers answer with zero latency."""
    collected = Out()
    now = float("-inf")
    while m.next_deadline() <= until:
        now = max(now, m.next_deadline())  # an answer may make a timer due at once
        m.tick(now)
        assert m.next_deadline() > now, "tick left a timer due"
        pending = drain(m, now)
        while pending.packets or pending.push_pulls or pending.events:
            collected.extend(pending)
            replies = [] if respond is None else [
                (dst, respond(dst, msgs)) for _, dst, _, msgs in pending.packets
            ]
            for dst, reply in replies:
                if reply:
                    feed(m, now, *reply, src=dst)
            pending = drain(m, now)
    return collected


PEERS9 = [f"p{i}" for i in range(1, 10)]  # with "a": a cluster of 10


# -- incarnation precedence ----------------------------------------------------------------


def known(inc: int = 5, st_: str = "alive", tags: dict[str, str] | None = None,
          config: GossipConfig = LOCAL) -> Membership:
    """Machine "a" that knows b, c, d and x; x at incarnation ``inc`` in state ``st_``."""
    m = machine("a", ["b", "c", "d"], config=config)
    feed(m, 0.0, Alive("x", inc, A("x"), tags or {"v": "1"}))
    if st_ == "suspect":
        feed(m, 0.0, Suspect("x", inc, "b"))
    elif st_ in ("dead", "left"):
        feed(m, 0.0, Dead("x", inc, "x" if st_ == "left" else "b"))
    assert status(m, "x") == st_
    m.drain()
    return m


@pytest.mark.parametrize("inc", [4, 5])
def test_alive_with_lower_or_equal_incarnation_is_ignored(inc: int) -> None:
    m = known(5)
    before = snapshot(m)
    feed(m, 1.0, Alive("x", inc, A("x"), {"v": "stale"}))
    assert snapshot(m) == before
    assert m.members["x"].tags == {"v": "1"}


def test_alive_with_higher_incarnation_is_accepted_and_regossiped() -> None:
    m = known(5)
    feed(m, 1.0, Alive("x", 6, A("x"), {"v": "2"}))
    x = m.members["x"]
    assert (x.status, x.incarnation, x.tags) == (Status.ALIVE, 6, {"v": "2"})
    assert Alive("x", 6, A("x"), {"v": "2"}) in queued(m)


def test_suspect_with_lower_incarnation_is_ignored() -> None:
    m = known(5)
    feed(m, 1.0, Suspect("x", 4, "b"))
    assert status(m, "x") == "alive"


@pytest.mark.parametrize("inc", [5])
def test_suspect_with_equal_incarnation_marks_suspect(inc: int) -> None:
    m = known(5)
    feed(m, 1.0, Suspect("x", inc, "b"))
    x = m.members["x"]
    assert (x.status, x.incarnation) == (Status.SUSPECT, inc)
    assert Suspect("x", inc, "b") in queued(m)
    ev = drain(m).member_events("x")
    assert ev and ev[-1]["status"] == "suspect" and ev[-1]["previous"] == "alive"


@pytest.mark.parametrize("start", ["alive", "suspect"])
def test_dead_beats_alive_and_suspect_at_the_same_incarnation(start: str) -> None:
    m = known(5, start)
    feed(m, 1.0, Dead("x", 5, "b"))
    assert status(m, "x") == "dead"
    assert Dead("x", 5, "b") in queued(m)


def test_dead_with_lower_incarnation_is_ignored() -> None:
    m = known(5)
    feed(m, 1.0, Dead("x", 4, "b"))
    assert status(m, "x") == "alive"


def test_alive_at_equal_incarnation_does_not_clear_suspicion_but_higher_does() -> None:
    m = known(5, "suspect")
    feed(m, 1.0, Alive("x", 5, A("x")))
    assert status(m, "x") == "suspect"
    feed(m, 1.0, Alive("x", 6, A("x")))
    assert status(m, "x") == "alive"
    assert drain(m).member_events("x")[-1]["reason"] == "refuted suspicion"
    # The suspicion timer went with it: x is never declared dead later.
    m.tick(1000.0)
    assert status(m, "x") == "alive"


@pytest.mark.parametrize("gone", ["dead", "left"])
def test_a_departed_member_comes_back_only_with_a_higher_incarnation(gone: str) -> None:
    m = known(5, gone)
    feed(m, 1.0, Alive("x", 5, A("x")))
    feed(m, 1.0, Suspect("x", 9, "b"))  # suspicion never revives the dead
    feed(m, 1.0, Dead("x", 9, "b"))  # and dead stays dead without a new incarnation
    assert (status(m, "x"), m.members["x"].incarnation) == (gone, 5)
    feed(m, 1.0, Alive("x", 6, A("x")))
    assert status(m, "x") == "alive"
    assert drain(m).member_events("x")[-1]["reason"] == "rejoined"


def test_dead_whose_source_is_the_member_itself_means_left() -> None:
    m = known(5)
    feed(m, 1.0, Dead("x", 5, "x"))
    assert status(m, "x") == "left"
    assert drain(m).member_events("x")[-1]["reason"] == "left gracefully"
    m2 = known(5)
    feed(m2, 1.0, Dead("x", 5, "b"))
    assert status(m2, "x") == "dead"
    assert drain(m2).member_events("x")[-1]["reason"] == "declared dead by b"


def test_claims_about_unknown_members() -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, Suspect("ghost", 3, "b"), Dead("ghost2", 3, "b"))
    assert "ghost" not in m.members and "ghost2" not in m.members
    feed(m, 1.0, Alive("new", 2, A("new"), {"role": "web"}))
    assert status(m, "new") == "alive" and m.members["new"].incarnation == 2
    ev = drain(m).member_events("new")
    assert ev == [{"name": "new", "addr": "new.test:7946", "status": "alive", "previous": "none",
                   "incarnation": 2, "reason": "joined"}]


claims = st.lists(st.tuples(st.sampled_from(["alive", "suspect", "dead"]), st.integers(0, 4),
                            st.sampled_from(["b", "c", "x"])), max_size=25)


@SETTINGS
@given(claims)
def test_claims_about_a_member_follow_swim_precedence(seq: list[tuple[str, int, str]]) -> None:
    m = known(0, config=LAN)
    model = ("alive", 0)
    for kind, inc, src in seq:
        before = (status(m, "x"), m.members["x"].incarnation)
        msg: Message
        if kind == "alive":
            msg = Alive("x", inc, A("x"), {"v": "1"})
            if inc > model[1]:
                model = ("alive", inc)
        elif kind == "suspect":
            msg = Suspect("x", inc, src)
            # An accusation above the incarnation x announced is dropped (StateRules._beyond_announced).
            if model[0] == "alive" and inc == model[1]:
                model = ("suspect", inc)
        else:
            msg = Dead("x", inc, src)
            if model[0] in ("alive", "suspect") and inc == model[1]:
                model = ("left" if src == "x" else "dead", inc)
        feed(m, 1.0, msg)
        after = (status(m, "x"), m.members["x"].incarnation)
        if model[0] == "dead" and kind == "dead" and src == "x" and inc == model[1]:
            # The one rule beyond `overrides`: the member's own leave replaces a dead
            # verdict (test_a_leave_heard_after_our_own_dead_verdict_still_shows_left).
            model = ("left", inc)
            assert after == model
            continue
        assert after == model
        if after != before:
            assert overrides(Status(after[0]), after[1], Status(before[0]), before[1])


# -- refutation -------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", [Suspect("a", 3, "b"), Dead("a", 3, "b")])
def test_suspect_or_dead_about_self_is_refuted(claim: Message) -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, claim)
    assert m.me.incarnation == 4 and m.me.status is Status.ALIVE
    assert Alive("a", 4, A("a"), {}) in queued(m)
    out = drain(m)
    assert out.of_kind("refute")[0]["incarnation"] == 4
    assert m.awareness.score == 1  # Lifeguard: being accused hints that we are the slow one
    assert m.counters.stats["refutations"] == 1


def test_stale_claims_about_self_are_ignored() -> None:
    m = machine("a", ["b"], incarnation=7)
    feed(m, 1.0, Suspect("a", 6, "b"), Dead("a", 2, "b"), Alive("a", 7, A("a")))
    assert m.me.incarnation == 7
    assert m.counters.stats["refutations"] == 0


def test_alive_about_self_with_higher_incarnation_is_outbid() -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, Alive("a", 9, A("a")))
    assert m.me.incarnation == 10
    assert Alive("a", 10, A("a"), {}) in queued(m)


self_claims = st.lists(st.tuples(st.sampled_from(["alive", "suspect", "dead"]), st.integers(0, 8)),
                       max_size=20)


@SETTINGS
@given(self_claims)
def test_a_node_always_outbids_accusations_about_itself(seq: list[tuple[str, int]]) -> None:
    m = machine("a", ["b"])
    for kind, inc in seq:
        before = m.me.incarnation
        msg = {"alive": Alive("a", inc, A("a")), "suspect": Suspect("a", inc, "b"),
               "dead": Dead("a", inc, "b")}[kind]
        feed(m, 1.0, msg)
        beaten = inc > before if kind == "alive" else inc >= before
        assert m.me.incarnation == (inc + 1 if beaten else before)
        assert m.me.status is Status.ALIVE
        assert status(m, "a") == "alive"
        if beaten:
            assert Alive("a", inc + 1, A("a"), {}) in queued(m)


def test_set_tags_raises_incarnation_and_announces() -> None:
    m = machine("a", ["b"])
    m.set_tags({"role": "db"})
    assert m.me.incarnation == 1
    assert Alive("a", 1, A("a"), {"role": "db"}) in queued(m)
    other = machine("b", ["a"])
    m.tick(m.next_deadline())
    for _, _, payload, _ in drain(m).packets:
        other.receive(1.0, A("a"), payload)
    assert other.members["a"].tags == {"role": "db"}


# -- suspicion timeouts -------------------------------------------------------------------------


def memberlist_timeout(n: int, k: int, lo: float, hi: float) -> float:
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    return max(lo, math.floor((hi - frac * (hi - lo)) * 1000.0) / 1000.0)


def test_suspicion_expires_to_dead_after_the_max_timeout() -> None:
    m = machine("a", PEERS9)
    feed(m, 10.0, Suspect("p3", 0, "p1"))
    hi = LOCAL.suspicion_max(10)
    m.tick(10.0 + hi - 0.01)
    assert status(m, "p3") == "suspect"
    m.tick(10.0 + hi)
    assert status(m, "p3") == "dead"
    assert drain(m).member_events("p3")[-1]["reason"] == "declared dead by a"
    assert Dead("p3", 0, "a") in queued(m)
    assert m.counters.stats["suspicion_timeouts"] == 1


def test_confirmations_from_distinct_members_shorten_the_suspicion() -> None:
    # LAN: suspicion_mult 4, so k = 2 confirmations are expected with 10 members.
    m = machine("a", PEERS9, config=LAN)
    lo, hi = LAN.suspicion_min(10), LAN.suspicion_max(10)
    feed(m, 0.0, Suspect("p3", 0, "p1"))
    feed(m, 1.0, Suspect("p3", 0, "p2"))
    feed(m, 1.0, Suspect("p3", 0, "p2"), Suspect("p3", 0, "p1"))  # duplicates do not count
    assert m.counters.stats["suspicion_confirmations"] == 1
    assert Suspect("p3", 0, "p2") in queued(m)  # a new confirmation is re-gossiped
    deadline = memberlist_timeout(1, 2, lo, hi)
    assert lo < deadline < hi
    m.tick(deadline - 0.001)
    assert status(m, "p3") == "suspect"
    m.tick(deadline)
    assert status(m, "p3") == "dead"


def test_k_confirmations_bring_the_timeout_down_to_min() -> None:
    m = machine("a", PEERS9, config=LAN)
    feed(m, 0.0, Suspect("p3", 0, "p1"))
    feed(m, 0.5, Suspect("p3", 0, "p2"), Suspect("p3", 0, "p4"), Suspect("p3", 0, "p5"))
    assert m.counters.stats["suspicion_confirmations"] == 2  # k = 2: the third is not counted
    lo = LAN.suspicion_min(10)
    m.tick(lo - 0.001)
    assert status(m, "p3") == "suspect"
    m.tick(lo)
    assert status(m, "p3") == "dead"


def test_too_few_members_for_confirmations_means_the_min_timeout() -> None:
    m = machine("a", ["b", "c"], config=LAN)  # n - 2 < suspicion_mult - 2: k = 0
    feed(m, 0.0, Suspect("c", 0, "b"))
    lo = LAN.suspicion_min(3)
    m.tick(lo - 0.001)
    assert status(m, "c") == "suspect"
    m.tick(lo)
    assert status(m, "c") == "dead"


def test_next_deadline_includes_the_suspicion() -> None:
    m = machine("a", PEERS9, config=LAN)
    m.tick(0.0)
    feed(m, 0.0, Suspect("p3", 0, "p1"))
    # Stand in for a driver that only wakes at next_deadline().
    now = 0.0
    while status(m, "p3") == "suspect":
        now = m.next_deadline()
        assert now <= LAN.suspicion_max(10)
        m.tick(now)
        m.drain()
    assert status(m, "p3") == "dead"



def test_next_deadline_follows_suspicions_as_they_are_confirmed_and_refuted() -> None:
    # The earliest suspicion deadline is cached between packets; every change to
    # the set of suspicions (new, confirmed, refuted, expired) must move it.  A
    # driver that wakes only at next_deadline() sees each suspicion end exactly
    # at its own deadline, never later.
    m = machine("a", PEERS9, config=LAN)
    hi = LAN.suspicion_max(10)
    script: list[tuple[float, list[Message]]] = [
        (0.0, [Suspect("p3", 0, "p1")]),
        (1.0, [Suspect("p4", 0, "p1")]),
        (1.5, [Suspect("p6", 0, "p1")]),
        (2.0, [Suspect("p4", 0, "p2"), Suspect("p4", 0, "p5")]),  # p4 confirmed: due early
        (2.5, [Alive("p6", 1, A("p6"))]),  # p6 refutes
    ]
    m.tick(0.0)
    now, dead = 0.0, {}
    while now < 60.0 and "p3" not in dead:
        due = {name: sus.deadline for name, sus in m.rules.suspicions.items()}
        if script and script[0][0] <= m.next_deadline():
            now, msgs = script.pop(0)
            feed(m, now, *msgs)
        else:
            now = m.next_deadline()
            m.tick(now)
        for e in m.drain()[1]:
            if e.kind == "member" and e.fields["status"] == "dead":
                assert now <= due[e.fields["name"]]
                dead[e.fields["name"]] = now
    assert "p6" not in dead  # refuted; suspected afresh later by our own probes, not yet dead
    assert dead["p4"] < 1.0 + hi and dead["p3"] <= hi


def test_a_failed_probe_of_a_suspect_member_confirms_the_suspicion() -> None:
    # LOCAL with 3 members: k = 1, min 1.5 s, max 6 s.
    m = machine("a", ["b", "c"])
    feed(m, 0.0, Suspect("c", 0, "b"))
    out = pump(m, 5.0, answering(["b"]))  # c is really down; b acks and nacks
    assert m.counters.stats["suspicion_confirmations"] == 1
    assert Suspect("c", 0, "a") in out.messages()  # our confirmation is gossiped
    dead = [t for t, _, _, msgs in out.packets for x in msgs if x == Dead("c", 0, "a")]
    assert dead and min(dead) < LOCAL.suspicion_max(3)
    assert m.awareness.score == 0  # the nacks show our own links are fine


def test_a_stale_buddy_suspicion_is_answered_with_the_current_incarnation() -> None:
    # Regression: a stale Suspect about ourselves was dropped silently, so a prober that
    # had missed our refutation got an ack, learned nothing, and later declared us dead.
    m = machine("a", ["b", "c"])
    feed(m, 1.0, Suspect("a", 0, "b"))  # refuted: we are at incarnation 1 now
    pump(m, 3.0, answering(["b", "c"]))  # our Alive(a, 1) runs out of retransmits
    assert len(m.broadcasts) == 0 and m.me.incarnation == 1
    # c missed the refutation: it still holds us suspect at 0 and probes us.
    feed(m, 3.0, Ping(99, "a", "c"), Suspect("a", 0, "c"), src="c")
    out = drain(m, 3.0)
    assert _ack_of(out.to("c")[0][0]) == (99, "a")
    out.extend(pump(m, 3.0 + LOCAL.probe_interval, answering(["b", "c"])))
    # c must hear our current incarnation again, in the reply or by gossip.
    assert any(Alive("a", 1, A("a"), {}) in msgs for msgs in out.to("c"))
    assert m.me.incarnation == 1  # nothing to outbid: no new incarnation needed


def test_probing_a_suspect_member_carries_a_suspect_message() -> None:
    # Lifeguard's buddy system: the suspect learns of it from the probe itself.
    m = machine("a", ["b", "c"])
    feed(m, 0.0, Suspect("c", 0, "b"))
    out = pump(m, 2.0, answering(["b", "c"]))
    probes = [msgs for msgs in out.to("c") if any(isinstance(x, Ping) for x in msgs)]
    assert probes
    assert all(Suspect("c", 0, "a") in msgs for msgs in probes)
    # Healthy members are pinged without one.
    to_b = [msgs for msgs in out.to("b") if any(isinstance(x, Ping) for x in msgs)]
    assert to_b and not any(isinstance(x, Suspect) and x.source == "a" for msgs in to_b for x in msgs)


# -- pings, ping-reqs and local health ---------------------------------------------------------


def test_ping_is_acked_to_its_source() -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, Ping(42, "a", "b"), src="b")
    out = drain(m)
    assert [dst for _, dst, _, _ in out.packets] == ["b"]
    assert _ack_of(out.to("b")[0][0]) == (42, "a")


def test_ping_for_another_name_is_dropped_as_wrong_node() -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, Ping(42, "someone-else", "b"), src="b")
    assert m.counters.drops["wrong_node"] == 1
    assert drain(m).packets == []


@pytest.mark.parametrize("view, cls", [("suspect", Suspect), ("dead", Dead)])
def test_ping_from_a_member_we_hold_down_tells_it_so(view: str, cls: type) -> None:
    m = machine("a", ["b", "c"])
    feed(m, 1.0, (Suspect if view == "suspect" else Dead)("b", 0, "c"))
    feed(m, 2.0, Ping(7, "a", "b"), src="b")
    reply = drain(m).to("b")[0]
    assert _ack_of(reply[0]) == (7, "a")
    assert cls("b", 0, "a") in reply


def test_ping_req_is_relayed_and_the_ack_forwarded() -> None:
    m = machine("a", ["b", "c"])
    feed(m, 1.0, PingReq(7, "c", A("c"), "b", True), src="b")
    ping = drain(m).to("c")[0][0]
    assert isinstance(ping, Ping) and ping.target == "c" and ping.source == "a"
    feed(m, 1.05, Ack(ping.seq, "c"), src="c")
    assert drain(m).to("b")[0][0] == Ack(7, "c")
    m.tick(1.0 + LOCAL.probe_timeout)
    assert not any(isinstance(x, Nack) for x in drain(m).messages())


def test_ping_req_without_an_answer_sends_a_nack_in_time() -> None:
    m = machine("a", ["b", "c"])
    feed(m, 1.0, PingReq(7, "c", A("c"), "b", True), src="b")
    ping = drain(m).to("c")[0][0]
    m.tick(1.0 + 0.8 * LOCAL.probe_timeout)
    nacks = [x for msgs in drain(m).to("b") for x in msgs if isinstance(x, Nack)]
    assert nacks == [Nack(7, "a")]
    assert 0.8 * LOCAL.probe_timeout < LOCAL.probe_interval - LOCAL.probe_timeout
    # A late ack, after the relay expired, is not forwarded.
    m.tick(1.0 + LOCAL.probe_timeout)
    feed(m, 1.5, Ack(ping.seq, "c"), src="c")
    assert drain(m).packets == []


def test_ping_req_without_want_nack_stays_silent() -> None:
    m = machine("a", ["b", "c"])
    feed(m, 1.0, PingReq(7, "c", A("c"), "b", False), src="b")
    drain(m)
    m.tick(1.0 + LOCAL.probe_timeout)
    assert not any(isinstance(x, Nack) for x in drain(m).messages())


def test_ping_req_for_ourselves_is_acked_directly() -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, PingReq(7, "a", A("a"), "b", True), src="b")
    assert _ack_of(drain(m).to("b")[0][0]) == (7, "a")


def test_probe_round_robin_covers_every_member() -> None:
    m = machine("a", PEERS9)
    out = pump(m, 9 * LOCAL.probe_interval, answering(PEERS9))
    targets = [x.target for _, _, _, msgs in out.packets for x in msgs if isinstance(x, Ping)]
    assert sorted(targets[:9]) == PEERS9  # one pass visits everyone once
    assert m.counters.stats["probe_failures"] == 0 and m.awareness.score == 0


def test_direct_probe_failure_goes_indirect_then_suspects() -> None:
    m = machine("a", ["b", "c", "d"])
    out = pump(m, 3.0, answering(["b", "c"]))
    reqs = [(dst, x) for _, dst, _, msgs in out.packets for x in msgs if isinstance(x, PingReq)]
    assert reqs and {x.target for _, x in reqs} == {"d"}
    assert {dst for dst, _ in reqs} <= {"b", "c"}  # helpers are other alive members
    assert len({dst for dst, x in reqs if x.seq == reqs[0][1].seq}) == LOCAL.indirect_checks
    assert status(m, "d") == "suspect"
    assert status(m, "b") == status(m, "c") == "alive"
    assert m.awareness.score == 0  # every helper nacked: the fault is d's, not ours


def test_missing_nacks_raise_local_health_and_stretch_the_probe_interval() -> None:
    m = machine("a", ["b", "c", "d"])
    out = pump(m, 40.0, answering([]))  # we hear nothing at all
    assert m.awareness.score == LOCAL.awareness_max_multiplier - 1
    starts = [t for t, _, _, msgs in out.packets if any(isinstance(x, Ping) for x in msgs)]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[0] == pytest.approx(LOCAL.probe_interval)
    # The first failure misses both helpers' nacks (+2): the next period is 3x as long.
    assert gaps[1] == pytest.approx(3 * LOCAL.probe_interval)
    assert gaps == sorted(gaps)
    # Saturated: a newcomer (silent too) is probed only every 8 probe intervals.
    feed(m, 40.0, Alive("e", 0, A("e")))
    out = pump(m, 60.0, answering([]))
    starts = [t for t, _, _, msgs in out.packets if any(isinstance(x, Ping) for x in msgs)]
    assert len(starts) >= 2
    assert starts[1] - starts[0] == pytest.approx(LOCAL.awareness_max_multiplier * LOCAL.probe_interval)


def test_successful_probes_restore_local_health() -> None:
    m = machine("a", ["b", "c"])
    feed(m, 0.0, Suspect("a", 0, "b"), Suspect("a", 1, "b"), Suspect("a", 2, "b"))
    assert m.awareness.score == 3
    pump(m, 20.0, answering(["b", "c"]))
    assert m.awareness.score == 0


# -- hostile and broken input ------------------------------------------------------------------


@pytest.mark.parametrize("packet, reason", [
    (b"", "truncated"),
    (encode_packet([Ping(1, "a", "b")])[:-3], "truncated"),
    (b"\xc1garbage", "malformed"),
    (msgpack.packb({"not": "a packet"}), "malformed"),
    (msgpack.packb([1, [{"t": "alive", "name": "x", "inc": -1, "addr": ["h", 1]}]]), "malformed"),
    (msgpack.packb([2, [{"t": "ping", "seq": 1, "to": "a", "from": "b"}]]), "version"),
    (msgpack.packb([1, [{"t": "gossip-v2"}]]), "unknown_type"),
])
def test_bad_packets_are_counted_by_reason_and_change_nothing(packet: bytes, reason: str) -> None:
    m = known(5, "suspect")
    before, stats = snapshot(m), dict(m.counters.stats)
    m.receive(1.0, A("b"), packet)
    assert m.counters.drops == {reason: 1}
    assert snapshot(m) == before
    assert m.counters.stats == stats  # not even counted as a packet in
    out = drain(m)
    assert out.packets == [] and out.events == []


def test_a_bad_message_spoils_the_whole_packet() -> None:
    m = machine("a", ["b"])
    good = msgpack.packb({"t": "alive", "name": "x", "inc": 1, "addr": ["x.test", 7946], "tags": {}})
    bad = msgpack.packb({"t": "alive", "name": "y", "inc": 1, "addr": ["y.test", 0], "tags": {}})
    m.receive(1.0, A("b"), b"\x92\x01\x92" + good + bad)
    assert m.counters.drops["malformed"] == 1
    assert "x" not in m.members and "y" not in m.members


def test_push_pull_over_udp_is_unexpected() -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, PushPull("b", False, [MemberRecord("q", A("q"), 0, "alive")]), src="b")
    assert m.counters.drops["unexpected_type"] == 1
    assert "q" not in m.members


def test_deeply_nested_packet_is_dropped_not_raised() -> None:
    # Regression: this ~1 KB packet raised RecursionError out of receive().
    m = machine("a", ["b"])
    for depth in range(800, 1030, 2):
        m.receive(1.0, A("b"), b"\x92\x01\x91\x81\xa1t" + b"\x91" * depth + b"\x01")
    assert sum(m.counters.drops.values()) == len(range(800, 1030, 2))


@pytest.mark.parametrize("data", [b"", b"junk", encode_packet([Ping(1, "x", "b")]), encode_packet([Ack(1, "b")]),
                                  encode_packet([PushPull("b", True, []), PushPull("c", True, [])])])
def test_bad_push_pull_requests_get_no_reply(data: bytes) -> None:
    m = machine("a", ["b"])
    before = snapshot(m)
    assert m.handle_stream(1.0, A("b"), data) is None
    assert sum(m.counters.drops.values()) == 1
    assert snapshot(m) == before


# -- the TCP fallback probe (memberlist's fallback ping) --------------------------------------------


def test_a_member_whose_udp_is_blocked_stays_alive_through_tcp_and_is_reported() -> None:
    m = machine("a", ["b"])
    b = machine("b", ["a"])
    out = Out()
    now = 0.0
    for _ in range(40):  # b never gets a UDP datagram; TCP reaches it
        now = m.next_deadline()
        m.tick(now)
        effects, events = m.drain()
        out.events += events
        for eff in effects:
            if isinstance(eff, TcpProbe):
                assert eff.addr == A("b") and eff.deadline > now
                m.complete_tcp_probe(now + 0.01, eff.seq, b.handle_stream(now, A("a"), eff.payload))
        out.events += m.drain()[1]
    assert status(m, "b") == "alive"
    assert "b" in m.udp_blocked and m.counters.stats["tcp_fallback_saves"] >= 5
    assert len(out.of_kind("udp_blocked")) == 1  # said once, not per probe
    assert not out.member_events("b")
    # A direct UDP ack clears it.
    m.tick(m.next_deadline())
    ping = [msgs for msgs in drain(m).to("b") if isinstance(msgs[0], Ping)]
    if ping:
        feed(m, m.now, Ack(ping[0][0].seq, "b"), src="b")
        assert "b" not in m.udp_blocked


def test_without_tcp_either_the_member_is_suspected() -> None:
    m = machine("a", ["b"])
    out = pump(m, 3.0)
    assert out.push_pulls and all(isinstance(e, TcpProbe) for e in out.push_pulls)  # tried, never answered
    assert status(m, "b") in ("suspect", "dead") and "b" not in m.udp_blocked


def _probe_until_tcp_fallback(m: Membership) -> tuple[float, TcpProbe]:
    """Run ``m`` (whose peers never answer UDP) until its probe sends the TCP fallback ping."""
    now = 0.0
    for _ in range(20):
        now = m.next_deadline()
        m.tick(now)
        fallbacks = [e for e in m.drain()[0] if isinstance(e, TcpProbe)]
        if fallbacks:
            return now, fallbacks[0]
    raise AssertionError("no TCP fallback ping was sent")


def test_a_refused_tcp_fallback_fails_the_probe_at_once() -> None:
    """The target's host reset the connection: its agent is gone, and helpers cannot
    change that, so it is suspected now rather than at the end of the period."""
    m = machine("a", ["b", "c", "d"])
    now, fallback = _probe_until_tcp_fallback(m)
    target = next(n for n, x in m.members.items() if x.addr == fallback.addr)
    assert status(m, target) == "alive" and now < fallback.deadline
    m.complete_tcp_probe(now + 0.001, fallback.seq, None, refused=True)
    assert status(m, target) == "suspect"
    assert m.counters.stats["probes_refused"] == 1
    assert m.awareness.score == 0  # nacks not due yet are no sign of our own trouble
    # The helpers' late answers, and the period's end, change nothing more.
    feed(m, now + 0.4, Nack(fallback.seq, "c"), src="c")
    m.tick(fallback.deadline)
    assert m.counters.stats["probe_failures"] == 1 and m.awareness.score == 0


def test_a_tcp_fallback_that_just_got_no_answer_waits_for_the_period() -> None:
    m = machine("a", ["b", "c", "d"])
    now, fallback = _probe_until_tcp_fallback(m)
    target = next(n for n, x in m.members.items() if x.addr == fallback.addr)
    m.complete_tcp_probe(now + 0.001, fallback.seq, None)  # timed out or cut: not a refusal
    m.complete_tcp_probe(now + 0.001, fallback.seq + 1, None, refused=True)  # another probe's
    assert status(m, target) == "alive" and m.counters.stats["probes_refused"] == 0
    m.tick(fallback.deadline)
    assert status(m, target) == "suspect"


def test_a_refusal_after_the_target_answered_changes_nothing() -> None:
    m = machine("a", ["b", "c", "d"])
    now, fallback = _probe_until_tcp_fallback(m)
    target = next(n for n, x in m.members.items() if x.addr == fallback.addr)
    feed(m, now + 0.01, Ack(fallback.seq, target), src=target)  # an indirect ack came through
    m.complete_tcp_probe(now + 0.02, fallback.seq, None, refused=True)
    assert status(m, target) == "alive" and m.counters.stats["probes_refused"] == 0


def _probe_started(m: Membership) -> tuple[float, str, int]:
    """Run ``m`` until a probe's direct ping is out: (now, target, seq)."""
    for _ in range(20):
        now = m.next_deadline()
        m.tick(now)
        p = m.prober.current
        if p is not None and not p.indirect_sent:
            m.drain()
            return now, p.target, p.seq
    raise AssertionError("no probe started")


def test_port_unreachable_starts_the_indirect_phase_at_once() -> None:
    """ICMP port unreachable for the probe's target: the TCP ping and the ping-reqs
    go out now, and the TCP ping's refusal fails the probe well before its timeout."""
    m = machine("a", ["b", "c", "d"])
    now, target, seq = _probe_started(m)
    m.port_unreachable(now + 0.001, A(target))
    out = drain(m, now + 0.001)
    fallbacks = [e for e in out.push_pulls if isinstance(e, TcpProbe)]
    assert [(f.addr, f.seq) for f in fallbacks] == [(A(target), seq)]
    assert any(isinstance(msgs[0], PingReq) for _, _, _, msgs in out.packets)
    assert status(m, target) == "alive"  # the ICMP alone accuses no one
    assert m.counters.stats["probes_unreachable"] == 1
    m.complete_tcp_probe(now + 0.002, seq, None, refused=True)
    assert status(m, target) == "suspect" and m.awareness.score == 0
    # Without the ICMP, the same machine would still be waiting for the direct ack.
    twin = machine("a", ["b", "c", "d"])
    assert _probe_started(twin) == (now, target, seq)
    twin.tick(now + 0.001)
    assert not [e for e in drain(twin).push_pulls if isinstance(e, TcpProbe)]


def test_port_unreachable_with_tcp_answering_is_a_udp_firewall_not_a_death() -> None:
    """A firewall that rejects UDP (iptables REJECT answers with port unreachable)
    while TCP gets through: the member stays alive and is reported UDP-blocked."""
    m = machine("a", ["b", "c", "d"])
    now, target, seq = _probe_started(m)
    m.port_unreachable(now + 0.001, A(target))
    m.drain()
    m.complete_tcp_probe(now + 0.002, seq, encode_stream([Ack(seq, target)]))
    m.tick(now + LOCAL.probe_interval)
    assert status(m, target) == "alive" and target in m.udp_blocked


def test_port_unreachable_for_anyone_else_changes_nothing() -> None:
    m = machine("a", ["b", "c", "d"])
    now, target, seq = _probe_started(m)
    other = next(n for n in ("b", "c", "d") if n != target)
    m.port_unreachable(now + 0.001, A(other))
    m.port_unreachable(now + 0.001, ("elsewhere.test", 1))
    assert not [e for e in drain(m).push_pulls if isinstance(e, TcpProbe)]
    feed(m, now + 0.002, Ack(seq, target), src=target)  # the probe succeeded
    m.port_unreachable(now + 0.003, A(target))  # late: about some earlier datagram
    assert not [e for e in drain(m).push_pulls if isinstance(e, TcpProbe)]
    assert m.counters.stats["probes_unreachable"] == 0 and status(m, target) == "alive"


def test_a_tcp_ping_is_answered_only_by_its_target() -> None:
    m = machine("a", ["b"])
    reply = m.handle_stream(1.0, A("b"), encode_packet([Ping(9, "a", "b")]))
    assert reply is not None and decode_stream(reply) == [Ack(9, "a")]
    assert m.handle_stream(1.0, A("b"), encode_packet([Ping(9, "zz", "b")])) is None
    assert m.counters.drops["wrong_node"] == 1


# -- name conflicts and rejoining ------------------------------------------------------------------


@pytest.mark.parametrize("view", ["alive", "suspect"])
def test_alive_for_a_live_name_at_another_address_is_refused(view: str) -> None:
    m = known(5, view)
    feed(m, 1.0, Alive("x", 9, ("impostor.test", 7946)))
    x = m.members["x"]
    assert (x.addr, x.incarnation, x.status.value) == (A("x"), 5, view)
    conflicts = drain(m).of_kind("name_conflict")
    assert len(conflicts) == 1 and conflicts[0]["name"] == "x"
    assert conflicts[0]["theirs"] == "impostor.test:7946"
    assert m.counters.stats["name_conflicts"] == 1


@pytest.mark.parametrize("gone", ["dead", "left"])
def test_a_departed_member_may_come_back_at_a_new_address(gone: str) -> None:
    m = known(5, gone)
    feed(m, 1.0, Alive("x", 0, ("10.9.9.9", 8000), {"v": "new"}))
    x = m.members["x"]
    assert (x.status, x.addr, x.incarnation, x.tags) == (Status.ALIVE, ("10.9.9.9", 8000), 0, {"v": "new"})
    assert drain(m).member_events("x")[-1]["reason"] == "rejoined"


def test_an_agent_claiming_our_own_name_is_reported() -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, Alive("a", 0, ("impostor.test", 7946)))
    assert drain(m).of_kind("name_conflict")
    assert m.me.addr == A("a")


def join_request(name: str, addr: Address, *others: MemberRecord) -> bytes:
    return encode_packet([PushPull(name, True, [MemberRecord(name, addr, 0, "alive"), *others])])


def test_push_pull_from_a_joiner_whose_name_is_alive_elsewhere_is_refused() -> None:
    m = known(5)
    before = snapshot(m)
    reply = m.handle_stream(1.0, ("impostor.test", 7946), join_request(
        "x", ("impostor.test", 7946), MemberRecord("smuggled", A("smuggled"), 0, "alive")))
    assert reply is not None
    [pp] = decode_stream(reply)
    assert isinstance(pp, PushPull) and pp.source == "a" and pp.refused
    assert "already alive" in pp.refused
    assert snapshot(m) == before  # nothing from a refused joiner is merged
    assert drain(m).of_kind("join_refused")[0]["peer"] == "x"
    assert m.counters.stats["push_pull_refused"] == 1


def test_push_pull_from_an_agent_with_our_own_name_is_refused() -> None:
    m = machine("a", ["b"])
    reply = m.handle_stream(1.0, ("other.test", 7946), join_request("a", ("other.test", 7946)))
    assert reply is not None and decode_stream(reply)[0].refused  # type: ignore[union-attr]


def test_joins_that_arrive_together_are_merged_first_and_share_one_reply() -> None:
    """A seed answers a burst of joins in batches (agent.transport.FrameServer): each
    joiner of a batch learns the others too, and the reply is encoded once."""
    seed = machine("a", ["b"])
    joiners = [Membership(n, A(n), LOCAL, rng=random.Random(i)) for i, n in enumerate(("j1", "j2", "j3"))]
    requests = [(j.addr, j.push_pull_payload(True)) for j in joiners]
    requests.insert(1, (("impostor.test", 7946), join_request("b", ("impostor.test", 7946))))  # b is alive elsewhere
    replies = seed.handle_streams(1.0, requests)
    assert len(replies) == 4 and replies[1] is not None
    [refusal] = decode_stream(replies[1])
    assert isinstance(refusal, PushPull) and "already alive" in refusal.refused
    shared = [replies[0], replies[2], replies[3]]
    assert shared[0] is shared[1] is shared[2]
    [pp] = decode_stream(shared[0])  # type: ignore[arg-type]
    assert isinstance(pp, PushPull) and not pp.refused
    assert {r.name for r in pp.members} == {"a", "b", "j1", "j2", "j3"}
    for j in joiners:
        ok, _ = j.complete_push_pull(1.0, A("a"), "join", shared[0])
        assert ok and set(j.members) == {"a", "b", "j1", "j2", "j3"}
    assert seed.counters.stats["push_pull_in"] == 3 and seed.counters.stats["push_pull_refused"] == 1


def test_refused_join_is_reported_and_retried() -> None:
    seed = known(5)  # believes x is alive at x.test
    joiner = Membership("x", ("impostor.test", 7946), LOCAL, rng=random.Random(1))
    joiner.join(0.0, [A("a")])
    [start] = drain(joiner).push_pulls
    assert start == StartPushPull(A("a"), "join")
    reply = seed.handle_stream(0.0, joiner.addr, joiner.push_pull_payload(True))
    ok, reason = joiner.complete_push_pull(0.0, A("a"), "join", reply)
    assert not ok and reason.startswith("refused by a:")
    assert not joiner.joined and "refused" in joiner.join_error
    events = drain(joiner)
    assert events.of_kind("join_refused_by_peer") and events.of_kind("join_retry")
    assert set(joiner.members) == {"x"}


def test_a_departed_member_can_rejoin_at_a_new_address_through_push_pull() -> None:
    m = known(5, "dead")
    reply = m.handle_stream(1.0, ("10.9.9.9", 8000), join_request("x", ("10.9.9.9", 8000)))
    assert reply is not None and not decode_stream(reply)[0].refused  # type: ignore[union-attr]
    assert status(m, "x") == "alive" and m.members["x"].addr == ("10.9.9.9", 8000)


@pytest.mark.parametrize("old_view", ["alive", "suspect", "dead", "left"])
def test_a_restarted_node_outbids_its_previous_life(old_view: str) -> None:
    seed = known(5, old_view)  # knows x at incarnation 5
    fresh = Membership("x", A("x"), LOCAL, rng=random.Random(2))  # same name and address, inc 0
    fresh.join(0.0, [A("a")])
    drain(fresh)
    reply = seed.handle_stream(1.0, A("x"), fresh.push_pull_payload(True))
    assert decode_stream(reply or b"")[0].refused == ""  # type: ignore[union-attr]
    assert fresh.complete_push_pull(1.0, A("a"), "join", reply) == (True, "")
    assert fresh.joined
    assert fresh.me.incarnation == 6
    # The new incarnation is announced (at once or at the next gossip rounds) ...
    announce = Alive("x", 6, A("x"), {})
    out = drain(fresh, 1.0)
    out.extend(pump(fresh, 1.5))
    carriers = [payload for _, _, payload, msgs in out.packets if announce in msgs]
    assert carriers
    # ... and whoever hears it takes it.
    seed.receive(2.0, A("x"), carriers[0])
    assert (status(seed, "x"), seed.members["x"].incarnation) == ("alive", 6)


# -- push-pull and joining -------------------------------------------------------------------------


def test_push_pull_merge_rules() -> None:
    m = machine("a", ["b", "c", "d", "e"])
    remote = PushPull("b", False, [
        MemberRecord("b", A("b"), 0, "alive"),
        MemberRecord("c", A("c"), 0, "dead"),  # one peer's "dead" only makes us suspect
        MemberRecord("d", A("d"), 0, "left"),  # a departure is taken as is
        MemberRecord("e", A("e"), 3, "alive", {"v": "3"}),
        MemberRecord("f", A("f"), 1, "alive"),  # someone new
        MemberRecord("g", A("g"), 1, "dead"),  # a dead stranger is not worth learning
    ])
    reply = m.handle_stream(1.0, A("b"), encode_packet([remote]))
    assert reply is not None
    assert {n: status(m, n) for n in "bcdefg"} == {
        "b": "alive", "c": "suspect", "d": "left", "e": "alive", "f": "alive", "g": None}
    assert m.members["e"].incarnation == 3 and m.members["e"].tags == {"v": "3"}
    [pp] = decode_stream(reply)
    assert isinstance(pp, PushPull) and not pp.join and pp.refused == ""
    assert {r.name: r.status for r in pp.members} == {
        "a": "alive", "b": "alive", "c": "suspect", "d": "left", "e": "alive", "f": "alive"}


def test_a_push_pull_names_the_members_still_being_spread_and_the_receiver_spreads_them() -> None:
    # A burst of joins: members that joined a moment ago are news to much of the
    # cluster, so a push-pull marks them "fresh" and the receiver passes them on;
    # members it merely shows (old news) are learned but not spread.
    seed = machine("s", ["p1"])
    seed.broadcasts.reset()  # p1 has been around a while: its alive has been spread
    feed(seed, 0.5, Alive("new1", 0, A("new1")))  # gossip about a joiner: queued for spreading
    joiner = Membership("j", A("j"), LOCAL, rng=random.Random(1))
    joiner.join(1.0, [A("s")])
    drain(joiner)
    reply = seed.handle_stream(1.0, A("j"), joiner.push_pull_payload(True))
    assert reply is not None
    [pp] = decode_stream(reply)
    assert isinstance(pp, PushPull) and "new1" in pp.fresh and "p1" not in pp.fresh
    assert joiner.complete_push_pull(1.0, A("s"), "join", reply) == (True, "")
    gossiped = [m for msgs in drain(joiner).to_all() for m in msgs] + queued(joiner)  # sent at once, or queued
    spread = {m.name for m in gossiped if isinstance(m, Alive)}
    assert "new1" in spread  # fresh: passed on
    assert "p1" not in spread  # old news: learned, not spread
    assert status(joiner, "p1") == "alive"


def _joined_through(seed: Membership) -> Membership:
    """A new member "j" (lan timing) that has just joined through ``seed`` at time 0."""
    joiner = Membership("j", A("j"), LAN, rng=random.Random(1))
    joiner.join(0.0, [seed.addr])
    drain(joiner)
    reply = seed.handle_stream(0.0, A("j"), joiner.push_pull_payload(True))
    assert joiner.complete_push_pull(0.0, seed.addr, "join", reply)[0]
    drain(joiner)
    return joiner


def _join_and_watch(peers: list[str]) -> Out:
    """What "j" sends as its join through "s" (which knows ``peers``) completes."""
    seed = machine("s", peers)
    joiner = Membership("j", A("j"), LAN, rng=random.Random(1))
    joiner.join(0.0, [seed.addr])
    drain(joiner)
    reply = seed.handle_stream(0.0, A("j"), joiner.push_pull_payload(True))
    assert joiner.complete_push_pull(0.0, seed.addr, "join", reply)[0]
    return drain(joiner)


def test_a_joiner_in_a_small_cluster_tells_every_member_directly() -> None:
    peers = [f"p{i}" for i in range(JOIN_DIRECT)]
    out = _join_and_watch(peers)
    alone = {to for _, to, _, msgs in out.packets if [type(m) for m in msgs] == [Alive] and msgs[0].name == "j"}
    assert alone == set(peers)  # each in a datagram of its own; not the seed, which knows


def test_a_joiner_in_a_larger_cluster_leaves_it_to_gossip() -> None:
    out = _join_and_watch([f"p{i}" for i in range(JOIN_DIRECT + 1)])
    told = {to for _, to, _, msgs in out.packets if any(isinstance(m, Alive) and m.name == "j" for m in msgs)}
    assert 0 < len(told) <= LAN.gossip_nodes  # its gossip round, no more


def test_a_joiner_syncs_once_more_when_news_of_new_members_stops() -> None:
    quiet = LAN.settle_quiet()
    joiner = _joined_through(machine("s", ["p1", "p2"]))
    feed(joiner, 0.3, Alive("late", 0, A("late")))  # news: the quiet period starts again
    assert joiner.next_deadline() <= 0.3 + quiet
    joiner.tick(0.3 + quiet - 0.001)
    assert [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)] == []
    joiner.tick(0.3 + quiet)
    [settle] = [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)]
    assert isinstance(settle, StartPushPull)
    # The first goes back to the member it joined through: in a burst of joins, the
    # seed is the one that has heard from every joiner first.
    assert settle.purpose == "settle" and settle.target == A("s")
    assert joiner.counters.stats["settle_syncs"] == 1
    # The settle finds nothing new.  That peer may lag as we do, so one more, with another
    # peer, confirms it after twice the quiet...
    peer = machine("s", ["p1", "p2", "j", "late"])
    reply = peer.handle_stream(0.4, A("j"), joiner.push_pull_payload(False))
    assert joiner.complete_push_pull(0.4, settle.target, "settle", reply)[0]
    joiner.tick(0.4 + 2 * quiet - 0.001)
    assert [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)] == []
    joiner.tick(0.4 + 2 * quiet)
    [confirm] = [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)]
    assert confirm.purpose == "settle" and confirm.target != settle.target
    assert joiner.counters.stats["settle_syncs"] == 2
    reply = peer.handle_stream(0.7, A("j"), joiner.push_pull_payload(False))
    assert joiner.complete_push_pull(0.7, confirm.target, "settle", reply)[0]
    # ... and after it the burst is over: later news starts no other.
    for t in (1.0, 2.0, 3.0):
        feed(joiner, t, Alive(f"later{t}", 0, A(f"later{t}")))
        joiner.tick(t + 10.0)
        assert [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)] == []
    assert joiner.counters.stats["settle_syncs"] == 2


def test_a_quiet_settle_is_confirmed_and_the_confirmation_finds_the_last_joiner() -> None:
    """The tail this guards against: the first settle's peer had not heard of the member
    that joined last either; the confirming settle, with another peer, brings it."""
    quiet = LAN.settle_quiet()
    joiner = _joined_through(machine("s", ["p1", "p2"]))
    joiner.tick(quiet)
    [settle] = [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)]
    lagging = machine("s", ["p1", "p2", "j"])
    assert joiner.complete_push_pull(0.15, settle.target, "settle",
                                     lagging.handle_stream(0.15, A("j"), joiner.push_pull_payload(False)))[0]
    assert "last" not in joiner.members
    joiner.tick(0.15 + 2 * quiet)
    [confirm] = [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)]
    current = machine("s", ["p1", "p2", "j", "last"])
    assert joiner.complete_push_pull(0.4, confirm.target, "settle",
                                     current.handle_stream(0.4, A("j"), joiner.push_pull_payload(False)))[0]
    assert status(joiner, "last") == "alive"
    # News again: the burst was still spreading, so settling goes on (up to the cap).
    joiner.tick(0.4 + 4 * quiet)
    assert [s.purpose for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)] == ["settle"]


def test_the_first_settle_goes_to_another_peer_when_the_seed_is_gone() -> None:
    quiet = LAN.settle_quiet()
    joiner = _joined_through(machine("s", ["p1", "p2"]))
    feed(joiner, 0.05, Dead("s", 0, "s"))  # the seed left right after our join
    drain(joiner)
    joiner.tick(0.05 + quiet)
    [settle] = [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)]
    assert settle.purpose == "settle" and settle.target in {A("p1"), A("p2")}


def test_an_agent_that_is_leaving_settles_with_no_one_not_even_its_seed() -> None:
    quiet = LAN.settle_quiet()
    joiner = _joined_through(machine("s", ["p1", "p2"]))
    joiner.leave(0.01)
    drain(joiner)
    joiner.tick(quiet + 0.01)
    assert [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)] == []


def test_a_settle_that_gets_no_reply_is_tried_again_with_another_peer() -> None:
    quiet = LAN.settle_quiet()
    joiner = _joined_through(machine("s", ["p1", "p2"]))
    joiner.tick(quiet)
    [settle] = [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)]
    assert not joiner.complete_push_pull(0.15, settle.target, "settle", None, "connection refused")[0]
    joiner.tick(quiet * 2 + 0.001)
    [again] = [s for s in drain(joiner).push_pulls if isinstance(s, StartPushPull)]
    assert again.purpose == "settle" and again.target != settle.target


def settles(m: Membership) -> list[StartPushPull]:
    return [s for s in drain(m).push_pulls if isinstance(s, StartPushPull) and s.purpose == "settle"]


def test_a_settle_that_finds_news_is_followed_by_another_up_to_the_cap() -> None:
    """A lull in a burst of joins looks like its end; the settle then learns of members the
    epidemic has not brought yet, and one more settle follows once the news stops again,
    after a quiet twice as long."""
    quiet = LAN.settle_quiet()
    joiner = _joined_through(machine("s", ["p1"]))
    now = 0.0
    known = ["p1", "j"]
    for round_ in range(SETTLE_MAX + 2):
        wait = quiet * 2 ** min(round_, SETTLE_MAX)  # each lull waited out twice as long as the last
        joiner.tick(now + wait - 0.001)
        assert settles(joiner) == []
        now += wait
        joiner.tick(now)
        starts = settles(joiner)  # (the periodic syncs come due too, at these waits)
        if round_ >= SETTLE_MAX:
            assert starts == []  # the cap: a cluster still churning is left to periodic syncs
            continue
        [settle] = starts
        assert settle.purpose == "settle"
        known.append(f"new{round_}")  # the peer knows a member we have not heard of yet
        reply = machine("s", known).handle_stream(now, A("j"), joiner.push_pull_payload(False))
        assert joiner.complete_push_pull(now, settle.target, "settle", reply)[0]
        assert status(joiner, f"new{round_}") == "alive"
    assert joiner.counters.stats["settle_syncs"] == SETTLE_MAX


def test_join_retries_with_backoff_until_a_seed_answers() -> None:
    cfg = LOCAL
    m = Membership("j", A("j"), cfg, rng=random.Random(3))
    m.join(0.0, [A("s1"), A("s2")])
    assert not m.joined
    now = 0.0
    for attempt in range(1, 10):
        starts = drain(m, now).push_pulls
        assert sorted(s.target for s in starts) == [A("s1"), A("s2")]
        assert all(s.purpose == "join" for s in starts)
        assert m.complete_push_pull(now, A("s1"), "join", None, "connection refused") == (
            False, "connection refused")
        assert drain(m).of_kind("join_retry") == []  # waits for every seed of the attempt
        m.complete_push_pull(now, A("s2"), "join", None, "timed out")
        [retry] = drain(m).of_kind("join_retry")
        base = min(cfg.join_retry_max, cfg.join_retry_min * 2 ** (attempt - 1))
        assert 0.8 * base - 0.01 <= retry["retry_in"] <= 1.2 * base + 0.01  # type: ignore[operator]
        assert m.join_error.endswith("timed out")
        due = now + retry["retry_in"]  # type: ignore[operator]
        m.tick(due - 0.006)  # retry_in is rounded to 10 ms
        assert drain(m).push_pulls == []
        now = due + 0.006
        m.tick(now)
    seed = machine("s1", ["p1"])
    reply = seed.handle_stream(now, A("j"), m.push_pull_payload(True))
    assert m.complete_push_pull(now, A("s1"), "join", reply) == (True, "")
    assert m.joined and m.join_error == ""
    assert {"s1", "p1"} <= set(m.members)


def test_a_join_that_every_seed_refused_is_retried_after_a_gossip_round_backing_off() -> None:
    """Seeds that refuse the connection do not listen yet (started with us): asked again sooner."""
    cfg = LAN
    m = Membership("j", A("j"), cfg, rng=random.Random(4))
    m.join(0.0, [A("s1"), A("s2")])
    now = 0.0
    for attempt in range(1, 10):
        assert len(drain(m, now).push_pulls) == 2
        m.complete_push_pull(now, A("s1"), "join", None, "Connection refused", refused=True)
        m.complete_push_pull(now, A("s2"), "join", None, "Connection refused", refused=True)
        [retry] = drain(m).of_kind("join_retry")
        base = min(cfg.join_retry_max, cfg.gossip_interval * 2 ** (attempt - 1))
        assert 0.8 * base - 0.01 <= retry["retry_in"] <= 1.2 * base + 0.01  # type: ignore[operator]
        now += retry["retry_in"] + 0.006  # type: ignore[operator]
        m.tick(now)
    # One seed that answered badly (a timeout, a wrong key) puts the attempt back on the slower pace.
    assert len(drain(m, now).push_pulls) == 2
    m.complete_push_pull(now, A("s1"), "join", None, "Connection refused", refused=True)
    m.complete_push_pull(now, A("s2"), "join", None, "timed out")
    [retry] = drain(m).of_kind("join_retry")
    base = min(cfg.join_retry_max, cfg.join_retry_min * 2 ** 9)
    assert 0.8 * base - 0.01 <= retry["retry_in"] <= 1.2 * base + 0.01  # type: ignore[operator]


def test_periodic_sync_runs_every_interval_with_a_member_still_here() -> None:
    m = machine("a", ["b", "c"])
    feed(m, 0.0, Dead("c", 0, "c"))  # c left for good
    out = pump(m, LOCAL.push_pull_interval * 3, answering(["b"]))
    syncs = [s for s in out.push_pulls if s.purpose == "sync"]
    assert len(syncs) in (2, 3) and all(s.target == A("b") for s in syncs)


def test_reconnect_retries_dead_members_but_not_departed_ones() -> None:
    m = machine("a", ["b", "c", "d"])
    feed(m, 0.0, Dead("c", 0, "b"), Dead("d", 0, "d"))  # c failed, d left
    out = pump(m, 4 * LOCAL.reconnect_interval, answering(["b"]))
    reconnects = [s for s in out.push_pulls if s.purpose == "reconnect"]
    assert len(reconnects) >= 3 and {s.target for s in reconnects} == {A("c")}
    # Until reconnect_timeout after the verdict, not for ever.
    out = pump(m, LOCAL.reconnect_timeout + 4 * LOCAL.reconnect_interval, answering(["b"]))
    late = [s for s in out.push_pulls if s.purpose == "reconnect"]
    assert late and all(s.target == A("c") for s in late)
    out = pump(m, LOCAL.reconnect_timeout + 10 * LOCAL.reconnect_interval, answering(["b"]))
    assert not [s for s in out.push_pulls if s.purpose == "reconnect"]


def test_a_reconnect_exchange_revives_a_member_on_both_sides() -> None:
    a = machine("a", ["b", "x"])
    feed(a, 0.0, Dead("x", 0, "b"))
    x = machine("x", ["a", "b"])  # x was cut off but is fine
    reply = x.handle_stream(1.0, A("a"), a.push_pull_payload(False))
    assert x.me.incarnation == 1  # x learned it was declared dead, and refuted
    assert a.complete_push_pull(1.0, A("x"), "reconnect", reply) == (True, "")
    assert (status(a, "x"), a.members["x"].incarnation) == ("alive", 1)


def test_a_seed_that_failed_at_join_is_retried_until_it_answers() -> None:
    m = machine("a")
    m.join(0.0, [A("s1"), A("s2")])
    joins = drain(m).push_pulls
    assert {j.target for j in joins} == {A("s1"), A("s2")}
    s1 = machine("s1", ["b"])
    reply = s1.handle_stream(0.1, A("a"), m.push_pull_payload(True))
    assert m.complete_push_pull(0.1, A("s1"), "join", reply)[0]
    m.complete_push_pull(0.2, A("s2"), "join", None, "connection refused")
    out = pump(m, 3 * LOCAL.reconnect_interval, answering(["s1", "b"]))
    retried = [s.target for s in out.push_pulls if s.purpose == "reconnect"]
    assert retried and set(retried) == {A("s2")}
    # Once it answers (a partition lifted), it is not retried any more.
    s2 = machine("s2", ["c"])
    reply = s2.handle_stream(10.0, A("a"), m.push_pull_payload(False))
    assert m.complete_push_pull(10.0, A("s2"), "reconnect", reply)[0]
    assert status(m, "s2") == "alive" and status(m, "c") == "alive"
    out = pump(m, 10 * LOCAL.reconnect_interval, answering(["s1", "b", "s2", "c"]))
    assert not [s for s in out.push_pulls if s.purpose == "reconnect"]


# -- packing and retransmission --------------------------------------------------------------------


def big_cluster(n: int, tag_len: int, config: GossipConfig = LOCAL, **kwargs: object) -> Membership:
    m = machine("a", config=config, **kwargs)
    for i in range(n):
        tags = {f"service-{j}": f"{i}-{j}-".ljust(tag_len, "x") for j in range(6)}
        feed(m, 0.0, Alive(f"m{i:03d}", 0, A(f"m{i:03d}"), tags))
    m.drain()
    return m


def test_datagrams_never_exceed_the_packet_size_and_pack_many_updates() -> None:
    m = big_cluster(300, 30)
    assert len(m.broadcasts) == 301
    names = [n for n in m.members if n != "a"]
    for i, n in enumerate(names[:20]):  # pings, whose acks carry updates too
        feed(m, 0.01 * i, Ping(i, "a", n), src=n)
    out = drain(m)
    out.extend(pump(m, 3.0, answering(names)))
    limit = LOCAL.udp_packet_size - SEAL_OVERHEAD
    sizes = [len(p) for _, _, p, _ in out.packets]
    assert len(sizes) > 50 and max(sizes) <= limit
    # Several updates ride in one datagram, and datagrams are filled, not just started.
    assert max(len(msgs) for _, _, _, msgs in out.packets) >= 3
    assert max(sizes) > limit - 250
    # Each ack still leads its datagram.
    acks = [msgs for _, _, _, msgs in out.packets if isinstance(msgs[0], Ack)]
    assert len(acks) >= 20 and all(len(msgs) > 1 for msgs in acks[:20])


@SETTINGS
@given(
    size=st.integers(min_value=300, max_value=1500),
    n=st.integers(min_value=1, max_value=40),
    tag_len=st.integers(min_value=0, max_value=120),
    sealed=st.booleans(),
)
def test_packing_respects_any_packet_size(size: int, n: int, tag_len: int, sealed: bool) -> None:
    overhead = SEAL_OVERHEAD if sealed else 0
    config = LOCAL.with_overrides({"udp_packet_size": size})
    m = big_cluster(n, tag_len, config=config, seal_overhead=overhead)
    names = [x for x in m.members if x != "a"]
    out = pump(m, 2.0, answering(names))
    assert out.packets
    for _, _, payload, _ in out.packets:
        assert len(payload) + overhead <= size


def test_each_update_is_retransmitted_exactly_the_limit() -> None:
    m = machine("a", PEERS9)
    pump(m, 2.0, answering(PEERS9))  # let the join gossip run out
    assert len(m.broadcasts) == 0
    update = Alive("p4", 1, A("p4"), {"v": "2"})
    feed(m, 2.0, update, src="p4")
    out = pump(m, 10.0, answering(PEERS9))
    carried = sum(msgs.count(update) for _, _, _, msgs in out.packets)
    assert carried == LOCAL.retransmit_limit(10) == 6
    # Gossip rounds stop once the queue is empty: later datagrams are probes and acks only.
    last = max(t for t, _, _, msgs in out.packets if update in msgs)
    assert all(isinstance(msgs[0], (Ping, PingReq)) for t, _, _, msgs in out.packets if t > last)


# -- leaving and reaping ---------------------------------------------------------------------------


def test_graceful_leave() -> None:
    m = machine("a", ["b", "c", "d"])
    pump(m, 1.0, answering(["b", "c", "d"]))
    m.leave(1.0)
    assert m.me.status is Status.LEFT and m.leaving
    out = drain(m, 1.0)
    assert any(Dead("a", 0, "a") in msgs for msgs in out.to("b") + out.to("c") + out.to("d"))
    assert out.member_events("a")[0]["status"] == "left"
    out = pump(m, 5.0, answering(["b", "c", "d"]))
    assert not any(isinstance(x, Ping) for x in out.messages())  # no more probes
    assert m.leave_spread(5.0)
    # While leaving, accusations are not refuted.
    feed(m, 5.0, Suspect("a", 0, "b"), Dead("a", 0, "b"))
    assert m.me.incarnation == 0 and m.me.status is Status.LEFT
    # A peer that hears the leave shows "left", which is not "dead".
    b = machine("b", ["a", "c"])
    for _, dst, payload, _ in out.packets:
        if dst == "b":
            b.receive(5.0, A("a"), payload)
    b.receive(5.0, A("a"), encode_packet([Dead("a", 0, "a")]))
    assert status(b, "a") == "left"


def test_leave_spread_waits_for_the_retransmit_budget() -> None:
    peers = [*PEERS9, "p10"]
    m = machine("a", peers)
    pump(m, 2.0, answering(peers))
    m.leave(2.0)
    leave = Dead("a", 0, "a")
    # Every live peer is told directly (below LEAVE_DIRECT); the rest is its gossip budget.
    sent = sum(msgs.count(leave) for msgs in drain(m).to_all()) - len(peers)
    assert 0 < sent < LOCAL.retransmit_limit(10)
    assert not m.leave_spread(2.0)
    now = 2.0
    while not m.leave_spread(now):
        now = m.next_deadline()
        assert now < 3.0
        m.tick(now)
        sent += sum(msgs.count(leave) for msgs in drain(m).to_all())
    assert sent == LOCAL.retransmit_limit(10)


def test_a_leave_is_told_directly_to_live_members_up_to_a_bound() -> None:
    peers = [f"p{i}" for i in range(LEAVE_DIRECT + 10)]
    m = machine("a", [*peers, "gone"])
    feed(m, 1.0, Dead("gone", 0, "p0"))
    m.leave(1.0)
    out = drain(m, 1.0)
    told = {dst for _, dst, _, msgs in out.packets if msgs == [Dead("a", 0, "a")]}
    assert len(told) == LEAVE_DIRECT and told <= set(peers)  # never the dead, never more
    small = machine("a", ["b", "c"])
    small.leave(1.0)
    assert {dst for _, dst, _, msgs in drain(small, 1.0).packets if msgs == [Dead("a", 0, "a")]} == {"b", "c"}


def test_leave_spread_when_only_long_dead_members_remain() -> None:
    # Regression: leave_spread() looked at gossip targets as of time 0, so long-dead
    # members counted as targets and the leave was never considered spread.
    m = machine("a", ["b"])
    feed(m, 10.0, Dead("b", 0, "c"))
    now = 10.0 + LOCAL.gossip_to_the_dead + 1
    m.tick(now)
    m.leave(now)
    out = drain(m)
    out.extend(pump(m, now + 5.0))
    assert out.packets == []  # nobody is left to tell
    assert m.leave_spread(now + 5.0)


def test_a_leave_heard_after_our_own_dead_verdict_still_shows_left() -> None:
    # Regression: a node that missed the leave broadcast and timed out its own suspicion
    # first showed the departed member as "dead" for good, even after push-pull.
    for deliver in ("gossip", "push-pull"):
        m = known(5)
        feed(m, 0.0, Suspect("x", 5, "b"))  # we missed x's leave and suspect it instead
        m.tick(100.0)
        assert status(m, "x") == "dead"
        if deliver == "gossip":
            feed(m, 101.0, Dead("x", 5, "x"))
        else:
            m.handle_stream(101.0, A("b"), encode_packet([PushPull("b", False, [
                MemberRecord("b", A("b"), 0, "alive"), MemberRecord("x", A("x"), 5, "left")])]))
        assert status(m, "x") == "left", deliver


def test_dead_and_left_members_are_reaped_after_dead_reap_after() -> None:
    m = machine("a", ["b", "c", "d"])
    feed(m, 10.0, Dead("b", 0, "x"), Dead("c", 0, "c"))
    reap_after = LOCAL.dead_reap_after
    m.tick(10.0 + reap_after - 1.0)
    assert status(m, "b") == "dead" and status(m, "c") == "left"
    m.tick(10.0 + reap_after + 60.0)
    assert "b" not in m.members and "c" not in m.members
    assert status(m, "d") == "alive" and status(m, "a") == "alive"
    reaped = drain(m).of_kind("member_reaped")
    assert sorted(str(r["name"]) for r in reaped) == ["b", "c"]


def test_introspection() -> None:
    m = known(5, "suspect")
    assert [x.name for x in m.member_list()] == ["a", "b", "c", "d", "x"]
    assert m.count_by_status() == {"alive": 4, "suspect": 1, "dead": 0, "left": 0}
    assert m.num_up() == 5


# == whole clusters on the simulated network ==========================================================


def sim(config: GossipConfig = LOCAL, seed: int = 0, loss: float = 0.0) -> Sim:
    return Sim(config, seed=seed, net=NetModel.uniform(loss=loss), check_packets=True, check_deadlines=True,
               keep_events=True)


def converged_cluster(n: int = 10, config: GossipConfig = LOCAL, seed: int = 0,
                      loss: float = 0.0) -> Sim:
    net = sim(config, seed=seed, loss=loss)
    net.join_cluster(n)
    assert net.run_until(net.agree_all_alive, 30.0)
    return net


def test_ten_nodes_join_through_one_seed_and_converge() -> None:
    net = sim(LOCAL, seed=1)
    nodes = net.join_cluster(10)
    assert net.run_until(net.agree_all_alive, 5.0)
    assert net.now < 2.0
    assert all(n.m.joined for n in nodes)
    assert all(n.m.me.incarnation == 0 for n in nodes)
    assert net.member_events("suspect") == [] and net.member_events("dead") == []
    # Every node learned every other through gossip or push-pull, once each.
    joined = [(o, f["name"]) for _, o, f in net.member_events("alive") if f["reason"] == "joined"]
    assert len(joined) == len(set(joined)) == 10 * 9


def test_the_simulation_is_deterministic() -> None:
    def trace() -> list[tuple[float, str, str, str]]:
        net = converged_cluster(6, seed=5, loss=0.05)
        net.crash("n2")
        net.run(20.0)
        return [(t, o, kind, repr(sorted(fields.items()))) for t, o, kind, fields in net.events]

    first = trace()
    assert len(first) > 30  # a run with a crash: joins, suspicions, deaths
    assert trace() == first


@pytest.mark.parametrize("config", [LOCAL, LAN], ids=["local", "lan"])
def test_a_crashed_node_is_declared_dead_everywhere_in_bounded_time(config: GossipConfig) -> None:
    net = converged_cluster(10, config)
    crashed_at = net.now
    net.crash("n3")
    bound = config.probe_interval + config.suspicion_max(10)
    assert net.run_until(lambda: net.all_see("n3", "dead"), bound)
    suspected = min(t for t, _, f in net.member_events("suspect") if f["name"] == "n3")
    # Lifeguard: independent confirmations cut the timeout well below its max.
    assert net.now - suspected < config.suspicion_max(10) / 2
    assert net.now - crashed_at <= bound
    # Nobody else was hurt, and the verdict sticks.
    net.run(30.0)
    assert {f["name"] for _, _, f in net.member_events("dead")} == {"n3"}
    assert net.all_see("n3", "dead")
    assert net.agree_all_alive([n for n in net.by_name if n != "n3"])


def test_no_false_positives_without_loss() -> None:
    net = converged_cluster(10, seed=2)
    net.run(180.0)
    assert net.member_events("suspect") == []
    assert net.member_events("dead") == []
    assert sum(n.m.counters.stats["probe_failures"] for n in net.by_name.values()) == 0
    assert net.agree_all_alive()


def test_lifeguard_keeps_healthy_nodes_alive_under_ten_percent_loss() -> None:
    # LAN, memberlist's defaults.  (LOCAL, with its shorter timeouts and fewer
    # retransmits, does lose healthy nodes here: see the stale buddy test above.)
    # Without the TCP fallback probe, so that loss does cause suspicions to refute.
    net = converged_cluster(10, dataclasses.replace(LAN, tcp_fallback=False), seed=3, loss=0.10)
    net.run(180.0)
    # Loss did cause suspicions, and every one was refuted in time.
    assert len(net.member_events("suspect")) > 20
    assert sum(n.m.counters.stats["refutations"] for n in net.by_name.values()) > 5
    assert net.member_events("dead") == []
    assert net.agree_all_alive()
    assert net.packets_lost > 0


def test_the_tcp_fallback_probe_spares_members_the_suspicions_that_loss_causes() -> None:
    net = converged_cluster(10, LAN, seed=3, loss=0.10)
    net.run(180.0)
    saves = sum(n.m.counters.stats["tcp_fallback_saves"] for n in net.by_name.values())
    assert saves >= 10  # probes that loss would have turned into suspicions ended well over TCP
    assert len(net.member_events("suspect")) < 5 and net.member_events("dead") == []
    assert net.agree_all_alive()


def test_a_paused_node_is_declared_dead_then_refutes_after_resuming() -> None:
    net = converged_cluster(10, seed=4)
    inc = net.by_name["n4"].m.me.incarnation
    paused_at = net.now
    net.pause("n4")
    assert net.run_until(lambda: net.all_see("n4", "dead"), LOCAL.probe_interval + LOCAL.suspicion_max(10))
    net.run(LOCAL.suspicion_max(10))  # stay frozen for well past the suspicion timeout
    assert net.now - paused_at > LOCAL.suspicion_max(10)
    resumed_at = net.now
    net.resume("n4")
    assert net.run_until(lambda: net.all_see("n4", "alive"), 10.0)
    assert net.now - resumed_at < 2.0  # ping replies tell it at once
    new_inc = net.by_name["n4"].m.me.incarnation
    assert new_inc > inc
    assert {net.incarnation(o, "n4") for o in net.by_name} == {new_inc}
    assert net.run_until(net.agree_all_alive, 10.0)
    # Only the paused node was ever declared dead.
    assert {f["name"] for _, _, f in net.member_events("dead")} == {"n4"}


@pytest.mark.parametrize("wait_for_death", [False, True], ids=["quick", "after-death"])
def test_a_restarted_node_rejoins_with_a_higher_incarnation(wait_for_death: bool) -> None:
    net = converged_cluster(10, seed=5)
    net.set_tags("n5", {"version": "1"})  # incarnation 1 in its first life
    assert net.run_until(lambda: all(net.incarnation(o, "n5") == 1 for o in net.by_name), 5.0)
    net.crash("n5")
    if wait_for_death:
        assert net.run_until(lambda: net.all_see("n5", "dead"), 10.0)
    else:
        net.run(0.2)
        assert net.all_see("n5", "alive")
    node = net.restart("n5", seeds=["n0"], tags={"version": "2"})
    assert node.m.me.incarnation == 0
    assert net.run_until(lambda: net.agree_all_alive() and all(
        net.incarnation(o, "n5") == node.m.me.incarnation for o in net.by_name), 10.0)
    assert node.m.me.incarnation >= 2  # outbid its first life's incarnation 1
    assert all(net.by_name[o].m.members["n5"].tags == {"version": "2"} for o in net.by_name)


def test_graceful_leave_shows_left_everywhere() -> None:
    net = converged_cluster(10, seed=6)
    net.leave("n2")
    assert net.run_until(lambda: net.by_name["n2"].m.leave_spread(net.now), LOCAL.leave_propagate_timeout)
    net.crash("n2")  # the agent exits once the leave has spread
    # Gossip carries it to most at once; push-pull anti-entropy to the rest.
    assert net.run_until(lambda: net.all_see("n2", "left"), LOCAL.push_pull_interval + 2.0)
    net.run(60.0)
    assert net.all_see("n2", "left")
    assert net.member_events("dead") == []
    assert net.agree_all_alive()


def test_local_health_rises_on_a_node_that_cannot_receive() -> None:
    net = converged_cluster(10, seed=7)
    for other in net.by_name:
        if other != "n3":
            net.block(other, "n3")  # n3 sends fine but hears no acks (nor anything else)
    net.run(10.0)
    deaf = net.by_name["n3"].m
    top = LOCAL.awareness_max_multiplier - 1
    assert deaf.awareness.score == top
    before = {n: node.m.counters.stats["probes"] for n, node in net.by_name.items()}
    net.run(20.0)
    probes = {n: node.m.counters.stats["probes"] - before[n] for n, node in net.by_name.items()}
    # It stretched its probe interval 8x instead of accusing everyone at full speed.
    assert probes["n3"] <= 20.0 / (LOCAL.probe_interval * (top + 1)) + 1
    assert min(v for n, v in probes.items() if n != "n3") >= 30
    assert max(node.m.awareness.score for n, node in net.by_name.items() if n != "n3") <= 1
    net.heal()
    assert net.run_until(net.agree_all_alive, 30.0)
    net.run(30.0)
    assert deaf.awareness.score == 0


def test_a_healed_partition_merges_again() -> None:
    # Regression: once a partition outlasted gossip_to_the_dead nothing crossed it again
    # (probes, gossip and sync only go to members seen alive): the halves stayed split.
    net = converged_cluster(6, seed=8)
    left, right = ["n0", "n1", "n2"], ["n3", "n4", "n5"]
    net.partition(left, right)
    net.run(LOCAL.suspicion_max(6) + LOCAL.gossip_to_the_dead + 5.0)
    assert all(net.status(a, b) == "dead" for a in left for b in right)
    net.heal()
    assert net.run_until(net.agree_all_alive, LOCAL.reconnect_interval + 5.0)
    # Each side refuted the other's dead verdict with a new incarnation.
    assert all(node.m.me.incarnation == 1 for node in net.by_name.values())


def test_view_version_moves_with_every_change_a_member_view_shows() -> None:
    """The API caches its member list on view_version(); a stale cache would lie."""
    net = sim(LOCAL, seed=3)
    net.join_cluster(3)
    assert net.run_until(lambda: net.agree_all_alive(), 10)
    m = net.by_name["n0"].m
    seen = [m.view_version()]

    def moved() -> bool:
        v = m.view_version()
        changed = v != seen[-1]
        seen.append(v)
        return changed

    net.run(0.001)
    moved()
    target = m.members["n1"]
    target.rtt = 0.5  # what an ack does
    assert moved()
    net.crash("n2")
    assert net.run_until(lambda: net.status("n0", "n2") == "dead", 30)
    assert moved()
    net.add("n3", seeds=["n0"])
    assert net.run_until(lambda: net.status("n0", "n3") == "alive", 10)
    assert moved()
    assert not moved()  # nothing happened in between: the cache may be reused


def test_an_overflowing_broadcast_queue_drops_counted_and_reported_not_silently() -> None:
    m = machine("a", ["b"])
    m.broadcasts.min_depth = 8
    for i in range(40):  # a flood of queries: each its own update, none replaces another
        feed(m, 1.0 + i * 0.01, Query(i, "b", A("b"), "keys", b"x"), src="b")
    feed(m, 1.5, Alive("c", 0, A("c")))
    out = drain(m, 2.0)
    assert m.counters.stats["broadcasts_dropped"] >= 40 - m.broadcasts.max_depth
    assert len(m.broadcasts) <= m.broadcasts.max_depth
    [report] = out.of_kind("broadcasts_dropped")  # once per 10 s, with the running total
    assert report["bound"] == m.broadcasts.max_depth
    assert any(isinstance(x, Alive) and x.name == "c" for x in queued(m))  # the alive was kept


def test_a_seed_list_that_names_this_agent_too_is_no_error() -> None:
    m = machine("a")
    m.join(0.0, [A("a"), A("b"), ("alias-of-a.test", 7946)])  # its own address is dropped at once
    starts = drain(m).push_pulls
    assert {s.target for s in starts} == {A("b"), ("alias-of-a.test", 7946)}
    # The alias turns out to be this agent itself: it answers its own push-pull with a refusal
    # that says so, which is neither logged as a conflict nor retried.
    reply = m.handle_stream(0.1, ("alias-of-a.test", 7946), m.push_pull_payload(True))
    assert m.complete_push_pull(0.1, ("alias-of-a.test", 7946), "join", reply) == (
        False, "that seed is this agent itself")
    out = drain(m)
    assert not out.of_kind("join_refused") and not out.of_kind("join_refused_by_peer")
    assert m.counters.stats["push_pull_self"] == 1
    # What decides is the refusal's code, not its sentence: the same words without it are a refusal.
    words = encode_packet([PushPull("x", False, [], "that is this agent itself")])
    assert m.complete_push_pull(0.15, A("x"), "explicit", words) == (
        False, "refused by x: that is this agent itself")
    b = machine("b")
    reply = b.handle_stream(0.2, A("a"), m.push_pull_payload(True))
    assert m.complete_push_pull(0.2, A("b"), "join", reply)[0] and m.joined
    out = pump(m, 5 * LOCAL.reconnect_interval, answering(["b"]))
    assert not [s for s in out.push_pulls if getattr(s, "target", None) == ("alias-of-a.test", 7946)]
    # Alone with only itself as seed: it is the first agent, joined, no error.
    solo = machine("s")
    solo.join(0.0, [("other-name-of-s.test", 7946)])
    reply = solo.handle_stream(0.1, ("other-name-of-s.test", 7946), solo.push_pull_payload(True))
    solo.complete_push_pull(0.1, ("other-name-of-s.test", 7946), "join", reply)
    assert solo.joined and solo.join_error == ""


def test_the_kept_up_count_matches_a_recount_through_joins_deaths_and_reaping() -> None:
    cfg = dataclasses.replace(LOCAL, dead_reap_after=5.0)
    net = converged_cluster(8, cfg, seed=11)
    m = net.by_name["n0"].m

    def recount() -> int:
        return sum(1 for x in m.members.values() if x.status.up)

    assert m.num_up() == recount() == 8
    net.add("late", seeds=["n1"])
    net.run(3.0)
    assert m.num_up() == recount() == 9
    net.crash("n3")
    net.leave("n4")
    assert net.run_until(lambda: m.members["n3"].status.value == "dead", 30.0)
    assert m.num_up() == recount() == 7
    net.run(20.0)  # reaped
    assert "n3" not in m.members and m.num_up() == recount() == 7


# -- accusations are bounded by what the accused announced -----------------------------------------


@pytest.mark.parametrize("claim", [Suspect("x", 6, "b"), Dead("x", 6, "b"), Dead("x", 2**63 - 1, "b"),
                                   Dead("x", 6, "x"), Suspect("x", 2**63 - 1, "c")])
def test_an_accusation_beyond_the_members_own_incarnation_is_dropped_and_counted(claim: Message) -> None:
    m = known(5)
    feed(m, 1.0, claim)
    assert (status(m, "x"), m.members["x"].incarnation) == ("alive", 5)
    assert m.counters.drops["accusation_beyond_alive"] == 1
    assert claim not in queued(m)  # not spread either
    feed(m, 2.0, Suspect("x", 5, "b"))  # an honest one still counts
    assert status(m, "x") == "suspect"


def test_an_accusation_no_refutation_could_outbid_is_ignored_by_its_target() -> None:
    m = machine("a", ["b"])
    feed(m, 1.0, Dead("a", 2**63 - 1, "b"))
    assert m.me.incarnation < 2**63 - 1 and m.counters.drops["accusation_beyond_alive"] == 1
    # A restarted agent still refutes its past self's death at a higher incarnation.
    feed(m, 2.0, Dead("a", 57, "b"))
    assert m.me.incarnation == 58


insider = st.lists(st.tuples(st.sampled_from(["suspect", "dead"]), st.integers(0, 2**63 - 1),
                             st.sampled_from(["b", "c", "x"])), max_size=30)


@SETTINGS
@given(insider)
def test_no_insider_sequence_of_accusations_outbids_a_live_members_refutation(seq: list[tuple[str, int, str]]) -> None:
    """Whatever a key holder sends, x's own alive one above what was accused always wins again."""
    m = known(3, config=LAN)
    for kind, inc, src in seq:
        msg: Message = Suspect("x", inc, src) if kind == "suspect" else Dead("x", inc, src)
        feed(m, 1.0, msg)
        held = m.members["x"].incarnation
        assert held == 3  # accusations never raise it: only x's alive does
    refute = Alive("x", m.members["x"].incarnation + 1, A("x"), {"v": "1"})
    feed(m, 2.0, refute)
    assert status(m, "x") == "alive" and m.members["x"].incarnation == 4


# -- force-leave ------------------------------------------------------------------------------------


@pytest.mark.parametrize("st_", ["dead", "suspect", "alive"])
def test_force_leave_marks_a_member_left_and_spreads_it(st_: str) -> None:
    m = known(5, st_)
    assert m.force_leave(1.0, "x") == st_
    assert status(m, "x") == "left" and m.members["x"].incarnation == 5
    assert Dead("x", 5, "x") in queued(m)
    assert drain(m).member_events("x")[-1]["reason"] == "forced to leave by a"
    assert m.force_leave(2.0, "x") == "left"  # again: nothing more
    with pytest.raises(KeyError):
        m.force_leave(1.0, "nobody")
    with pytest.raises(ValueError):
        m.force_leave(1.0, "a")


def test_a_live_member_forced_to_leave_refutes_and_stays() -> None:
    x = machine("x", ["a"])
    feed(x, 1.0, Dead("x", x.me.incarnation, "x"))  # the force-leave, as x hears it
    assert x.me.status is Status.ALIVE and x.me.incarnation == 1


def test_a_rejoining_agent_refutes_its_own_earlier_leave_by_that_name() -> None:
    m = machine("n6", ["b"])
    feed(m, 1.0, Dead("n6", 3, "n6"))  # what peers still hold after our last run left
    refute = [e for e in drain(m).events if e.kind == "refute"]
    assert refute and refute[-1].fields["reason"] == "an earlier leave of this agent"
    feed(m, 2.0, Dead("n6", m.me.incarnation, "b"))
    assert [e for e in drain(m).events if e.kind == "refute"][-1].fields["reason"] == "declared dead by b"
