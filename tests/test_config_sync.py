"""The messages config entries travel in: announcements, summaries, pull replies."""

from __future__ import annotations

import msgpack
import pytest

from gossip import hlc
from gossip.config_store import ConfigStore, Entry
from gossip.config_sync import (
    MAX_PULL_ENTRIES,
    NEWS_DULL,
    Announced,
    SyncError,
    announcement,
    lacks,
    next_pull,
    parse_announcement,
    pull_reply,
    summary_from_wire,
    summary_to_wire,
    wants_pull,
)
from gossip.signing import Signer
from gossip.wire import MAX_QUERY_PAYLOAD

SIGNER = Signer(b"w" * 32)


def entry(name: str = "web/db", body: dict[str, object] | None = None, ms: int = 5) -> Entry:
    body = body if body is not None else {"source": "web", "destination": "db", "action": "deny"}
    return Entry.write(SIGNER, "w1", "intention", name, body, hlc.make(ms))


def test_a_small_entry_rides_in_its_announcement() -> None:
    e = entry()
    payload = announcement(e, MAX_QUERY_PAYLOAD)
    assert len(payload) <= MAX_QUERY_PAYLOAD
    assert parse_announcement(payload) == e


def test_a_large_entry_is_announced_by_key_and_version() -> None:
    big = entry("web", {"routes": [{"match": {"path_prefix": f"/p{i}"}, "destination": {"service": "x"}}
                                   for i in range(60)]})
    payload = announcement(big, MAX_QUERY_PAYLOAD)
    assert len(payload) < 200
    got = parse_announcement(payload)
    assert got == Announced("intention", "web", big.order)
    s = ConfigStore()
    assert lacks(s, got)
    s.apply(big)
    assert not lacks(s, got)


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", msgpack.packb(["x", 1]), msgpack.packb(["e", ["too", "short"]]),
    msgpack.packb(["k", "intention", "n", 1, "w"]), msgpack.packb(["k", "", "n", 1, "w", b""]),
    msgpack.packb(["k", "intention", "n", -1, "w", b""]), msgpack.packb({"k": 1}),
])
def test_bad_announcements_raise_sync_error(payload: bytes) -> None:
    with pytest.raises(SyncError):
        parse_announcement(payload)


def test_summaries_survive_the_wire_and_bad_ones_are_refused() -> None:
    s = ConfigStore()
    for i in range(5):
        s.apply(entry(f"s{i}/db", ms=i + 1))
    raw = msgpack.unpackb(msgpack.packb(summary_to_wire(s.summary()), use_bin_type=True), raw=False)
    assert summary_from_wire(raw) == s.summary()
    for bad in ({}, [["intention", "x", 1, "w"]], [["intention", "x", "1", "w", b""]], [[1, "x", 1, "w", b""]]):
        with pytest.raises(SyncError):
            summary_from_wire(bad)


def test_a_pull_returns_what_the_puller_lacks_in_bounded_batches() -> None:
    mine, theirs = ConfigStore(), ConfigStore()
    entries = [entry(f"s{i}/db", ms=i + 1) for i in range(MAX_PULL_ENTRIES + 10)]
    for e in entries:
        mine.apply(e)
    for e in entries[:5]:
        theirs.apply(e)
    batch, keys, more = pull_reply(mine, theirs.summary(), with_keys=False)
    assert len(batch) == MAX_PULL_ENTRIES and more and keys is None
    assert batch == sorted(batch, key=lambda e: e.order) and batch[0] == entries[5]
    for e in batch:
        theirs.apply(e)
    batch, keys, more = pull_reply(mine, theirs.summary(), with_keys=True)
    assert len(batch) == 5 and not more and keys is not None and len(keys) == len(entries)
    for e in batch:
        theirs.apply(e)
    assert theirs.digest() == mine.digest()
    assert pull_reply(mine, theirs.summary(), with_keys=False) == ([], None, False)


def test_a_pull_follows_a_digest_that_differs_and_nothing_else() -> None:
    a, b = bytes(32), b"\x01" * 32
    assert wants_pull(a, b)
    assert not wants_pull(a, a)
    assert not wants_pull(a, None)  # an agent that takes no config entries is never pulled from


def test_news_travels_on_until_news_dull_pulls_in_a_row_taught_nothing() -> None:
    # A pull that taught either side something starts the count again, whatever it was.
    assert next_pull(NEWS_DULL - 1, learnt=True, told=False) == 0
    assert next_pull(NEWS_DULL - 1, learnt=False, told=True) == 0
    # Dull pulls count up, and the last allowed one stops the rumour.
    dull: int | None = 0
    seen = []
    while dull is not None:
        seen.append(dull)
        dull = next_pull(dull, learnt=False, told=False)
    assert seen == list(range(NEWS_DULL))
