"""The one-writer-per-node registry: versions, digests, order and duplicates."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.config import LOCAL
from gossip.registry import EMPTY_DIGEST, Instance, NodeCatalog, Registry, catalog_digest
from gossip.swim import FetchState, Membership
from gossip.wire import DecodeError
from simulations.sim import NetModel, Sim


def inst(i: int, service: str = "web", health: str = "passing") -> Instance:
    return Instance(f"{service}-{i}", service, "10.0.0.1", 8000 + i, ("v1",), (("zone", "a"),), health)


def test_local_writes_bump_version_and_digest() -> None:
    r = Registry("a")
    assert r.state() == (0, EMPTY_DIGEST)
    r.put(inst(1))
    v1, d1 = r.state()
    assert v1 == 1 and d1 != EMPTY_DIGEST
    assert not r.set_health("web-1", "passing")  # no change, no bump
    assert r.state() == (1, d1)
    assert r.set_health("web-1", "critical")
    assert r.state()[0] == 2 and r.state()[1] != d1
    assert r.remove("web-1") and not r.remove("web-1")
    assert r.state() == (3, EMPTY_DIGEST)


def test_digest_ignores_insertion_order() -> None:
    a = {i.id: i for i in (inst(1), inst(2), inst(3))}
    b = {i.id: i for i in (inst(3), inst(1), inst(2))}
    assert catalog_digest(a) == catalog_digest(b)
    assert catalog_digest(a) != catalog_digest({k: v for k, v in a.items() if k != "web-2"})


def owner_snapshots(n: int) -> list[bytes]:
    """Successive catalogs of one owner, as encode_node would ship them."""
    owner = Registry("o")
    out = []
    for i in range(n):
        owner.put(inst(i))
        data = owner.encode_node("o")
        assert data is not None
        out.append(data)
    return out


def test_out_of_order_and_duplicate_updates_keep_the_newest() -> None:
    snaps = owner_snapshots(5)
    r = Registry("me")
    assert r.apply_node(snaps[3])
    assert not r.apply_node(snaps[1])  # older: ignored
    assert not r.apply_node(snaps[3])  # duplicate: ignored
    assert r.stats["stale"] == 1 and r.stats["duplicate"] == 1
    assert r.held("o") is not None and r.held("o").version == 4  # type: ignore[union-attr]
    assert r.apply_node(snaps[4])
    assert len(r.held("o").instances) == 5  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None)
@given(st.permutations(list(range(6))), st.lists(st.integers(0, 5), max_size=6))
def test_any_delivery_order_converges_on_the_newest(order: list[int], dups: list[int]) -> None:
    snaps = owner_snapshots(6)
    r = Registry("me")
    for i in order + dups:
        r.apply_node(snaps[i])
    held = r.held("o")
    assert held is not None and held.version == 6 and len(held.instances) == 6


def test_advertised_asks_for_newer_versions_only() -> None:
    r = Registry("me")
    snaps = owner_snapshots(3)
    assert not r.advertised("o", 0, EMPTY_DIGEST)  # unknown but empty: nothing to fetch
    assert r.advertised("o", 2, b"x" * 8)  # unknown node: fetch
    r.apply_node(snaps[1])  # version 2
    assert not r.fetch_done("o")
    assert "o" not in r.wanted
    held = r.held("o")
    assert held is not None
    assert not r.advertised("o", 2, held.digest)  # what we hold
    assert not r.advertised("o", 1, b"y" * 8)  # older
    assert r.advertised("o", 3, b"z" * 8)
    assert r.wanted["o"][0] == 3


def test_a_restarted_owner_moves_past_what_others_remember() -> None:
    r = Registry("me")
    r.put(inst(1))
    # Peers remember version 7 of ours from an earlier life.
    assert not r.advertised("me", 7, b"q" * 8)
    assert r.state()[0] == 8
    r.start_after(20)
    assert r.state()[0] == 21


def test_a_catalog_that_does_not_match_its_digest_is_rejected() -> None:
    good = NodeCatalog(1, catalog_digest({"web-1": inst(1)}), {"web-1": inst(1)}).to_obj()
    bad = [1, good[1], [inst(2).to_obj()]]
    with pytest.raises(DecodeError):
        NodeCatalog.from_obj(bad)
    r = Registry("me")
    dump = msgpack.packb({"o": bad, "p": good}, use_bin_type=True)
    assert r.merge_dump(dump) == ["p"]
    assert r.stats["rejected"] == 1


@pytest.mark.parametrize("garbage", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"o": [1, 2, 3]}),
                                     msgpack.packb({"o": [1, b"12345678", [["x"] * 7]]})])
def test_garbage_dumps_raise_decode_error_or_are_rejected(garbage: bytes) -> None:
    r = Registry("me")
    try:
        r.merge_dump(garbage)
    except DecodeError:
        pass
    assert r.remote == {}


def test_push_pull_dump_carries_every_catalog() -> None:
    a, b = Registry("a"), Registry("b")
    for i in range(3):
        a.put(inst(i))
    c = Registry("c")
    c.put(inst(9, "db"))
    b.apply_node(c.encode_node("c") or b"")
    assert sorted(a.merge_dump(b.dump())) == ["b", "c"]
    assert {n for n, _ in a.all_instances()} == {"a", "c"}


def test_a_dump_skips_catalogs_no_newer_than_held_without_decoding_them() -> None:
    """Every push-pull carries every catalog; the ones we hold are counted, not decoded
    (the garbage below would be rejected if it were), and a newer one still applies."""
    a, b = Registry("a"), Registry("b")
    b.put(inst(1))
    assert a.merge_dump(b.dump()) == ["b"]
    held = a.remote["b"]
    same = msgpack.packb({"b": [held.version, held.digest, [["garbage"]]]}, use_bin_type=True)
    assert a.merge_dump(same) == []
    assert a.stats["duplicate"] == 1 and a.stats["rejected"] == 0
    older = msgpack.packb({"b": [held.version - 1, b"x", 7]}, use_bin_type=True)
    assert a.merge_dump(older) == [] and a.stats["stale"] == 1
    b.put(inst(2))
    assert a.merge_dump(b.dump()) == ["b"]
    assert {i.id for _, i in a.all_instances()} == {"web-1", "web-2"}


def test_an_empty_catalog_must_carry_the_empty_digest() -> None:
    a = Registry("a")
    lying = msgpack.packb({"b": [3, catalog_digest({"web-1": inst(1)}), []]}, use_bin_type=True)
    assert a.merge_dump(lying) == [] and a.stats["rejected"] == 1
    honest = msgpack.packb({"b": [3, EMPTY_DIGEST, []]}, use_bin_type=True)
    assert a.merge_dump(honest) == ["b"] and a.remote["b"].instances == {}


def test_thousand_instances_spread_through_gossip_and_tcp_fetches() -> None:
    """20 members, 50 instances each: every member converges on all 1,000.

    Runs the real Membership with the registry as its delegate on the seeded
    virtual network; the FetchState effects are served as the agent does.
    """
    rng = random.Random(3)
    net = Sim(LOCAL, seed=11, net=NetModel.uniform(), check_packets=True, check_deadlines=True)
    registries: dict[str, Registry] = {}

    def factory(name: str) -> Registry:
        registries[name] = Registry(name)
        return registries[name]

    names = [f"n{i}" for i in range(20)]
    for i, name in enumerate(names):
        net.add(name, seeds=[] if i == 0 else ["n0"], delegate=factory(name))
    assert net.run_until(net.agree_all_alive, 30.0)
    for name in names:
        reg = registries[name]
        for j in range(50):
            reg.put(Instance(f"svc{j % 7}-{name}-{j}", f"svc{j % 7}", "10.1.0.1", 1000 + j,
                             ("t",), (("k", str(rng.random())),)))
        net.by_name[name].m.state_changed()
        net.flush(net.by_name[name])

    def all_have_everything() -> bool:
        return all(len(r.all_instances()) == 1000 for r in registries.values())

    assert net.run_until(all_have_everything, 60.0)
    digests = {name: sorted((n, c.version, c.digest) for n, c in
                            [(n, registries[name].held(n)) for n in names] if c is not None)
               for name in names}
    assert len({tuple(v) for v in digests.values()}) == 1


def test_membership_emits_fetch_for_newer_state() -> None:
    reg_a, reg_b = Registry("a"), Registry("b")
    a = Membership("a", ("10.0.0.1", 1), LOCAL, rng=random.Random(1), delegate=reg_a)
    b = Membership("b", ("10.0.0.2", 1), LOCAL, rng=random.Random(2), delegate=reg_b)
    reply = b.handle_stream(0.0, a.addr, a.push_pull_payload(True))
    assert reply is not None
    a.complete_push_pull(0.0, b.addr, "join", reply)
    a.drain()
    reg_b.put(inst(1))
    b.state_changed()
    b.tick(1.0)
    effects, _ = b.drain()
    fetches = []
    for eff in effects:
        if hasattr(eff, "payload") and eff.addr == a.addr:
            a.receive(1.0, b.addr, eff.payload)
    effects, _ = a.drain()
    fetches = [e for e in effects if isinstance(e, FetchState)]
    assert fetches == [FetchState("b", b.addr)]
    served = b.handle_stream(1.0, a.addr, a.state_request_payload("b"))
    assert a.complete_fetch(1.0, "b", served)
    assert [i.id for _, i in reg_a.all_instances()] == ["web-1"]


def test_a_burst_of_changes_costs_one_fetch_at_a_time() -> None:
    r = Registry("me")
    snaps = owner_snapshots(5)
    assert r.advertised("o", 1, b"a" * 8)
    for v in range(2, 6):  # four more changes while the first fetch is in flight
        assert not r.advertised("o", v, bytes([v]) * 8)
    r.apply_node(snaps[0])  # the first fetch returns version 1; 5 is wanted
    assert r.fetch_done("o")  # so exactly one more fetch starts
    assert not r.advertised("o", 5, b"e" * 8)
    r.apply_node(snaps[4])
    assert not r.fetch_done("o")  # up to date: nothing more
    assert r.inflight == set()


def test_a_failed_fetch_waits_for_the_next_advertisement() -> None:
    r = Registry("me")
    assert r.advertised("o", 3, b"c" * 8)
    assert not r.fetch_done("o", ok=False)
    assert r.inflight == set()
    assert r.advertised("o", 4, b"d" * 8)


def test_a_failing_checks_reason_travels_with_the_instance_and_a_passing_one_encodes_as_before() -> None:
    from gossip.registry import MAX_OUTPUT
    from gossip.wire import DecodeError as WireDecodeError

    failing = Instance("db-1", "db", "10.0.0.1", 5432, (), (), "critical", "connect refused")
    assert Instance.from_obj(failing.to_obj()) == failing
    passing = Instance("db-1", "db", "10.0.0.1", 5432)
    assert len(passing.to_obj()) == 7 and Instance.from_obj(passing.to_obj()) == passing
    with pytest.raises(WireDecodeError):
        Instance.from_obj([*passing.to_obj(), "x" * (MAX_OUTPUT + 1)])
    reg = Registry("n1")
    reg.put(Instance("db-1", "db", "10.0.0.1", 5432, health="critical"))
    assert reg.set_health("db-1", "critical", "connect refused")  # the first reason is news
    assert not reg.set_health("db-1", "critical", "still refused")  # later ones are not
    assert reg.set_health("db-1", "passing", "ok")
    assert reg.local.instances["db-1"].output == ""  # a passing instance needs no reason
