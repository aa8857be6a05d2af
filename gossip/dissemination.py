"""Infection-style dissemination: updates ride on every datagram we send, and on gossip rounds.

SWIM piggybacks membership updates on its probe traffic; memberlist adds
gossip rounds to a few random members every gossip interval, and Lifeguard's
updates that matter most (refutations) go first (gossip.broadcast_queue).
Targets include members dead only recently: they may still hear, and refute,
what is said about them.
"""

from __future__ import annotations

import math

from gossip.broadcast_queue import PRIORITY_ALIVE, PRIORITY_OTHER, BroadcastQueue
from gossip.effects import EventKind, SendPacket
from gossip.member import Member, Status
from gossip.table import MemberTable
from gossip.wire import PACKET_OVERHEAD, Address, Alive, Message, encode_message, pack_packet

#: The type of a pre-encoded message, for counting what we send: every
#: message is a msgpack map whose first key is "t" (fixstr), then its type.
_ENCODED_TYPE_AT = 3

#: Up to this many members, gossip targets are sampled from a full scan (exact);
#: above it, by random probes into the name list (memberlist's kRandomNodes).
_EXACT_SAMPLE_MAX = 64


class Dissemination:
    def __init__(self, table: MemberTable, seal_overhead: int, now: float) -> None:
        self.table = table
        self.config = table.config
        self.queue = BroadcastQueue()
        self._members = table.members
        self._name = table.name
        self._rng = table.rng
        self._stats = table.counters.stats
        self._num_up = table.num_up
        self._packet_budget = self.config.udp_packet_size - seal_overhead - PACKET_OVERHEAD
        self._next_gossip = now + self.config.gossip_interval
        self._last_gossip = now
        #: A gossip round brought forward by a fresh update (eager_gossip_gap after the last).
        self._eager_at: float | None = None
        self._next_drop_report = 0.0
        table.on_forget(self.queue.discard)

    # -- timers --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        if now >= self._next_gossip or (self._eager_at is not None and now >= self._eager_at):
            if len(self.queue):
                self.gossip_round(now)
            self._next_gossip = now + self.config.gossip_interval
            self._eager_at = None

    def next_deadline(self) -> float:
        if not len(self.queue):
            return math.inf
        if self._eager_at is not None and self._eager_at < self._next_gossip:
            return self._eager_at
        return self._next_gossip

    def gossip_now(self, now: float) -> None:
        """A gossip round at once, in place of the next periodic one."""
        self.gossip_round(now)
        self._next_gossip = now + self.config.gossip_interval

    # -- what to say, and to whom -----------------------------------------------------------

    def broadcast(self, key: str, msg: Message) -> None:
        """Queue ``msg`` for dissemination, replacing any queued update under ``key``."""
        encoded = encode_message(msg)
        if len(encoded) > self._packet_budget:
            # It could never ride in a datagram; push-pull (TCP) carries it.
            self._stats["broadcast_too_large"] += 1
            return
        queue = self.queue
        queue.set_cluster_size(self._num_up())
        dropped = queue.dropped
        queue.queue(key, encoded, PRIORITY_ALIVE if isinstance(msg, Alive) else PRIORITY_OTHER)
        now = self.table.now
        if queue.dropped != dropped:
            self._stats["broadcasts_dropped"] += queue.dropped - dropped
            if now >= self._next_drop_report:
                # Logged at most every 10 s, with the total: never silent, never a flood.
                self._next_drop_report = now + 10.0
                self.table.event(EventKind.BROADCASTS_DROPPED, total=self._stats["broadcasts_dropped"],
                                 bound=queue.max_depth,
                                 detail="more updates than the queue holds; the least valuable were dropped "
                                        "(push-pull repairs what they would have said)")
        if self._eager_at is None:
            self._eager_at = max(now, self._last_gossip + self.config.eager_gossip_gap)

    def pending(self, key: str) -> bool:
        return self.queue.pending(key)

    def eligible(self, m: Member, now: float) -> bool:
        """Up, or dead recently enough that it may still hear (and refute) what we say."""
        return m.status.up or (m.status is Status.DEAD and now - m.status_since < self.config.gossip_to_the_dead)

    def targets(self, now: float) -> list[Member]:
        """Every member we would gossip to."""
        return [m for m in self._members.values() if m.name != self._name and self.eligible(m, now)]

    def random_targets(self, now: float, k: int) -> list[Member]:
        """k distinct gossip targets at random, as memberlist's kRandomNodes finds them.

        Scanning the whole table every gossip round costs O(N) per round, which
        at thousands of members is most of a node's work; random probes into
        the name list find k eligible members in about k tries.  Small tables
        are sampled exactly.
        """
        members = self._members
        if len(members) <= _EXACT_SAMPLE_MAX:
            candidates = self.targets(now)
            return self._rng.sample(candidates, min(k, len(candidates)))
        names = self.table.names()
        n = len(names)
        out: list[Member] = []
        tried: set[str] = set()
        for _ in range(3 * n):
            if len(out) >= k:
                break
            name = names[self._rng.randrange(n)]
            if name in tried or name == self._name:
                continue
            tried.add(name)
            m = members.get(name)
            if m is not None and self.eligible(m, now):
                out.append(m)
        return out

    def gossip_round(self, now: float) -> None:
        self._last_gossip = now
        for m in self.random_targets(now, self.config.gossip_nodes):
            if not len(self.queue):
                break
            self.send(m.addr, [])

    def fresh(self) -> tuple[str, ...]:
        """Members whose alive we are still spreading: news to part of the cluster yet.

        A push-pull names them so that the other side spreads them as well.  A
        member learned from a push-pull is otherwise not spread (it is old news to
        the cluster, and spreading every one would flood gossip), but in a burst
        of joins the members that joined a moment ago are news to many: members
        that learned them only from the seed's reply would never pass them on,
        and since gossip retransmits each update only retransmit_mult * log10(N)
        times, a few members could stay unaware of a few others until the next
        periodic push-pull (docs/membership.md, "Join bursts").
        """
        if not len(self.queue):
            return ()
        members = self._members
        return tuple(k for k in self.queue.keys()
                     if k != self._name and (m := members.get(k)) is not None and m.status is Status.ALIVE)

    # -- datagrams -------------------------------------------------------------------------

    def send(self, addr: Address, msgs: list[Message]) -> None:
        """A datagram of ``msgs``, with as many queued updates as fit beside them."""
        encoded = [encode_message(m) for m in msgs]
        budget = self._packet_budget - sum(len(e) for e in encoded)
        limit = self.config.retransmit_limit(self._num_up())
        encoded.extend(self.queue.get(budget, limit))
        self._send_encoded(addr, encoded)

    def send_only(self, addr: Address, msgs: list[Message]) -> None:
        """A datagram of ``msgs`` alone, with no queued updates riding along."""
        self._send_encoded(addr, [encode_message(m) for m in msgs])

    def _send_encoded(self, addr: Address, encoded: list[bytes]) -> None:
        if not encoded:
            return
        payload = pack_packet(encoded)
        stats = self._stats
        stats["packets_out"] += 1
        for e in encoded:
            n = e[_ENCODED_TYPE_AT] & 0x1F
            stats["msg_out." + e[_ENCODED_TYPE_AT + 1:_ENCODED_TYPE_AT + 1 + n].decode()] += 1
        self.table.outbox.append(SendPacket(addr, payload))
