"""Names bound to keys (gossip.signing): signed alives, forgeries refused, moves by the key's owner accepted."""

from __future__ import annotations

import os
import random

from gossip.config import LOCAL
from gossip.registry import Instance, Registry
from gossip.signing import Signer, Verifier, alive_bytes
from gossip.swim import VERIFY_DELAY, Membership
from gossip.wire import Address, Alive, Dead, PushPull, Suspect, decode_packet, decode_stream, encode_packet


def A(name: str, port: int = 7946) -> Address:
    return (f"{name}.test", port)


def signer() -> Signer:
    return Signer(os.urandom(32))


def signed(s: Signer, name: str, inc: int, addr: Address, tags: dict[str, str] | None = None) -> Alive:
    tags = tags or {}
    return Alive(name, inc, addr, tags, None, None, s.public, s.sign(alive_bytes(name, addr, inc, tags, None, None)))


def machine(name: str = "a") -> Membership:
    m = Membership(name, A(name), LOCAL, rng=random.Random(name), signer=signer())
    m.drain()
    return m


def feed(m: Membership, now: float, *msgs: Alive) -> None:
    m.receive(now, A("z"), encode_packet(list(msgs)))
    m.drain()


def test_our_alive_is_signed_and_survives_the_wire() -> None:
    m = machine("a")
    [alive] = [x for x in decode_packet(encode_packet([Alive("a", 0, A("a"), {}, None, None, m.me.identity,
                                                             m.me.sig)]))]
    assert isinstance(alive, Alive) and alive.identity == m.signer.public  # type: ignore[union-attr]
    assert Verifier().verify(alive.identity, alive_bytes("a", A("a"), 0, {}, None, None), alive.sig or b"")
    # And push-pull records carry it, so a newcomer can check every member it learns.
    [pp] = decode_stream(m.push_pull_payload(True))
    assert isinstance(pp, PushPull) and pp.members[0].sig == m.me.sig


def settle_checks(m: Membership, now: float) -> list[str]:
    """Tick once the first-sight checks of what arrived at ``now`` are due; the events' kinds."""
    m.tick(now + VERIFY_DELAY)
    return [ev.kind for ev in m.drain()[1]]


def test_a_forged_alive_is_rejected_and_counted() -> None:
    m = machine()
    b = signer()
    good = signed(b, "b", 0, A("b"))
    # First sight: taken at once, its signature checked VERIFY_DELAY later.
    feed(m, 1.0, good._replace(incarnation=5))  # signature over other fields
    assert "b" in m.members and m.counters.drops["bad_signature"] == 0
    assert "member_forged" in settle_checks(m, 1.0)
    assert "b" not in m.members and m.counters.drops["bad_signature"] == 1
    feed(m, 2.0, good._replace(sig=bytes(64)))
    settle_checks(m, 2.0)
    assert "b" not in m.members and m.counters.drops["bad_signature"] == 2
    feed(m, 3.0, Alive("b", 0, A("b")))  # unsigned, in a signed cluster: refused at once
    assert m.counters.drops["unsigned_alive"] == 1 and "b" not in m.members
    feed(m, 4.0, good)
    assert settle_checks(m, 4.0) == []
    assert m.members["b"].identity == b.public and m.counters.drops["bad_signature"] == 2


def test_first_sight_checks_come_verify_delay_after_arrival() -> None:
    m = machine()
    signers = {f"n{i}": signer() for i in range(6)}
    forged = signed(signers["n0"], "n0", 0, A("n0"))
    forged = forged._replace(addr=A("elsewhere"))  # a relay changed the address
    feed(m, 1.0, forged)
    # A burst of joins goes on: nothing is checked during it ...
    for i in range(1, 6):
        feed(m, 1.0 + 0.15 * i, signed(signers[f"n{i}"], f"n{i}", 0, A(f"n{i}")))
        m.tick(1.0 + 0.15 * i)
        m.drain()
        assert "n0" in m.members
    assert m.verifier.checked == 0
    # ... until VERIFY_DELAY after the first arrived: it and those close behind it are checked.
    assert m.next_deadline() <= 1.0 + VERIFY_DELAY
    m.tick(1.0 + VERIFY_DELAY)
    assert "n0" not in m.members and m.counters.drops["bad_signature"] == 1
    assert not m.broadcasts.pending("n0")  # the forgery is not spread any further
    assert m.num_up() == len(m.members) == 6  # the up count follows the forgotten member
    assert 1 <= m.verifier.checked < 6
    m.tick(1.75 + VERIFY_DELAY)
    assert all(f"n{i}" in m.members for i in range(1, 6)) and m.verifier.checked == 6


def test_the_data_plane_trusts_a_tunnel_key_only_once_checked() -> None:
    m = machine()
    b = signer()
    tunnel = (A("b", 7950), os.urandom(32))
    sig = b.sign(alive_bytes("b", A("b"), 0, {}, None, tunnel))
    feed(m, 1.0, Alive("b", 0, A("b"), {}, None, tunnel, b.public, sig))
    assert m.verifier.checked == 0
    assert m.checked("b") and m.verifier.checked == 1  # checked on demand, once
    assert m.checked("b") and m.verifier.checked == 1
    # A tunnel key swapped on the way is caught when the data plane asks, not later.
    forged = Alive("c", 0, A("c"), {}, None, (A("c", 7950), os.urandom(32)), b.public, sig)
    feed(m, 1.0, forged)
    assert not m.checked("c") and "c" not in m.members and m.counters.drops["bad_signature"] == 1
    assert not m.checked("nobody")


def test_an_update_to_an_unchecked_member_checks_what_we_hold_first() -> None:
    m = machine()
    b, mallory = signer(), signer()
    # Mallory's alive for b, under b's key but not signed by it, arrives first ...
    feed(m, 1.0, signed(b, "b", 0, A("b"))._replace(addr=A("mallory")))
    assert m.members["b"].addr == A("mallory")
    # ... then b's own: the record held is checked, found forged, and b's taken instead.
    feed(m, 1.1, signed(b, "b", 1, A("b")))
    assert m.members["b"].addr == A("b") and m.counters.drops["bad_signature"] == 1
    # A different key for a name held unchecked but genuine: refused as before.
    feed(m, 1.2, signed(mallory, "b", 9, A("mallory")))
    assert m.members["b"].identity == b.public and m.counters.drops["identity_conflict"] == 1


def test_another_key_cannot_take_a_live_name_or_refute_for_it() -> None:
    m = machine()
    b, mallory = signer(), signer()
    feed(m, 1.0, signed(b, "b", 3, A("b")))
    # Mallory holds the cluster key and signs correctly -- with her own key.
    feed(m, 2.0, signed(mallory, "b", 99, A("mallory")))
    rec = m.members["b"]
    assert (rec.addr, rec.incarnation, rec.identity) == (A("b"), 3, b.public)
    assert m.counters.drops["identity_conflict"] == 1 and m.counters.stats["name_conflicts"] == 1
    # Nor refute a suspicion of b: while b is suspect (still up) only b's key counts.
    m.rules.on_suspect(3.0, Suspect("b", 3, "c"))
    m.drain()
    feed(m, 4.0, signed(mallory, "b", 100, A("b")))
    assert (m.members["b"].status.value, m.members["b"].identity) == ("suspect", b.public)
    feed(m, 4.5, signed(b, "b", 4, A("b")))  # b itself can
    assert m.members["b"].status.value == "alive"


def test_the_owner_moves_its_name_to_a_new_address_at_once() -> None:
    m = machine()
    b = signer()
    feed(m, 1.0, signed(b, "b", 3, A("b")))
    feed(m, 2.0, signed(b, "b", 4, A("b", 8000)))  # restarted at a new port, same key
    rec = m.members["b"]
    assert (rec.addr, rec.incarnation, rec.status.value) == (A("b", 8000), 4, "alive")
    feed(m, 3.0, signed(b, "b", 3, A("b")))  # its stale old alive does not move it back
    assert m.members["b"].addr == A("b", 8000)


def test_a_dead_name_may_be_taken_by_a_new_key() -> None:
    m = machine()
    old, new = signer(), signer()
    feed(m, 1.0, signed(old, "b", 0, A("b")))
    m.rules.on_dead(2.0, Dead("b", 0, "c"))
    m.drain()
    m.receive(3.0, A("z"), encode_packet([signed(new, "b", 1, A("b", 9000))]))
    _, events = m.drain()
    assert [e.kind for e in events if e.kind == "member_rekeyed"] == ["member_rekeyed"]  # logged, not silent
    rec = m.members["b"]
    assert rec.identity == new.public and rec.status.value == "alive" and rec.addr == A("b", 9000)


def test_a_restarted_member_with_its_key_may_join_at_a_new_address() -> None:
    seed = machine("s")
    key_seed = os.urandom(32)
    first = Membership("b", A("b"), LOCAL, rng=random.Random(1), signer=Signer(key_seed))
    reply = seed.handle_stream(1.0, A("b"), first.push_pull_payload(True))
    assert reply is not None and not decode_stream(reply)[0].refused  # type: ignore[union-attr]
    again = Membership("b", A("b", 9999), LOCAL, rng=random.Random(2), signer=Signer(key_seed))
    reply = seed.handle_stream(2.0, A("b", 9999), again.push_pull_payload(True))
    assert reply is not None and not decode_stream(reply)[0].refused  # type: ignore[union-attr]
    again.complete_push_pull(2.0, A("s"), "join", reply)
    assert again.me.incarnation >= 1  # it outbid its previous life ...
    out, _ = again.drain()
    for eff in out:
        if hasattr(eff, "payload"):
            seed.receive(2.1, A("b", 9999), eff.payload)  # type: ignore[attr-defined]
    assert seed.members["b"].addr == A("b", 9999)  # ... and everyone moves it
    stranger = Membership("b", A("b", 7777), LOCAL, rng=random.Random(3), signer=signer())
    reply = seed.handle_stream(3.0, A("b", 7777), stranger.push_pull_payload(True))
    assert reply is not None and "already alive" in decode_stream(reply)[0].refused  # type: ignore[union-attr]


def test_periodic_syncs_go_without_signatures_and_news_brings_a_full_one() -> None:
    s, n = machine("s"), machine("n")
    p = signer()
    feed(s, 1.0, signed(p, "p", 2, A("p")))
    feed(n, 1.0, Alive("s", s.me.incarnation, A("s"), {}, None, None, s.me.identity, s.me.sig))
    full = s.push_pull_payload(False)
    lite = s.push_pull_payload(False, lite=True)
    assert len(lite) < len(full) - 100  # the signatures are most of a record
    [pp] = decode_stream(lite)
    assert isinstance(pp, PushPull) and pp.members
    assert all(r.identity is r.sig is r.tunnel is r.state is None for r in pp.members)
    reply = s.handle_stream(2.0, A("n"), n.push_pull_payload(False, lite=True))
    assert reply is not None and decode_stream(reply)[0].lite  # type: ignore[union-attr]
    n.complete_push_pull(2.0, A("s"), "sync", reply)
    assert "p" not in n.members  # an unsigned record is not taken on trust ...
    effects, _ = n.drain()
    asks = [e for e in effects if getattr(e, "purpose", "") == "full"]
    assert [e.target for e in asks] == [A("s")]  # type: ignore[attr-defined]
    reply = s.handle_stream(2.1, A("n"), n.push_pull_payload(False))
    n.complete_push_pull(2.1, A("s"), "full", reply)
    assert n.members["p"].identity == p.public and n.members["p"].incarnation == 2  # ... the signed one is
    # Once in agreement, a lite sync asks for nothing more.
    reply = s.handle_stream(3.0, A("n"), n.push_pull_payload(False, lite=True))
    n.complete_push_pull(3.0, A("s"), "sync", reply)
    assert not [e for e in n.drain()[0] if getattr(e, "purpose", "") == "full"]


def test_a_lite_sync_about_an_agent_with_keys_tags_and_a_catalog_changes_nothing() -> None:
    """A lite record leaves out the tunnel key and the catalog digest: neither the agent
    itself (which compares its own record, to refute a stale one) nor a peer that holds
    it takes that for a change."""
    key = os.urandom(32)
    catalog = Registry("a")
    a = Membership("a", A("a"), LOCAL, tags={"role": "web"}, rng=random.Random(1), signer=signer(),
                   tunnel=(A("a", 7000), key), delegate=catalog)
    catalog.put(Instance("web-1", "web", "10.0.0.1", 8000))
    a.state_changed()
    assert a.me.state is not None
    a.drain()
    b = Membership("b", A("b"), LOCAL, rng=random.Random(2), signer=signer(), delegate=Registry("b"))
    b.complete_push_pull(1.0, A("a"), "sync", a.handle_stream(1.0, A("b"), b.push_pull_payload(False)))
    b.drain()
    inc = a.me.incarnation
    a.complete_push_pull(2.0, A("b"), "sync", b.handle_stream(2.0, A("a"), a.push_pull_payload(False, lite=True)))
    assert a.me.incarnation == inc and a.counters.stats["refutations"] == 0
    assert not [e for e in a.drain()[0] if getattr(e, "purpose", "") == "full"]
    held = b.members["a"]
    assert held.tunnel == (A("a", 7000), key) and held.tags == {"role": "web"}
    assert held.incarnation == inc and held.state == a.me.state


def test_a_push_pulls_accusation_above_our_incarnation_counts_only_with_the_members_signed_alive() -> None:
    """A peer that holds a member at a later incarnation, accused, proves it with the member's signature."""
    from gossip.wire import MemberRecord

    b = signer()
    for proven in (True, False):
        m = machine()
        feed(m, 1.0, signed(b, "b", 3, A("b")))
        settle_checks(m, 1.0)
        later = signed(b, "b", 7, A("b"))
        sig = later.sig if proven else signed(signer(), "b", 7, A("b")).sig
        record = MemberRecord("b", A("b"), 7, "suspect", {}, None, None, b.public, sig)
        m.handle_stream(5.0, A("c"), encode_packet([PushPull("c", False, [record])]))
        held = m.members["b"]
        if proven:
            assert (held.status.value, held.incarnation) == ("suspect", 7)
        else:
            assert (held.status.value, held.incarnation) == ("alive", 3)
            assert m.counters.drops["accusation_beyond_alive"] == 1


def test_a_new_key_at_a_members_own_address_is_checked_at_that_address_and_then_taken() -> None:
    """The restart race: the new process answers the old one's probes, so only its address can tell."""
    from gossip.swim import StartPushPull
    from gossip.wire import MemberRecord

    old, new = signer(), signer()
    m = machine()
    feed(m, 1.0, signed(old, "b", 5, A("b")))
    settle_checks(m, 1.0)
    m.receive(2.0, A("b"), encode_packet([signed(new, "b", 1, A("b"))]))
    out, _ = m.drain()
    assert m.members["b"].identity == old.public  # refused for now ...
    assert StartPushPull(A("b"), "verify") in out  # ... and its address is asked
    m.receive(2.5, A("b"), encode_packet([signed(new, "b", 2, A("b"))]))
    assert StartPushPull(A("b"), "verify") not in m.drain()[0]  # asked once a while, not per packet

    def reply(key: Signer, inc: int) -> bytes:
        alive = signed(key, "b", inc, A("b"))
        record = MemberRecord("b", A("b"), inc, "alive", {}, None, None, key.public, alive.sig)
        return encode_packet([PushPull("b", False, [record])])

    # A reply from elsewhere claiming b's address proves nothing; the old key answering there neither.
    m.complete_push_pull(3.0, A("c"), "verify", reply(new, 2))
    assert m.members["b"].identity == old.public
    m.complete_push_pull(3.0, A("b"), "verify", reply(old, 5))
    assert m.members["b"].identity == old.public and m.members["b"].status.value == "alive"
    # The new key answering at b's own address: the old one is gone, whatever the incarnations.
    m.complete_push_pull(3.5, A("b"), "verify", reply(new, 2))
    held = m.members["b"]
    assert (held.identity, held.status.value, held.incarnation) == (new.public, "alive", 2)
    assert m.counters.stats["identities_replaced"] == 1
