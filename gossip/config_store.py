"""Mesh-wide config entries as a CRDT: the same entries on every node, with no leader.

Consul keeps its config entries (intentions, service defaults, resolvers,
splitters, routers) on servers that agree through Raft.  Here any node may
write one, so the store must converge by itself: every node that has received
the same writes, in whatever order and however many times, holds the same
entries.  That is a last-writer-wins map (Shapiro et al., "A comprehensive
study of Convergent and Commutative Replicated Data Types", 2011, the LWW
register, one per key), and it holds because the merge is a maximum over a
total order:

- an entry's key is (kind, name);
- its version is (hybrid-logical timestamp, writer's name, signature): the
  timestamp orders writes as causality and then wall time do
  (gossip/hlc.py), the writer's name breaks ties between two writes in the
  same millisecond, and the signature breaks the last tie (one writer
  signing two bodies under one version, which only a broken or hostile node
  does) the same way everywhere;
- a delete is a write too: a *tombstone*, an entry with no body, which wins
  over older writes like any other and so cannot be undone by a node that
  missed it.

Tombstones cannot be kept for ever, so each is dropped ``tombstone_ttl`` after
it was written.  Nodes drop them at slightly different moments (each by its
own clock and timer), and in between their digests differ; a node that has
dropped a tombstone must then not take it back from one that has not yet, or
the dropped tombstones would travel from node to node for as long as
someone still held one.  So a store refuses a tombstone older than its last
purge's horizon for a key it holds nothing of (for a reader, an absent key and
a deleted one are the same); one that would delete an older entry it holds
is still applied, and purged at the next turn.  A node that was away longer than that may still hold an
entry whose delete it never heard and whose tombstone is now gone everywhere
else; the store cannot tell that entry from a fresh one, so it is the
caller's job to treat such a node's stored entries as *stale*
(:meth:`ConfigStore.drop_stale`): see agent's use for when.

Every entry is signed by its writer's node identity (the Ed25519 key that
signs its alive messages, gossip/signing.py) and carries the public key, so it
stays verifiable after its writer has left or taken a new identity; the
signature covers kind, name, body, version and writer.

Anti-entropy compares a digest of the whole store first, so two nodes that
agree exchange 32 bytes; only when the digests differ do they exchange the
(key, version) summaries, and then only the entries one side lacks.

Pure: no clock, no I/O; bodies are plain JSON-like values, checked by the
agent (agent/entry_kinds.py) before they are written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any, Final, NamedTuple

from msgpack import packb

from gossip import hlc
from gossip.frozen import same_class_equality
from gossip.signing import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Signer, Verifier

#: Domain separation: a config entry's signature is never valid as an alive's or anything else.
_CONTEXT: Final = "mesh-agent config entry v1"
#: How long a delete is remembered.  Longer than a member is remembered after
#: it died or left (gossip's reap time, 24 h in every profile), so a node that
#: comes back as the same member has had the chance to hear it.
DEFAULT_TOMBSTONE_TTL_MS: Final = 72 * 3600 * 1000
MAX_KIND: Final = 64
MAX_NAME: Final = 256

Key = tuple[str, str]
#: What anti-entropy compares per entry: its version, without the body.
Summary = dict[Key, tuple[int, str, bytes]]


class EntryError(ValueError):
    """An entry that is malformed or whose signature does not hold."""


def canonical(value: Any) -> Any:
    """A form of ``value`` whose msgpack encoding is the same on every node.

    msgpack keeps a map's insertion order, which JSON parsers and merges do not
    promise to keep; maps become lists of [key, value] pairs sorted by key.
    """
    if isinstance(value, dict):
        return [[k, canonical(value[k])] for k in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def signed_bytes(kind: str, name: str, body: dict[str, Any] | None, version: int, writer: str) -> bytes:
    out: bytes = packb([_CONTEXT, kind, name, canonical(body), version, writer], use_bin_type=True)
    return out


@same_class_equality
class Entry(NamedTuple):
    kind: str
    name: str
    #: None for a delete (a tombstone).
    body: dict[str, Any] | None
    #: A hybrid-logical timestamp (gossip/hlc.py).
    version: int
    writer: str
    #: The writer's Ed25519 public key and its signature over signed_bytes.
    public: bytes
    sig: bytes

    @property
    def key(self) -> Key:
        return (self.kind, self.name)

    @property
    def deleted(self) -> bool:
        return self.body is None

    @property
    def order(self) -> tuple[int, str, bytes]:
        """The total order of versions that every node applies alike."""
        return (self.version, self.writer, self.sig)

    @property
    def written_ms(self) -> int:
        return hlc.wall_ms(self.version)

    @classmethod
    def write(cls, signer: Signer, writer: str, kind: str, name: str, body: dict[str, Any] | None,
              version: int) -> Entry:
        """A new entry (or, with ``body`` None, a delete), signed by this node."""
        _check_key(kind, name)
        sig = signer.sign(signed_bytes(kind, name, body, version, writer))
        return cls(kind, name, body, version, writer, signer.public, sig)

    def verify(self, verifier: Verifier) -> None:
        """Raise EntryError unless the entry is well formed and its writer's key signed it."""
        _check_key(self.kind, self.name)
        if self.body is not None and not isinstance(self.body, dict):
            raise EntryError("an entry's body must be a map")
        if not isinstance(self.version, int) or self.version <= 0:
            raise EntryError("an entry's version must be a positive integer")
        if not isinstance(self.writer, str) or not self.writer:
            raise EntryError("an entry must name its writer")
        if len(self.public) != PUBLIC_KEY_SIZE or len(self.sig) != SIGNATURE_SIZE:
            raise EntryError("an entry's key or signature has the wrong size")
        data = signed_bytes(self.kind, self.name, self.body, self.version, self.writer)
        if not verifier.verify(self.public, data, self.sig):
            raise EntryError(f"the signature of {self.kind} {self.name!r} by {self.writer} does not hold")

    def to_wire(self) -> list[Any]:
        return [self.kind, self.name, self.body, self.version, self.writer, self.public, self.sig]

    @classmethod
    def from_wire(cls, raw: Any) -> Entry:
        """Parse what to_wire made (from a peer or from disk); the signature is checked by verify."""
        if not isinstance(raw, (list, tuple)) or len(raw) != 7:
            raise EntryError("a config entry is a list of 7 fields")
        kind, name, body, version, writer, public, sig = raw
        if not (isinstance(kind, str) and isinstance(name, str) and isinstance(writer, str)
                and isinstance(version, int) and not isinstance(version, bool)
                and isinstance(public, bytes) and isinstance(sig, bytes)
                and (body is None or isinstance(body, dict))):
            raise EntryError("a config entry field has the wrong type")
        return cls(kind, name, body, version, writer, public, sig)


def _check_key(kind: str, name: str) -> None:
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND:
        raise EntryError(f"an entry's kind must be 1 to {MAX_KIND} characters")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise EntryError(f"an entry's name must be 1 to {MAX_NAME} characters")


def _wins(entry: Entry, held: Entry | None) -> bool:
    """The merge rule: an entry replaces what is held exactly when its version orders later."""
    return held is None or held.order < entry.order


def _expired(entry: Entry, held: Entry | None, horizon_ms: int) -> bool:
    """A tombstone from before the horizon, for a key held nothing of: it would change nothing."""
    return held is None and entry.deleted and entry.written_ms < horizon_ms


class ConfigStore:
    """The entries this node holds, live and deleted, merged as a last-writer-wins map."""

    def __init__(self, tombstone_ttl_ms: int = DEFAULT_TOMBSTONE_TTL_MS) -> None:
        self.tombstone_ttl_ms = tombstone_ttl_ms
        self._entries: dict[Key, Entry] = {}
        self._digest: bytes | None = None
        #: The latest purge's horizon (ms): tombstones older than this are not taken back.
        self.horizon_ms = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def get(self, kind: str, name: str) -> Entry | None:
        """The entry for this key, a tombstone included (``deleted`` says which)."""
        return self._entries.get((kind, name))

    def live(self, kind: str | None = None) -> list[Entry]:
        """The entries not deleted, of one kind or all, sorted by key."""
        return sorted((e for e in self._entries.values() if not e.deleted and (kind is None or e.kind == kind)),
                      key=lambda e: e.key)

    def apply(self, entry: Entry) -> bool:
        """Merge one entry (already verified); True if it replaced what this node held.

        Commutative, associative and idempotent: the state is the maximum entry
        per key, whatever the order and repetition of the calls.  (Past a purge's
        horizon, an old tombstone for an absent key is refused: module docstring.
        Only a node that missed the delete for longer than the TTL could then see
        order matter, and that node is the stale case drop_stale is for.)
        """
        held = self._entries.get(entry.key)
        if not _wins(entry, held) or _expired(entry, held, self.horizon_ms):
            return False
        self._entries[entry.key] = entry
        self._digest = None
        return True

    def merged(self, entries: Iterable[Entry]) -> list[Entry]:
        """What the store would hold after applying ``entries``, without applying them
        (a caller that saves before it applies writes this)."""
        after = dict(self._entries)
        for e in entries:
            held = after.get(e.key)
            if _wins(e, held) and not _expired(e, held, self.horizon_ms):
                after[e.key] = e
        return list(after.values())

    def purge(self, now_ms: int) -> list[Entry]:
        """Drop the tombstones older than the TTL; return them."""
        horizon = self.horizon_ms = max(self.horizon_ms, now_ms - self.tombstone_ttl_ms)
        gone = [e for e in self._entries.values() if e.deleted and e.written_ms < horizon]
        for e in gone:
            del self._entries[e.key]
        if gone:
            self._digest = None
        return gone

    def drop_stale(self, keep: Iterable[Key], before_ms: int) -> list[Entry]:
        """Forget entries written before ``before_ms`` unless their key is in ``keep``; return them.

        For a node that was away longer than the tombstone TTL: an entry it
        holds from before it left, which the mesh no longer has, may be one
        whose delete it missed and whose tombstone has since been dropped.
        """
        kept = set(keep)
        gone = [e for e in self._entries.values() if e.written_ms < before_ms and e.key not in kept]
        for e in gone:
            del self._entries[e.key]
        if gone:
            self._digest = None
        return gone

    def digest(self) -> bytes:
        """32 bytes that are equal on two nodes exactly when they hold the same versions."""
        if self._digest is None:
            h = hashlib.sha256()
            for key in sorted(self._entries):
                e = self._entries[key]
                h.update(packb([e.kind, e.name, e.version, e.writer, e.sig], use_bin_type=True))
            self._digest = h.digest()
        return self._digest

    def summary(self) -> Summary:
        return {k: e.order for k, e in self._entries.items()}

    def newer_than(self, theirs: Summary) -> list[Entry]:
        """The entries the holder of ``theirs`` lacks or holds an older version of."""
        out = []
        for k, e in self._entries.items():
            other = theirs.get(k)
            if other is None or other < e.order:
                out.append(e)
        return out
