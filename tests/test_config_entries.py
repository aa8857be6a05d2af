"""One node's config entries: check-and-set, signing, the file, stale entries after a long absence."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from agent import store
from agent.config_entries import STORE_FILE, TOUCH_EVERY_MS, ConfigEntries
from agent.config_spread import UPKEEP_EVERY, upkeep
from agent.services import ServiceError
from gossip.config_store import Entry
from gossip.hlc import MAX_DRIFT_MS, make
from gossip.signing import Signer
from gossip.wire import ConfigPull, ConfigPush

HOUR = 3_600_000


class Clock:
    def __init__(self, ms: int = 1_700_000_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def node(tmp: Path | None, name: str = "n1", clock: Clock | None = None, ttl: int | None = None) -> ConfigEntries:
    c = ConfigEntries(tmp, name, Signer(name.encode().ljust(32, b".")), clock or Clock(), tombstone_ttl_ms=ttl)
    c.load()
    return c


DENY = {"kind": "intention", "source": "web", "destination": "db", "action": "deny"}


def test_write_read_list_and_delete(tmp_path: Path) -> None:
    c = node(tmp_path)
    changed: list[list[Entry]] = []
    c.on_change = changed.append
    view = c.write(DENY)
    assert view["name"] == "web/db" and view["action"] == "deny" and view["writer"] == "n1"
    assert view["written_at"].endswith("Z") and len(view["signed_by"]) == 16
    assert c.read("intention", "web/db") == view
    assert c.listing("intention") == [view] and c.listing("service-router") == []
    with pytest.raises(ServiceError, match="unknown kind"):
        c.listing("service-mesh")
    gone = c.delete("intention", "web/db")
    assert gone["ok"] is True and gone["version"] > view["version"]
    with pytest.raises(ServiceError) as info:
        c.read("intention", "web/db")
    assert info.value.status == 404
    with pytest.raises(ServiceError, match="no intention entry"):
        c.delete("intention", "web/db")
    assert [len(x) for x in changed] == [1, 1]


def test_check_and_set_refuses_a_write_over_a_change(tmp_path: Path) -> None:
    c = node(tmp_path)
    with pytest.raises(ServiceError, match="does not exist, not 5"):
        c.write(DENY, cas=5)
    first = c.write(DENY, cas=0)  # 0: only if it does not exist yet
    with pytest.raises(ServiceError) as info:
        c.write({**DENY, "action": "allow"}, cas=0)
    assert info.value.status == 409 and f"is at version {first['version']}" in str(info.value)
    second = c.write({**DENY, "action": "allow"}, cas=first["version"])
    with pytest.raises(ServiceError, match="changed since it was read"):
        c.delete("intention", "web/db", cas=first["version"])
    c.delete("intention", "web/db", cas=second["version"])


def test_entries_survive_a_restart_and_the_file_is_private(tmp_path: Path) -> None:
    clock = Clock()
    c = node(tmp_path, clock=clock)
    v = c.write({"kind": "service-defaults", "name": "db", "protocol": "tcp", "lb": "round_robin"})
    path = tmp_path / STORE_FILE
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    clock.ms -= HOUR  # the wall clock was set back over the restart
    again = node(tmp_path, clock=clock)
    assert again.read("service-defaults", "db") == v
    later = again.write({"kind": "service-defaults", "name": "db", "protocol": "http"})
    assert later["version"] > v["version"]  # the saved clock keeps versions growing


def test_a_damaged_or_forged_file_is_logged_and_ignored(tmp_path: Path) -> None:
    (tmp_path / STORE_FILE).write_text("{not json")
    assert node(tmp_path).listing() == []
    c = node(tmp_path)
    c.write(DENY)
    raw = json.loads((tmp_path / STORE_FILE).read_text())
    raw["entries"][0][2]["action"] = "allow"  # edited by hand: the signature no longer holds
    (tmp_path / STORE_FILE).write_text(json.dumps(raw))
    assert node(tmp_path).listing() == []


def test_received_entries_are_verified_and_conflicts_counted(tmp_path: Path) -> None:
    clock = Clock()
    a, b = node(tmp_path / "a", "a", clock), node(tmp_path / "b", "b", clock)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a.write(DENY)
    clock.ms += 10
    b.write({**DENY, "action": "allow"})  # a concurrent edit of the same pair on another node
    changed = a.receive(b.live())
    assert [e.writer for e in changed] == ["b"] and a.stats["conflicts_resolved"] == 1
    assert b.receive(a.live()) == []  # b's write is the later one: nothing changes there
    assert a.read("intention", "web/db")["action"] == b.read("intention", "web/db")["action"] == "allow"
    assert a.store.digest() == b.store.digest()
    e = b.live()[0]
    forged = Entry(e.kind, e.name, {**(e.body or {}), "action": "deny"}, e.version + 1, e.writer, e.public, e.sig)
    assert a.receive([forged]) == [] and a.stats["refused_signature"] == 1
    ahead = Entry.write(b.signer, "b", "intention", "x/y", {"source": "x", "destination": "y", "action": "deny"},
                        make(clock.ms + MAX_DRIFT_MS + 1_000))
    assert a.receive([ahead]) == [] and a.stats["refused_clock"] == 1


def test_a_node_away_longer_than_the_tombstone_ttl_drops_what_the_mesh_deleted(tmp_path: Path) -> None:
    clock = Clock()
    (tmp_path / "old").mkdir()
    old = node(tmp_path / "old", "old", clock, ttl=24 * HOUR)
    old.write(DENY)
    old.write({"kind": "service-defaults", "name": "db", "protocol": "http"})
    clock.ms += 48 * HOUR  # away two days: the mesh deleted web/db and has since forgotten the delete
    back = node(tmp_path / "old", "old", clock, ttl=24 * HOUR)
    assert back.stale_before and len(back.listing()) == 2  # still enforced while alone ...
    assert back.spreadable() == []  # ... but not spread
    gone = back.settle_stale(peer_keys=[("service-defaults", "db")])
    assert [e.key for e in gone] == [("intention", "web/db")]
    assert [v["name"] for v in back.listing()] == ["db"] and len(back.spreadable()) == 1
    assert node(tmp_path / "old", "old", clock, ttl=24 * HOUR).stale_before == 0  # settled, and saved


def test_a_running_node_touches_its_file_so_a_quick_restart_is_not_stale(tmp_path: Path) -> None:
    clock = Clock()
    c = node(tmp_path, clock=clock, ttl=24 * HOUR)
    c.write(DENY)
    for _ in range(30):  # thirty quiet hours, maintained every hour
        clock.ms += TOUCH_EVERY_MS
        c.maintain()
    assert node(tmp_path, clock=clock, ttl=24 * HOUR).stale_before == 0


def test_tombstones_are_purged_by_maintain(tmp_path: Path) -> None:
    clock = Clock()
    c = node(tmp_path, clock=clock, ttl=HOUR)
    c.write(DENY)
    c.delete("intention", "web/db")
    assert len(c.store) == 1
    clock.ms += HOUR + 1
    assert [e.key for e in c.maintain()] == [("intention", "web/db")] and len(c.store) == 0


def test_a_full_disk_refuses_a_write_and_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = node(tmp_path)
    c.write(DENY)

    def full(path: Path, body: object, mode: int = 0o600) -> None:
        raise store.StoreError(f"cannot save {path}: No space left on device")

    monkeypatch.setattr(store, "write_json", full)
    with pytest.raises(store.StoreError, match="No space left"):
        c.write({**DENY, "action": "allow"})
    assert c.read("intention", "web/db")["action"] == "deny"
    with pytest.raises(store.StoreError):
        c.delete("intention", "web/db")
    assert c.read("intention", "web/db")["action"] == "deny"


def sync(puller: ConfigEntries, peer: ConfigEntries) -> int:
    """Pull from ``peer`` until nothing remains, as the agent does over TCP; how many rounds."""
    rounds = 1
    while puller.apply_push(peer.answer(puller.pull_request()), peer.node):
        rounds += 1
    return rounds


def test_anti_entropy_brings_two_nodes_to_the_same_digest(tmp_path: Path) -> None:
    clock = Clock()
    a, b = node(None, "a", clock), node(None, "b", clock)
    a.write(DENY)
    for i in range(600):  # more than one pull's batch
        b.write({"kind": "intention", "source": f"s{i}", "destination": "db", "action": "allow"})
    a.delete("intention", "web/db")
    assert b.answer(a.pull_request()).pulling_back  # a holds what b lacks: b would pull back
    assert sync(a, b) == 2 and sync(b, a) == 1
    assert a.digest() == b.digest() and len(a.listing()) == 600
    held = b.store.get("intention", "web/db")
    assert held is not None and held.deleted  # the delete made on a reached b
    assert a.answer(b.pull_request()) == ConfigPush([])  # in step: nothing to send, nothing to pull back


def test_a_stale_node_settles_on_its_first_pull_and_spreads_nothing_stale(tmp_path: Path) -> None:
    clock = Clock()
    (tmp_path / "old").mkdir()
    old = node(tmp_path / "old", "old", clock, ttl=24 * HOUR)
    old.write(DENY)  # deleted by the mesh while old was away; the tombstone is long gone
    old.write({"kind": "service-defaults", "name": "db", "protocol": "http"})
    mesh = node(None, "mesh", clock, ttl=24 * HOUR)
    mesh.receive([e for e in old.live() if e.kind == "service-defaults"])
    clock.ms += 48 * HOUR
    back = node(tmp_path / "old", "old", clock, ttl=24 * HOUR)
    assert back.stale_before
    assert back.answer(mesh.pull_request()).entries == []  # a stale node hands out nothing
    assert [e.key for e in mesh.live()] == [("service-defaults", "db")]
    sync(back, mesh)
    assert not back.stale_before and [e.key for e in back.live()] == [("service-defaults", "db")]
    assert back.digest() == mesh.digest()


def test_malformed_pulls_and_pushes_are_counted_not_applied(tmp_path: Path) -> None:
    a = node(None, "a")
    a.write(DENY)
    assert a.answer(ConfigPull("x", [["bad"]])) == ConfigPush([]) and a.stats["refused_malformed"] == 1
    assert a.apply_push(ConfigPush([["not", "an", "entry"]]), "x") is False and a.stats["refused_malformed"] == 2


async def test_the_agent_upkeep_purges_tombstones_and_keeps_the_file_recent(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    # The entries' wall clock follows trio's (virtual) one: hours pass in no time.
    start = 1_700_000_000_000
    c = ConfigEntries(tmp_path, "n1", Signer(b"n1".ljust(32, b".")), lambda: start + int(trio.current_time() * 1000),
                      tombstone_ttl_ms=48 * HOUR)
    c.load()
    c.write(DENY)
    c.write({**DENY, "source": "api"})
    c.delete("intention", "web/db")
    assert len(c.store) == 2
    with trio.move_on_after(72 * 3600):  # three days of a running agent, with no write at all
        await upkeep(c, structlog.get_logger())
    assert [e.name for e in c.store] == ["api/db"]  # the tombstone went after its 48 hours
    saved = json.loads((tmp_path / STORE_FILE).read_text())["saved_at_ms"]
    assert c.wall() - saved <= TOUCH_EVERY_MS + UPKEEP_EVERY * 1000
    assert node(tmp_path, clock=Clock(c.wall()), ttl=48 * HOUR).stale_before == 0  # a restart now is not stale
