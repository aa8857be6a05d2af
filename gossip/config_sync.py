"""How config entries travel: announced by gossip when written, reconciled by anti-entropy.

Two paths, as the registry's updates and SWIM's own state take (and for the same
reasons):

- **Announcement.**  A node that writes an entry spreads it at once as a gossip
  query named ``config`` (gossip.swim's queries reach every member in the
  rounds an alive message takes).  The entry itself rides in the query when it
  fits one datagram, which every intention and most other entries do; a larger
  one is announced by key and version, and each node that lacks that version
  fetches it from the writer over TCP.  Queries are part of the wire format
  every agent already speaks, and an agent that knows no ``config`` query
  relays it and ignores it, so a mesh in the middle of an upgrade keeps working.
- **Anti-entropy.**  Every push-pull carries the sender's store digest (32
  bytes, a map key older agents ignore).  Two nodes whose digests differ each
  pull what they lack from the other: the puller sends its summary (key and
  version of every entry) and gets back the entries newer than it.  A
  converged mesh therefore sends 32 bytes per push-pull and nothing else; a
  node that missed an announcement, was partitioned or was down catches up at
  its next push-pull.
- **News travels on.**  Periodic push-pull alone would take many periods to
  carry what one side of a healed partition wrote to every node of the other.
  So a node that gains news by a pull goes on pulling from random members,
  and a node that answers a pull whose summary shows it news pulls back: news
  spreads as a rumour with feedback (Demers et al., "Epidemic algorithms for
  replicated database maintenance", 1987), and a node stops after
  ``NEWS_DULL`` pulls in a row that taught neither side anything, with
  periodic anti-entropy as the backstop.

Pure: message bodies in and out, no I/O; gossip.wire carries them.
"""

from typing import Any, Final, NamedTuple, Protocol

import msgpack

from gossip.address import Address
from gossip.config_store import MAX_KIND, MAX_NAME, ConfigStore, Entry, EntryError, Key, Summary
from gossip.frozen import same_class_equality
from gossip.wire import ConfigPull, ConfigPush

#: The gossip query that announces a written entry.
QUERY_NAME: Final = "config"
#: A node that gained news goes on pulling from random members until this many
#: pulls in a row taught neither side anything (Demers et al.'s feedback counter).
NEWS_DULL: Final = 4
#: Most entries a pull returns at once; the puller pulls again while more remain.
MAX_PULL_ENTRIES: Final = 512
#: Most summary rows a pull may send (a mesh with more entries than this is
#: far beyond what the config entries are for).
MAX_SUMMARY: Final = 100_000


class ConfigPeer(Protocol):
    """What push-pull asks of the node's config entries (gossip.sync calls it; the agent implements it)."""

    def digest(self) -> bytes:
        """The digest to send in this node's push-pulls."""
        ...

    def observed(self, peer: str, addr: Address, digest: bytes | None) -> None:
        """A push-pull with ``peer`` carried its digest (None: it takes no config entries)."""
        ...

    def answer(self, pull: ConfigPull, addr: Address) -> ConfigPush:
        """The reply to a peer's pull (from ``addr``); a puller whose summary shows news pulls back."""
        ...


class SyncError(ValueError):
    """A peer's announcement, summary or pull reply that is not well formed."""


@same_class_equality
class Announced(NamedTuple):
    """An announcement too large to carry its entry: which version to fetch, from the writer."""

    kind: str
    name: str
    order: tuple[int, str, bytes]


def announcement(entry: Entry, max_payload: int) -> bytes:
    """The query payload that announces ``entry``: the entry itself when it fits, else its key and version."""
    whole: bytes = msgpack.packb(["e", entry.to_wire()], use_bin_type=True)
    if len(whole) <= max_payload:
        return whole
    out: bytes = msgpack.packb(["k", entry.kind, entry.name, entry.version, entry.writer, entry.sig],
                               use_bin_type=True)
    return out


def parse_announcement(payload: bytes) -> Entry | Announced:
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=len(payload),
                              max_str_len=len(payload), max_array_len=16, max_map_len=4096)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise SyncError(f"announcement is not msgpack: {exc}") from None
    if isinstance(obj, list) and len(obj) == 2 and obj[0] == "e":
        try:
            return Entry.from_wire(obj[1])
        except EntryError as exc:
            raise SyncError(str(exc)) from None
    if isinstance(obj, list) and len(obj) == 6 and obj[0] == "k":
        _, kind, name, version, writer, sig = obj
        row = _row([kind, name, version, writer, sig])
        return Announced(row[0][0], row[0][1], row[1])
    raise SyncError("announcement is neither an entry nor a key and version")


def lacks(store: ConfigStore, announced: Announced) -> bool:
    """Whether this node holds an older version of the announced entry, or none."""
    held = store.get(announced.kind, announced.name)
    return held is None or held.order < announced.order


def summary_to_wire(summary: Summary) -> list[list[Any]]:
    return [[k[0], k[1], order[0], order[1], order[2]] for k, order in summary.items()]


def summary_from_wire(raw: Any) -> Summary:
    if not isinstance(raw, list) or len(raw) > MAX_SUMMARY:
        raise SyncError("a summary is a list of rows")
    out: Summary = {}
    for item in raw:
        key, order = _row(item)
        out[key] = order
    return out


def _row(item: Any) -> tuple[Key, tuple[int, str, bytes]]:
    if not isinstance(item, list) or len(item) != 5:
        raise SyncError("a summary row is [kind, name, version, writer, signature]")
    kind, name, version, writer, sig = item
    if not (isinstance(kind, str) and 0 < len(kind) <= MAX_KIND and isinstance(name, str)
            and 0 < len(name) <= MAX_NAME and type(version) is int and version > 0
            and isinstance(writer, str) and writer and isinstance(sig, bytes)):
        raise SyncError("a summary row has a field of the wrong type")
    return (kind, name), (version, writer, sig)


def wants_pull(mine: bytes, theirs: bytes | None) -> bool:
    """Whether a push-pull that carried ``theirs`` (a peer's digest; None from an agent that takes
    no config entries) calls for a pull from that peer: only when the two stores differ, so a
    converged mesh exchanges digests and nothing else."""
    return theirs is not None and theirs != mine


def next_pull(dull: int, learnt: bool, told: bool) -> int | None:
    """The rumour-with-feedback rule ("News travels on"), after one pull ended.

    ``dull`` counts the pulls in a row before this one that taught neither
    side anything; ``learnt``: this pull brought the puller entries that
    changed its state; ``told``: the answer said the puller's summary held news
    for the answering node (``ConfigPush.pulling_back``).  Returns the count to
    carry into one more pull from a random member, or None to stop; every
    node, simulated or real, follows this one rule, so the simulator's spread
    times are the agent's.
    """
    dull = 0 if learnt or told else dull + 1
    return dull if dull < NEWS_DULL else None


def has_news_for(store: ConfigStore, theirs: Summary) -> bool:
    """Whether ``theirs`` (a puller's summary) holds a version this store lacks or holds older."""
    for key, order in theirs.items():
        held = store.get(*key)
        if held is None or held.order < order:
            return True
    return False


def pull_reply(store: ConfigStore, theirs: Summary, with_keys: bool) -> tuple[list[Entry], list[Key] | None, bool]:
    """What a node answers a pull: the entries newer than the puller's summary (at most
    MAX_PULL_ENTRIES, oldest first, and whether more remain), and with ``with_keys``
    every key it holds (what a stale puller needs to settle, agent.config_entries)."""
    newer = sorted(store.newer_than(theirs), key=lambda e: e.order)
    keys = [e.key for e in store] if with_keys else None
    return newer[:MAX_PULL_ENTRIES], keys, len(newer) > MAX_PULL_ENTRIES
