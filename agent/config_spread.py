"""How this node's config entries reach its peers and theirs reach it (gossip.config_sync).

The protocol's rules and messages are in gossip.config_sync; this is the part
that needs the agent's sockets and tasks: announcing a write as a gossip
query, answering and sending pulls over the gossip TCP port, and keeping news
moving after a pull brought some.  The membership calls it as its ConfigPeer.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from agent.config_entries import ConfigEntries
from agent.transport import FrameError, Mismatch
from gossip import config_sync
from gossip.config_store import Entry
from gossip.member import Status
from gossip.swim import Membership
from gossip.wire import MAX_QUERY_PAYLOAD, Address, ConfigPull, ConfigPush, DecodeError, decode_stream, encode_stream

#: Answers one pull may take (each up to gossip.config_sync.MAX_PULL_ENTRIES entries).
MAX_PULL_ANSWERS = 64
#: How often expired tombstones are purged and the entries' file kept recent
#: (ConfigEntries.maintain): far below its hourly touch, so the file's time is
#: never more than an hour and a minute old while the agent runs.
UPKEEP_EVERY = 60.0


async def upkeep(entries: ConfigEntries, log: Any, every: float = UPKEEP_EVERY) -> None:
    """Maintain ``entries`` every ``every`` seconds, for as long as the agent runs.

    Without it tombstones would be kept for ever, and a node up for longer
    than the tombstone TTL without a write would find its own file that old at
    its next start and take its entries for stale (agent.config_entries).
    """
    while True:
        await trio.sleep(every)
        gone = entries.maintain()
        if gone:
            log.info("config_tombstones_purged", count=len(gone))


class ConfigSpread:
    def __init__(self, entries: ConfigEntries, membership: Membership,
                 exchange: Callable[[Address, bytes], Awaitable[bytes]], flush: Callable[[], Awaitable[None]],
                 wake: Callable[[], None], log: Any, tcp_timeout: float) -> None:
        self.entries = entries
        self.membership = membership
        self._exchange = exchange
        self._flush = flush
        self._wake = wake
        self.log = log
        self.tcp_timeout = tcp_timeout
        #: Where pulls run (the agent's nursery, once it runs).
        self.nursery: trio.Nursery | None = None
        #: Peers a pull is under way with (one at a time each).
        self._pulls: set[str] = set()
        #: Members whose push-pulls carry no config digest: agents of a release before config entries.
        self.unaware: set[str] = set()
        #: Members whose push-pulls carried one: the only ones a pull may go to unasked (_pull_next).
        #: A member not yet push-pulled with is in neither set, and may be of the older release.
        self.aware: set[str] = set()

    def peers_without_config(self) -> list[str]:
        """The members, still in the mesh, whose push-pulls carry no config digest (an older release).

        One that left or died is no longer named: it holds nothing, and a mesh
        whose last old agent has gone shows none.
        """
        members = self.membership.members
        return sorted(n for n in self.unaware
                      if (m := members.get(n)) is not None and m.status.up)

    def start(self, nursery: trio.Nursery) -> None:
        """Run in the agent's nursery: the pulls, and the entries' upkeep."""
        self.nursery = nursery
        nursery.start_soon(upkeep, self.entries, self.log)

    def announce(self, entry: Entry) -> None:
        """Spread an entry written here to every member at once (gossip.config_sync, "Announcement")."""
        if self.entries.stale_before:
            return  # not until this node has synced: its entries may be ones the mesh deleted
        qid = self.membership.start_query(trio.current_time(), config_sync.QUERY_NAME,
                                          config_sync.announcement(entry, MAX_QUERY_PAYLOAD))
        self.membership.finish_query(qid)  # nobody answers an announcement
        self._wake()

    # -- the membership's ConfigPeer ------------------------------------------------------

    def digest(self) -> bytes:
        return self.entries.digest()

    def observed(self, peer: str, addr: Address, digest: bytes | None) -> None:
        if digest is None:
            self.unaware.add(peer)
            self.aware.discard(peer)
            return
        self.unaware.discard(peer)
        self.aware.add(peer)
        if config_sync.wants_pull(self.entries.digest(), digest):
            self._start_pull(peer, addr, 0)
        else:
            self.entries.in_step_with(digest)

    def answer(self, pull: ConfigPull, addr: Address) -> ConfigPush:
        push = self.entries.answer(pull)
        if not push.pulling_back:
            return push
        member = self.membership.members.get(pull.source)
        if member is None:
            return push._replace(pulling_back=False)  # nowhere to pull back from
        self._start_pull(pull.source, member.addr, 0)  # pull back what it has and we lack
        return push

    def _start_pull(self, peer: str, addr: Address, dull: int) -> None:
        if peer not in self._pulls and self.nursery is not None:
            self._pulls.add(peer)
            self.nursery.start_soon(self._pull_config, peer, addr, dull)

    def _pull_next(self, after: str, dull: int) -> None:
        """Go on spreading news: one more pull from a random member (gossip.config_sync, "News travels on")."""
        me = self.membership.name
        peers = [m for m in self.membership.members.values()
                 if m.status is Status.ALIVE and m.name not in (me, after) and m.name in self.aware]
        if peers:
            m = random.choice(peers)
            self._start_pull(m.name, m.addr, dull)

    async def _pull_config(self, peer: str, addr: Address, dull: int = 0) -> None:
        """Fetch from ``peer`` the entries this node lacks, in as many answers as it takes; then, while
        pulls teach either side something (``dull`` counts those that did not), pull from another."""
        news_before = self.entries.stats["pulled"]
        told = False
        try:
            for _ in range(MAX_PULL_ANSWERS):
                with trio.move_on_after(self.tcp_timeout) as scope:
                    reply = await self._exchange(addr, encode_stream([self.entries.pull_request()]))
                if scope.cancelled_caught:
                    self.log.debug("config_pull_failed", member=peer, error="timed out")
                    return
                msgs = decode_stream(reply)
                if len(msgs) != 1 or not isinstance(msgs[0], ConfigPush):
                    self.membership.drop("unexpected_type")
                    return
                told = told or msgs[0].pulling_back
                if not self.entries.apply_push(msgs[0], peer):
                    return
        except (OSError, Mismatch, FrameError, DecodeError, trio.BrokenResourceError,
                trio.ClosedResourceError) as exc:
            self.log.debug("config_pull_failed", member=peer, error=str(exc) or type(exc).__name__)
        finally:
            self._pulls.discard(peer)
            carry = config_sync.next_pull(dull, learnt=self.entries.stats["pulled"] > news_before, told=told)
            if carry is not None:
                self._pull_next(after=peer, dull=carry)
            await self._flush()

    def on_query(self, fields: dict[str, Any]) -> None:
        try:
            got = config_sync.parse_announcement(fields["payload"])
        except config_sync.SyncError as exc:
            self.entries.stats["refused_malformed"] += 1
            self.log.warning("config_announcement_malformed", origin=fields["origin"], detail=str(exc))
            return
        if isinstance(got, Entry):
            self.entries.receive([got])
        elif config_sync.lacks(self.entries.store, got):
            # Too large to ride in the query: pull from its writer what this node lacks.
            self._start_pull(fields["origin"], fields["origin_addr"], 0)
