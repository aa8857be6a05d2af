"""Config entries as a CRDT: any order and repetition of the same writes gives the same store."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import hlc
from gossip.config_store import ConfigStore, Entry, EntryError, canonical
from gossip.signing import Signer, Verifier

SIGNERS = {name: Signer(bytes([i + 1]) * 32) for i, name in enumerate(["n1", "n2", "n3"])}
KEYS = [("intention", "web/db"), ("intention", "*/db"), ("service-defaults", "db"), ("service-splitter", "web")]


def write(writer: str, key: tuple[str, str], body: dict[str, object] | None, version: int) -> Entry:
    return Entry.write(SIGNERS[writer], writer, key[0], key[1], body, version)


writes = st.lists(
    st.builds(
        write,
        st.sampled_from(sorted(SIGNERS)),
        st.sampled_from(KEYS),
        st.one_of(st.none(), st.dictionaries(st.sampled_from(["action", "weight", "protocol"]),
                                             st.one_of(st.integers(0, 100), st.text(max_size=5)), max_size=3)),
        # Few distinct versions, so ties between writers and between bodies are common.
        st.integers(1, 6).map(lambda ms: hlc.make(ms)),
    ),
    max_size=25,
)


def state(store: ConfigStore) -> dict[tuple[str, str], tuple[object, ...]]:
    return {e.key: (e.body, e.version, e.writer, e.sig) for e in store}


@settings(max_examples=200)
@given(writes, st.randoms(use_true_random=False))
def test_any_order_and_repetition_gives_the_same_state(ws: list[Entry], rnd: random.Random) -> None:
    a, b = ConfigStore(), ConfigStore()
    planned = a.merged(ws)  # what applying them will leave, computed before
    for e in ws:
        a.apply(e)
    assert sorted(planned, key=lambda e: e.key) == sorted(a, key=lambda e: e.key)
    shuffled = ws + rnd.sample(ws, k=len(ws) // 2)  # some delivered twice
    rnd.shuffle(shuffled)
    for e in shuffled:
        b.apply(e)
    assert state(a) == state(b)
    assert a.digest() == b.digest()
    # And the state is the maximum version per key: nothing else could be the same everywhere.
    best: dict[tuple[str, str], Entry] = {}
    for e in ws:
        if e.key not in best or e.order > best[e.key].order:
            best[e.key] = e
    assert state(a) == {k: (e.body, e.version, e.writer, e.sig) for k, e in best.items()}


@settings(max_examples=100)
@given(writes, writes)
def test_anti_entropy_brings_two_stores_to_the_same_state(left: list[Entry], right: list[Entry]) -> None:
    a, b = ConfigStore(), ConfigStore()
    for e in left:
        a.apply(e)
    for e in right:
        b.apply(e)
    to_b, to_a = a.newer_than(b.summary()), b.newer_than(a.summary())
    for e in to_b:
        assert b.apply(e)  # everything sent is news to the receiver
    for e in to_a:
        assert a.apply(e)
    assert state(a) == state(b) and a.digest() == b.digest()
    assert a.newer_than(b.summary()) == [] and b.newer_than(a.summary()) == []


def test_a_delete_wins_over_older_writes_in_any_order() -> None:
    put = write("n1", KEYS[0], {"action": "allow"}, hlc.make(10))
    delete = write("n2", KEYS[0], None, hlc.make(20))
    for order in ([put, delete], [delete, put]):
        s = ConfigStore()
        for e in order:
            s.apply(e)
        held = s.get(*KEYS[0])
        assert held is not None and held.deleted
        assert s.live() == []


def test_tombstones_are_purged_after_their_ttl_and_only_then() -> None:
    s = ConfigStore(tombstone_ttl_ms=1_000)
    s.apply(write("n1", KEYS[0], None, hlc.make(5_000)))
    s.apply(write("n1", KEYS[1], {"action": "deny"}, hlc.make(1)))
    assert s.purge(now_ms=6_000) == []
    gone = s.purge(now_ms=6_001)
    assert [e.key for e in gone] == [KEYS[0]]
    assert [e.key for e in s] == [KEYS[1]]  # live entries never expire


def test_drop_stale_keeps_what_the_mesh_still_holds_and_what_is_recent() -> None:
    s = ConfigStore()
    old_kept = write("n1", KEYS[0], {"action": "allow"}, hlc.make(100))
    old_lost = write("n1", KEYS[1], {"action": "deny"}, hlc.make(100))
    recent = write("n2", KEYS[2], {"protocol": "http"}, hlc.make(900))
    for e in (old_kept, old_lost, recent):
        s.apply(e)
    gone = s.drop_stale(keep=[KEYS[0]], before_ms=500)
    assert gone == [old_lost]
    assert {e.key for e in s} == {KEYS[0], KEYS[2]}


def test_the_digest_changes_with_any_version_and_not_with_order() -> None:
    a, b = ConfigStore(), ConfigStore()
    e1 = write("n1", KEYS[0], {"action": "allow"}, hlc.make(1))
    e2 = write("n2", KEYS[1], {"action": "deny"}, hlc.make(2))
    a.apply(e1)
    a.apply(e2)
    b.apply(e2)
    assert a.digest() != b.digest()
    b.apply(e1)
    assert a.digest() == b.digest()
    a.apply(write("n3", KEYS[0], {"action": "allow"}, hlc.make(3)))  # same body, newer version
    assert a.digest() != b.digest()


def test_signatures_hold_through_the_wire_and_fail_on_any_change() -> None:
    v = Verifier()
    e = write("n1", KEYS[2], {"protocol": "http", "limits": {"b": 1, "a": 2}}, hlc.make(42))
    raw = msgpack.unpackb(msgpack.packb(e.to_wire(), use_bin_type=True), raw=False)
    back = Entry.from_wire(raw)
    back.verify(v)  # map order does not matter: the signature covers a canonical form
    assert back == e
    for field, value in (("body", {"protocol": "tcp"}), ("version", hlc.make(43)), ("writer", "n2"),
                         ("name", "web"), ("kind", "service-resolver"), ("body", None)):
        forged = e._replace(**{field: value})
        with pytest.raises(EntryError, match="does not hold"):
            forged.verify(v)
    other = SIGNERS["n2"]
    stolen = Entry(e.kind, e.name, e.body, e.version, e.writer, other.public, e.sig)  # another's key
    with pytest.raises(EntryError, match="does not hold"):
        stolen.verify(v)


@pytest.mark.parametrize("raw", [
    None, [], ["intention"] * 7, ["k", "n", [], 1, "w", b"k" * 32, b"s" * 64],
    ["k", "n", {}, True, "w", b"k" * 32, b"s" * 64], ["k", "n", {}, 1, "w", "not bytes", b"s" * 64],
])
def test_malformed_wire_entries_are_refused(raw: object) -> None:
    with pytest.raises(EntryError):
        Entry.from_wire(raw)


def test_canonical_sorts_maps_at_every_depth() -> None:
    assert canonical({"b": [{"d": 1, "c": 2}], "a": 0}) == [["a", 0], ["b", [[["c", 2], ["d", 1]]]]]


def test_a_purged_tombstone_is_not_taken_back_but_still_deletes_what_it_covers() -> None:
    s = ConfigStore(tombstone_ttl_ms=1000)
    live = Entry.write(SIGNERS["n1"], "n1", "intention", "a/db", {"action": "deny"}, hlc.make(10))
    gone = Entry.write(SIGNERS["n1"], "n1", "intention", "a/db", None, hlc.make(20))
    s.apply(gone)
    assert s.purge(now_ms=2000) == [gone] and len(s) == 0
    # A peer that has not purged yet offers it back: refused, and the digest stays that of an empty store.
    assert not s.apply(gone) and s.merged([gone]) == [] and s.digest() == ConfigStore().digest()
    # But where it deletes an entry still held (a node that missed the delete), it is applied.
    held = ConfigStore(tombstone_ttl_ms=1000)
    held.apply(live)
    held.purge(now_ms=2000)
    assert held.apply(gone) and held.live() == []
    assert held.purge(now_ms=2000) == [gone]
