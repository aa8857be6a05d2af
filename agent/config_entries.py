"""This node's copy of the mesh-wide config entries: written here or received, kept on disk.

The merge rules live in gossip/config_store.py (a last-writer-wins map, the
same on every node whatever the order of arrival); this module is what an
agent adds around them: checking an entry's fields before it is written
(agent/entry_kinds.py), a check-and-set for writers who read first (Consul's
``-cas``), signing with this node's identity, a clock that orders this node's
writes after everything it has seen, and a file under --data-dir so a
restarted node serves its entries before it has met anyone.

A node that was away longer than the tombstone TTL cannot tell an entry it
still holds from one the mesh deleted while it was gone (the delete's
tombstone has expired everywhere else).  Its stored entries from before it
left are therefore *stale* until it first syncs with a peer that has been
up: they stay enforced meanwhile (a node alone keeps its rules), but are not
spread, and those the peer does not hold are dropped (:meth:`settle_stale`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import entry_kinds, log, store
from agent.services import ServiceError, shown
from gossip import config_sync
from gossip.config_store import ConfigStore, Entry, EntryError, Key
from gossip.hlc import ClockDriftError, HybridClock
from gossip.signing import Signer, Verifier
from gossip.wire import ConfigPull, ConfigPush

if TYPE_CHECKING:
    from dataplane.discovery_chain import DiscoveryChain

STORE_FILE = "config_entries.json"
#: Entries with versions this old were carried over from per-node stores (agent.intentions.migrate).
MIGRATED_BEFORE_MS = 10
#: How often a running node re-saves its file even with nothing new, so that the
#: time it records ("up with the mesh until at least then") stays recent.
TOUCH_EVERY_MS = 3_600_000


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def fingerprint(public: bytes) -> str:
    """A short, stable name for a signing key, as `config read` shows it."""
    return base64.b32encode(public[:10]).decode().lower()


class ConfigEntries:
    def __init__(self, data_dir: Path | None, node: str, signer: Signer,
                 clock: Callable[[], int] = wall_ms, tombstone_ttl_ms: int | None = None) -> None:
        self.node = node
        self.signer = signer
        self.wall = clock
        self.store = ConfigStore() if tombstone_ttl_ms is None else ConfigStore(tombstone_ttl_ms)
        self.clock = HybridClock()
        self.verifier = Verifier()
        self.log = log.get("mesh.config").bind(node=node)
        self.saver = store.Saver(None if data_dir is None else data_dir / STORE_FILE, self.log)
        self._path = None if data_dir is None else data_dir / STORE_FILE
        #: Entries written before this (ms) are stale until settle_stale (module docstring); 0: none are.
        self.stale_before = 0
        #: Called with the entries that changed this node's state, after they are saved.
        self.on_change: Callable[[list[Entry]], None] = lambda changed: None
        #: Called with each entry written here (not received), once saved: to announce it.
        self.on_written: Callable[[Entry], None] = lambda entry: None
        self.stats: Counter[str] = Counter()
        #: When the file was last written: a node that saved recently was up with the mesh then.
        self._saved_at = 0
        #: The config file's entries as last applied (apply_file).
        self.file_digest = ""
        self._chains: dict[str, DiscoveryChain | None] = {}
        self._chains_digest = b""

    # -- start -----------------------------------------------------------------------------

    def load(self) -> None:
        """The entries saved by the last run; a damaged file is logged and ignored, never fatal."""
        raw = store.read_json(self._path, self.log, "config_store_unreadable")
        if not isinstance(raw, dict):
            return
        self.clock.last = raw.get("clock", 0) if isinstance(raw.get("clock"), int) else 0
        self.file_digest = raw.get("file_digest", "") if isinstance(raw.get("file_digest"), str) else ""
        for item in raw.get("entries", []):
            try:
                entry = Entry.from_wire(_from_json(item))
                entry.verify(self.verifier)
            except (EntryError, ValueError, TypeError) as exc:
                self.log.error("stored_config_entry_invalid", detail=str(exc))
                continue
            self.store.apply(entry)
        saved = raw.get("saved_at_ms")
        if isinstance(saved, int) and self.wall() - saved > self.store.tombstone_ttl_ms and len(self.store):
            self.stale_before = saved + 1
            self.log.warning("config_entries_stale", entries=len(self.store),
                             away_hours=round((self.wall() - saved) / 3_600_000, 1),
                             detail="this node was away longer than deletes are remembered: its entries are "
                                    "kept but not spread until it has synced with a peer")

    # -- reads -----------------------------------------------------------------------------

    def lookup(self, kind: str, name: str) -> dict[str, Any] | None:
        """The body of the live entry (kind, name), or None: what entry_kinds checks against."""
        e = self.store.get(kind, name)
        return None if e is None or e.body is None else e.body

    def live(self, kind: str | None = None) -> list[Entry]:
        return self.store.live(kind)

    def read(self, kind: str, name: str) -> dict[str, Any]:
        e = self.store.get(kind, name)
        if e is None or e.deleted:
            raise ServiceError(f"no {kind} entry named {name!r}", 404)
        return self.view_of(e)

    def listing(self, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is not None and kind not in entry_kinds.KINDS:
            raise ServiceError(f"unknown kind {shown(kind)}: one of {', '.join(entry_kinds.KINDS)}")
        return [self.view_of(e) for e in self.store.live(kind)]

    def chain_for(self, service: str) -> DiscoveryChain | None:
        """The discovery chain (routes, splits, subsets, failover) for ``service``; None when no entry shapes it.

        Compiled once per change of the entries (the store's digest says when).
        """
        digest = self.store.digest()
        if digest != self._chains_digest:
            self._chains.clear()
            self._chains_digest = digest
        if service not in self._chains:
            splitter = self.lookup(entry_kinds.SERVICE_SPLITTER, service)
            router = self.lookup(entry_kinds.SERVICE_ROUTER, service)
            resolvers = {e.name: e.body or {} for e in self.store.live(entry_kinds.SERVICE_RESOLVER)}
            shaped = splitter is not None or router is not None or service in resolvers
            if shaped:
                from dataplane.discovery_chain import DiscoveryChain  # only the data plane compiles chains

                self._chains[service] = DiscoveryChain(service, splitter, resolvers, router)
            else:
                self._chains[service] = None
        return self._chains[service]

    def summary_view(self) -> dict[str, Any]:
        """What `mesh-agent info` shows: how many entries of each kind, the digest peers compare, counters."""
        by_kind = {k: 0 for k in entry_kinds.KINDS}
        tombstones = 0
        for e in self.store:
            if e.deleted:
                tombstones += 1
            else:
                by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
        return {"entries": by_kind, "tombstones": tombstones, "digest": self.store.digest().hex()[:16],
                "clock": self.clock.last, "stale": bool(self.stale_before),
                "counters": dict(sorted(self.stats.items()))}

    def view_of(self, e: Entry) -> dict[str, Any]:
        written = datetime.fromtimestamp(e.written_ms / 1000, UTC).isoformat(timespec="milliseconds")
        return {"kind": e.kind, "name": e.name, **(e.body or {}), "version": e.version, "writer": e.writer,
                "written_at": written.replace("+00:00", "Z"), "signed_by": fingerprint(e.public)}

    # -- writes ----------------------------------------------------------------------------

    def write(self, payload: Any, cas: int | None = None) -> dict[str, Any]:
        """Check, sign, save and apply one entry written through this node; its view."""
        if not isinstance(payload, dict):
            raise ServiceError("a config entry must be an object with kind, name and its fields")
        kind = payload.get("kind")
        body = {k: v for k, v in payload.items() if k not in ("kind", "name")}
        name = payload.get("name")
        if kind == entry_kinds.INTENTION and name is None and isinstance(body.get("source"), str) \
                and isinstance(body.get("destination"), str):
            name = entry_kinds.intention_name(body["source"], body["destination"])
        clean = entry_kinds.validate(kind, name, body, self.lookup)
        assert isinstance(kind, str) and isinstance(name, str)
        self._check_cas(kind, name, cas)
        entry = Entry.write(self.signer, self.node, kind, name, clean, self.clock.now(self.wall()))
        self._commit([entry])
        self.on_written(entry)
        self.stats["written"] += 1
        self.log.info("config_entry_written", kind=kind, config_name=name, version=entry.version)
        return self.view_of(entry)

    def write_migrated(self, kind: str, name: str, body: dict[str, Any], version: int) -> None:
        """An entry carried over from a per-node store, at a fixed old ``version`` (agent.intentions)."""
        clean = entry_kinds.validate(kind, name, body, self.lookup)
        self._commit([Entry.write(self.signer, self.node, kind, name, clean, version)])

    def apply_file(self, payloads: list[dict[str, Any]]) -> int:
        """Write the config file's entries, but only when the file's entries changed since the last start.

        So a restart with the same file never undoes an edit made since, nor
        brings back an entry deleted since.  Returns how many were written.
        """
        digest = hashlib.sha256(json.dumps(payloads, sort_keys=True).encode()).hexdigest()
        if digest == self.file_digest:
            return 0
        written = 0
        for i, payload in enumerate(payloads):
            try:
                self.write(payload)
                written += 1
            except ServiceError as exc:  # checked alone at start; this is a conflict with the mesh's entries
                self.log.error("config_file_entry_refused", entry=i + 1, detail=str(exc))
        self.file_digest = digest
        self._save(list(self.store))
        return written

    def delete(self, kind: str, name: str, cas: int | None = None) -> dict[str, Any]:
        held = self.store.get(kind, name)
        if held is None or held.deleted:
            raise ServiceError(f"no {kind} entry named {name!r}", 404)
        entry_kinds.check_delete(kind, name, self.lookup)
        self._check_cas(kind, name, cas)
        entry = Entry.write(self.signer, self.node, kind, name, None, self.clock.now(self.wall()))
        self._commit([entry])
        self.on_written(entry)
        self.stats["deleted"] += 1
        self.log.info("config_entry_deleted", kind=kind, config_name=name, version=entry.version)
        return {"ok": True, "kind": kind, "name": name, "version": entry.version}

    def _check_cas(self, kind: str, name: str, cas: int | None) -> None:
        if cas is None:
            return
        held = self.store.get(kind, name)
        current = 0 if held is None or held.deleted else held.version
        if cas != current:
            what = "does not exist" if current == 0 else f"is at version {current}"
            raise ServiceError(f"{kind} {name!r} changed since it was read: it {what}, not {cas}", 409, "cas")

    # -- from peers ------------------------------------------------------------------------

    def receive(self, entries: Iterable[Entry]) -> list[Entry]:
        """Merge entries a peer sent; return those that changed this node's state.

        Each must carry a valid signature and a version not far ahead of this
        node's clock; the rest are dropped and counted, never applied.
        """
        accepted: list[Entry] = []
        now = self.wall()
        for e in entries:
            held = self.store.get(*e.key)
            if held is not None and held.order >= e.order:
                continue  # the common case, a repeat: no signature to check
            try:
                e.verify(self.verifier)
                self.clock.observe(e.version, now)
            except EntryError as exc:
                self.stats["refused_signature"] += 1
                self.log.warning("config_entry_refused", kind=e.kind, config_name=e.name, writer=e.writer,
                                 detail=str(exc))
                continue
            except ClockDriftError as exc:
                self.stats["refused_clock"] += 1
                self.log.warning("config_entry_refused", kind=e.kind, config_name=e.name, writer=e.writer,
                                 detail=f"{exc}: check this node's and {e.writer}'s clocks")
                continue
            if held is not None and held.writer != e.writer:
                self.stats["conflicts_resolved"] += 1
                if held.written_ms < MIGRATED_BEFORE_MS and e.written_ms < MIGRATED_BEFORE_MS \
                        and held.body != e.body:
                    self.log.warning("config_migration_conflict", kind=e.kind, config_name=e.name,
                                     kept=e.writer, dropped=held.writer,
                                     detail="two nodes held different per-node rules; the stricter one wins")
            accepted.append(e)
        if not accepted:
            return []
        try:
            return self._commit(accepted)
        except store.StoreError:
            # Not ours to refuse: the mesh holds it either way.  Keep it in memory, so
            # this node enforces what the others do; the failure is counted and shown
            # (Saver), and a restart relearns it by anti-entropy.
            return self._apply(accepted)

    def settle_stale(self, peer_keys: Iterable[Key]) -> list[Entry]:
        """After a first sync with a peer: drop stale entries it does not hold (module docstring)."""
        if not self.stale_before:
            return []
        gone = self.store.drop_stale(peer_keys, self.stale_before)
        self.stale_before = 0
        for e in gone:
            self.log.warning("config_entry_dropped_stale", kind=e.kind, config_name=e.name, writer=e.writer)
        if gone:
            self._save(list(self.store))
            self.on_change(gone)
        return gone

    def maintain(self) -> list[Entry]:
        """Run now and then: forget tombstones past the TTL, and keep the file's time recent."""
        gone = self.store.purge(self.wall())
        if gone or (self._path is not None and self.wall() - self._saved_at >= TOUCH_EVERY_MS):
            try:
                self._save(list(self.store))
            except store.StoreError:
                pass  # counted and shown by the Saver; the next turn tries again
        return gone

    # -- anti-entropy (gossip.config_sync) ---------------------------------------------------

    def digest(self) -> bytes:
        return self.store.digest()

    def pull_request(self) -> ConfigPull:
        """What this node sends a peer whose digest differs: its summary, and whether it is stale."""
        return ConfigPull(self.node, config_sync.summary_to_wire(self.store.summary()), bool(self.stale_before))

    def answer(self, pull: ConfigPull) -> ConfigPush:
        """A peer's pull: the entries it lacks (never this node's stale ones), every key if it is stale,
        and whether its summary shows this node news (``pulling_back``: the caller then pulls it)."""
        try:
            theirs = config_sync.summary_from_wire(pull.summary)
        except config_sync.SyncError as exc:
            self.stats["refused_malformed"] += 1
            self.log.warning("config_pull_malformed", peer=pull.source, detail=str(exc))
            return ConfigPush([])
        source = self.store
        if self.stale_before:
            source = ConfigStore(self.store.tombstone_ttl_ms)
            for e in self.spreadable():
                source.apply(e)
        entries, keys, more = config_sync.pull_reply(source, theirs, with_keys=pull.stale)
        self.stats["pulls_answered"] += 1
        return ConfigPush([e.to_wire() for e in entries], None if keys is None else [list(k) for k in keys], more,
                          pulling_back=config_sync.has_news_for(self.store, theirs))

    def apply_push(self, push: ConfigPush, peer: str) -> bool:
        """Merge a pull's answer from ``peer``; True if more remain to pull."""
        entries = []
        for raw in push.entries:
            try:
                entries.append(Entry.from_wire(raw))
            except EntryError as exc:
                self.stats["refused_malformed"] += 1
                self.log.warning("config_entry_malformed", peer=peer, detail=str(exc))
        self.stats["pulled"] += len(self.receive(entries))
        if push.keys is not None and self.stale_before and not push.more:
            keys = [(k[0], k[1]) for k in push.keys
                    if isinstance(k, list) and len(k) == 2 and all(isinstance(x, str) for x in k)]
            self.settle_stale(keys)
        return push.more

    def in_step_with(self, digest: bytes) -> None:
        """A peer's digest equals ours: a stale node holds nothing the mesh lacks, and is stale no more."""
        if self.stale_before and digest == self.store.digest():
            self.settle_stale([e.key for e in self.store])

    def spreadable(self) -> list[Entry]:
        """What this node may hand to peers: everything but stale entries."""
        return [e for e in self.store if e.written_ms >= self.stale_before]

    # -- persistence -----------------------------------------------------------------------

    def _commit(self, entries: list[Entry]) -> list[Entry]:
        """Save the state these entries lead to, then apply them (save before apply: store.py)."""
        self._save(self.store.merged(entries))
        return self._apply(entries)

    def _apply(self, entries: list[Entry]) -> list[Entry]:
        changed = [e for e in entries if self.store.apply(e)]
        if changed:
            self.on_change(changed)
        return changed

    def _save(self, entries: list[Entry]) -> None:
        now = self.wall()
        self.saver.save({"clock": self.clock.last, "saved_at_ms": now, "file_digest": self.file_digest,
                         "entries": [_to_json(e.to_wire()) for e in entries]})
        self._saved_at = now


def _to_json(wire: list[Any]) -> list[Any]:
    """The wire form with its two byte strings in base64, for a JSON file."""
    out = list(wire)
    out[5] = base64.b64encode(wire[5]).decode()
    out[6] = base64.b64encode(wire[6]).decode()
    return out


def _from_json(item: Any) -> list[Any]:
    if not isinstance(item, list) or len(item) != 7:
        raise ValueError("a stored config entry is a list of 7 fields")
    out = list(item)
    out[5] = base64.b64decode(item[5], validate=True)
    out[6] = base64.b64decode(item[6], validate=True)
    return out
