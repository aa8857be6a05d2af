"""SWIM membership with Lifeguard's refinements, as a sans-I/O state machine.

The caller owns time and sockets.  It feeds :class:`Membership` with
``receive(now, src, packet)`` and ``tick(now)``, performs what ``drain()``
returns (datagrams to send, TCP push-pull exchanges to run), and calls
``tick`` again at ``next_deadline()``.  The same object runs in the trio agent
and in the simulator on a virtual clock.

References: SWIM (Das, Gupta, Motivala, 2002) for probing, ping-req, suspicion
and infection-style dissemination; Lifeguard (Dadgar, Phillips, Currey, 2018)
for the local health multiplier, dynamic suspicion timeouts and the buddy
system; hashicorp/memberlist for the concrete rules and defaults.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from gossip.awareness import Awareness
from gossip.broadcast_queue import PRIORITY_ALIVE, PRIORITY_OTHER, BroadcastQueue
from gossip.config import GossipConfig
from gossip.coordinate import DEFAULT as COORDINATE_CONFIG
from gossip.coordinate import Coordinate, CoordinateClient
from gossip.keyring import SEAL_OVERHEAD
from gossip.member import MEMBER_CHANGES, Member, Status
from gossip.signing import Signer, Verifier, alive_bytes
from gossip.suspicion import Suspicion
from gossip.wire import (
    MAX_INCARNATION,
    MAX_QUERY_PAYLOAD,
    PACKET_OVERHEAD,
    Ack,
    Address,
    Alive,
    Dead,
    DecodeError,
    MemberRecord,
    Message,
    Nack,
    NodeState,
    Ping,
    PingReq,
    PushPull,
    Query,
    QueryResponse,
    StateReply,
    StateRequest,
    Suspect,
    Tunnel,
    decode_packet,
    decode_stream,
    encode_message,
    encode_push_pull_stream,
    encode_stream,
    format_addr,
    message_to_obj,
    pack_packet,
    pack_record,
)

#: Upper bounds (seconds) of the probe RTT histogram: loopback to intercontinental.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: The type of a pre-encoded message, for counting what we send: every
#: message is a msgpack map whose first key is "t" (fixstr), then its type.
_ENCODED_TYPE_AT = 3

#: How long a query is remembered (so its copies gossiped back to us are not
#: run twice) and how long its origin waits for answers at most.
QUERY_MEMORY = 120.0

#: Up to this many members, gossip targets are sampled from a full scan (exact);
#: above it, by random probes into the name list (memberlist's kRandomNodes).
_EXACT_SAMPLE_MAX = 64
#: Live members a leaving agent tells directly, besides gossiping its leave.
LEAVE_DIRECT = 32
#: Settling push-pulls after one join at most (see Membership._settle_pending).
#: An agent that joins early in a burst hears news in lulls for as long as the
#: burst lasts, and each settle that brings news spends one, so the cap must
#: outlast the burst (docs/membership.md, "Settling after a join").
SETTLE_MAX = 8

#: A push-pull's refusal when it came from this agent itself (a seed list naming it).
class Refusal(StrEnum):
    """Why a push-pull was refused, as the wire carries it beside the sentence for people."""

    #: The initiator is this agent itself (a seed list that names us): not a failure.
    SELF = "self"
    #: Our name, claimed by another agent.
    NAME_TAKEN = "name_taken"
    #: The initiator's name is alive elsewhere under this name.
    NAME_ALIVE = "name_alive"

#: Other members asked for a node's catalog when the node itself cannot be reached.
_FETCH_FALLBACKS = 2
#: A member seen for the first time has its signature checked this long after
#: it arrived, and before its tunnel key is used (``checked``).  Why it may
#: wait: on first sight the signature cannot bind anything -- the name takes
#: the key that comes with it (trust on first use, gossip.signing) -- it only
#: shows that the other fields are the key owner's.  In a burst of joins every
#: agent checks a signature per joiner while the seed, one process among many
#: sharing a few cores, is what the cluster waits on; checked after the burst,
#: the same work no longer delays it (docs/membership.md, "First-sight signatures").
VERIFY_DELAY = 1.0
#: How often, at most, we ask a member's address who holds it (Membership._verify_address).
VERIFY_ADDRESS_EVERY = 2.0

#: Distinct address mismatches reported at most (a bound on what a peer can make us keep).
_MAX_ADDR_WARNINGS = 4096

#: Seconds; no coordinate component of a real network comes near it.
_MAX_COORD_COMPONENT = 100.0

# -- what the state machine asks its driver to do ----------------------------------


@dataclass(frozen=True)
class SendPacket:
    """Send this (plaintext) packet as one UDP datagram to ``addr``."""

    addr: Address
    payload: bytes


class Purpose(StrEnum):
    """Why a push-pull is made: what its result counts towards (complete_push_pull)."""

    #: The seed retry loop of a join.
    JOIN = "join"
    #: A join asked for through the API.
    EXPLICIT = "explicit"
    #: Periodic anti-entropy (a lite exchange: see push_pull_payload).
    SYNC = "sync"
    #: A member marked dead, tried again in case it is back.
    RECONNECT = "reconnect"
    #: A full exchange once news of new members stops after a join.
    SETTLE = "settle"
    #: A full exchange asked for after a lite one showed a difference.
    FULL = "full"
    #: Who holds a member's address now (_verify_address).
    VERIFY = "verify"
    #: A join whose seed turned out to be this agent itself (never sent; counted off the join).
    SELF = "self"


@dataclass(frozen=True)
class StartPushPull:
    """Open TCP to ``target``, send ``push_pull_payload()``, read the reply, and
    report back with ``complete_push_pull``.  ``target`` may hold a host name
    (a seed), which the driver resolves at each attempt."""

    target: Address
    purpose: Purpose


@dataclass(frozen=True)
class FetchState:
    """Ask ``addr`` over TCP for ``node``'s full state (``state_request_payload``)
    and hand the reply to ``complete_fetch``."""

    node: str
    addr: Address


@dataclass(frozen=True)
class TcpProbe:
    """memberlist's fallback ping: send ``payload`` (a Ping) over TCP to ``addr``
    and report the reply (an Ack) with ``complete_tcp_probe(seq, reply)`` before
    ``deadline``.  A member whose UDP is blocked by a firewall stays alive this
    way, and is reported as such instead of flapping."""

    addr: Address
    seq: int
    payload: bytes
    deadline: float


Effect = SendPacket | StartPushPull | FetchState | TcpProbe

#: The counter of each message type received ("msg_in.alive", ...), built once per type.
_MSG_IN_KEYS: dict[type, str] = {}


class Delegate(Protocol):
    """Application state that rides on membership, as memberlist's Delegate.

    Only a small summary (``state()``) travels on alive messages; the full
    state travels over TCP: all of it in push-pull, one node's on demand.
    """

    def state(self) -> NodeState: ...

    def advertised(self, node: str, version: int, digest: bytes) -> bool: ...

    def dump(self) -> bytes: ...

    def merge_dump(self, data: bytes) -> object: ...

    def encode_node(self, node: str) -> bytes | None: ...

    def apply_node(self, data: bytes) -> object: ...

    def fetch_done(self, node: str, ok: bool = True) -> bool: ...

    def forget(self, node: str) -> None: ...


class EventKind(StrEnum):
    """What an Event reports; its value is the log line's event name (agent.runner logs it)."""

    ADDRESS_MISMATCH = "address_mismatch"
    BROADCASTS_DROPPED = "broadcasts_dropped"
    JOIN_REFUSED = "join_refused"
    JOIN_REFUSED_BY_PEER = "join_refused_by_peer"
    JOIN_RETRY = "join_retry"
    MEMBER = "member"
    MEMBER_FORGED = "member_forged"
    MEMBER_MOVED = "member_moved"
    MEMBER_REAPED = "member_reaped"
    MEMBER_REKEYED = "member_rekeyed"
    NAME_CONFLICT = "name_conflict"
    PREVIOUS_IDENTITY = "previous_identity"
    QUERY = "query"
    REFUTE = "refute"
    UDP_BLOCKED = "udp_blocked"
    UDP_RESTORED = "udp_restored"


@dataclass(frozen=True)
class Event:
    """Something worth a log line: ``kind`` is the event name, ``fields`` its data."""

    kind: EventKind
    fields: dict[str, Any]


# -- internal timers --------------------------------------------------------------


@dataclass
class _Probe:
    target: str
    seq: int
    sent: float
    direct_deadline: float
    end: float
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0
    #: The TCP fallback probe got the target's ack.
    tcp_ok: bool = False


@dataclass
class _Relay:
    """A ping-req we are serving for someone else."""

    requester: Address
    orig_seq: int
    target: str
    nack_at: float | None
    expire: float


@dataclass
class _JoinLoop:
    seeds: list[Address]
    next_at: float
    attempt: int = 0
    in_flight: int = 0
    done: bool = False
    last_error: str = ""


@dataclass
class _Counters:
    drops: Counter[str] = field(default_factory=Counter)
    stats: Counter[str] = field(default_factory=Counter)
    #: Direct-probe round trips: counts per RTT_BUCKETS bound (the last: above
    #: them all) and their sum, in seconds -- a Prometheus histogram's parts.
    rtt_buckets: list[int] = field(default_factory=lambda: [0] * (len(RTT_BUCKETS) + 1))
    rtt_sum: float = 0.0


def _alive_of(r: MemberRecord) -> Alive:
    """The alive a push-pull record carries: the member's own, signed, where the record has its signature."""
    return Alive(r.name, r.incarnation, r.addr, r.tags, r.state, r.tunnel, r.identity, r.sig)


class Membership:
    def __init__(
        self,
        name: str,
        addr: Address,
        config: GossipConfig,
        *,
        tags: dict[str, str] | None = None,
        rng: random.Random | None = None,
        now: float = 0.0,
        incarnation: int = 0,
        seal_overhead: int = SEAL_OVERHEAD,
        delegate: Delegate | None = None,
        tunnel: Tunnel | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.name = name
        self.addr = addr
        self.config = config
        self.rng = rng if rng is not None else random.Random()
        self.delegate = delegate
        #: Our identity key; None runs unsigned (the simulator), and then only
        #: unsigned members are accepted: a cluster is signed or not, as a whole.
        self.signer = signer
        self.verifier = Verifier()
        self.me = Member(name, addr, incarnation, Status.ALIVE, dict(tags or {}), now,
                         state=delegate.state() if delegate else None, tunnel=tunnel)
        self.members: dict[str, Member] = {name: self.me}
        self.awareness = Awareness(config.awareness_max_multiplier if config.lifeguard else 1)
        self.broadcasts = BroadcastQueue()
        #: Vivaldi (as Serf runs it): every direct ack carries the acker's
        #: coordinate and its RTT sample moves ours, so any two members' RTT
        #: can be estimated without ever probing between them.
        self.vivaldi = CoordinateClient(COORDINATE_CONFIG, self.rng)
        self.coordinates: dict[str, Coordinate] = {}
        #: Queries seen, (origin, id) -> when to forget them (see start_query).
        self._queries_seen: dict[tuple[str, int], float] = {}
        #: Our own queries still collecting answers: id -> member -> payload.
        self.query_responses: dict[int, dict[str, bytes]] = {}
        self.counters = _Counters()
        self.leaving = False
        self._packet_budget = config.udp_packet_size - seal_overhead - PACKET_OVERHEAD
        self._seq = self.rng.randrange(1 << 30)
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, Suspicion] = {}
        #: (deadline, name) of every suspicion, a heap with stale entries left in
        #: place (a refuted or confirmed suspicion's old deadline) and skipped when
        #: they reach the top: while a partition splits a cluster a member holds
        #: hundreds of suspicions, and next_deadline runs after every packet.
        self._suspicion_heap: list[tuple[float, str]] = []
        self._join: _JoinLoop | None = None
        #: After a join: one push-pull with a random member once news of new
        #: members stops (GossipConfig.settle_quiet), which catches the few
        #: members an epidemic with bounded retransmits may still have missed,
        #: instead of waiting for the next periodic push-pull.  A settle that
        #: itself brings news means the quiet was a lull, not the end of the
        #: burst: another follows after twice the quiet, up to SETTLE_MAX per
        #: join (agents joining at once on few cores starve each other, so a
        #: burst has lulls).  The first settle that brings nothing is confirmed
        #: by one more with another peer: the peer may have lagged as we did,
        #: and a member that joined last could then stay unknown to us until the
        #: periodic push-pull (docs/membership.md, "Settling after a join").
        self._settle_pending = False
        self._settle_left = 0
        #: A settle found nothing new, and the one after it is the last.
        self._settle_confirmed = False
        self._settle_peer: Address | None = None
        #: The member we joined through, for the first settle (see tick).
        self._settle_seed: Address | None = None
        self._last_news = 0.0
        #: New members learned so far (a settle compares it before and after).
        self._news = 0
        #: Members our UDP probes miss but TCP reaches (a firewall dropping UDP,
        #: most likely): name -> when that was last seen.
        self.udp_blocked: dict[str, float] = {}
        #: (member, source address) pairs already reported by _address_mismatch.
        self._addr_warned: set[tuple[str, Address]] = set()
        #: Names whose address we asked who holds it (_verify_address), and when, so we ask once a while.
        self._verified_at: dict[str, float] = {}
        self._next_drop_report = 0.0
        #: Catalog fetches that failed and were retried through another member: node -> tries.
        self._fetch_tries: dict[str, int] = {}
        #: Peers we asked for a full push-pull after a lite one, until when not to ask again.
        self._full_sync_after: dict[Address, float] = {}
        #: Seeds a join could not reach: retried with the dead (a seed down at our
        #: start may be the only way to the rest of a cluster that was split).
        self._failed_seeds: set[Address] = set()
        # Spread the first probe over one interval so agents started together
        # do not probe in lockstep.
        self._next_probe = now + self.rng.uniform(0, config.probe_interval)
        self._next_gossip = now + config.gossip_interval
        self._last_gossip = now
        self._eager_at: float | None = None
        #: (member-table size it was counted at, members up): kept current by
        #: _set_status; recounted only when the table's size changes.
        self._up_count: tuple[int, int] | None = None
        #: Members seen once, signature not yet checked (VERIFY_DELAY): when, and the alive.
        self._unverified: dict[str, tuple[float, Alive]] = {}
        #: Member names for random choice (kRandomNodes); rebuilt when members come or go.
        self._names: list[str] | None = None
        self._now = now
        self._next_push_pull = now + self.rng.uniform(0.5, 1.0) * config.push_pull_interval
        self._next_reconnect = now + self.rng.uniform(0.5, 1.0) * config.reconnect_interval
        self._reap_every = max(1.0, min(60.0, config.dead_reap_after / 10))
        self._next_reap = now + self._reap_every
        self._outbox: list[Effect] = []
        self._events: list[Event] = []
        self._queue_alive_self()

    # -- public inputs --------------------------------------------------------------

    def receive(self, now: float, src: Address, packet: bytes) -> None:
        """A UDP packet (already opened by the keyring) arrived from ``src``."""
        self._now = now
        try:
            messages = decode_packet(packet)
        except DecodeError as exc:
            self.drop(exc.reason)
            return
        self.counters.stats["packets_in"] += 1
        # Answer pings last, so whatever the rest of the packet makes us say
        # (a refutation of a buddy-system suspicion, above all) rides on the ack.
        messages.sort(key=lambda m: isinstance(m, Ping))
        stats = self.counters.stats
        for msg in messages:
            kind = type(msg)
            key = _MSG_IN_KEYS.get(kind)
            if key is None:
                key = _MSG_IN_KEYS[kind] = "msg_in." + message_to_obj(msg)["t"]
            stats[key] += 1
            self._handle(now, src, msg)

    def drop(self, reason: str) -> None:
        """Count a packet or stream dropped for ``reason`` (visible in info)."""
        self.counters.drops[reason] += 1

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        self._now = now
        self._tick_probe(now)
        self._tick_relays(now)
        self._tick_suspicions(now)
        if now >= self._next_gossip or (self._eager_at is not None and now >= self._eager_at):
            if len(self.broadcasts):
                self._gossip_round(now)
            self._next_gossip = now + self.config.gossip_interval
            self._eager_at = None
        if now >= self._next_push_pull:
            self._start_sync(now)
        if now >= self._next_reconnect:
            self._start_reconnect(now)
        self._tick_join(now)
        if self._unverified and now >= self._verify_due():
            # Those due, and those a moment from it, in one go: fewer wake-ups.
            until = now - VERIFY_DELAY + self.config.settle_quiet()
            for name, (seen, _) in list(self._unverified.items()):
                if seen > until:
                    break  # (kept in arrival order)
                self._check_pending(now, name)
        if self._settle_pending and now >= self._settle_due():
            self._settle_pending = False
            # A full exchange, not a lite one: a settle is expected to find a member
            # or two we lack, and a lite reply would cost a second round trip for them.
            # The first settle goes back to the member we joined through: in a burst
            # of joins, that is the one that heard from every joiner first.
            seed, self._settle_seed = self._settle_seed, None
            peer = self._sync_with_random_peer(Purpose.SETTLE, avoid=self._settle_peer, prefer=seed)
            if peer is not None:
                self._settle_peer = peer
                self._settle_left -= 1
                self.counters.stats["settle_syncs"] += 1
        if now >= self._next_reap:
            self._reap(now)
            self._next_reap = now + self._reap_every
            self._queries_seen = {k: t for k, t in self._queries_seen.items() if t > now}

    def next_deadline(self) -> float:
        """The protocol time at which ``tick`` must next be called."""
        times = [self._next_push_pull, self._next_reap, self._next_reconnect]
        if self._settle_pending:
            times.append(self._settle_due())
        if self._unverified:
            times.append(self._verify_due())
        if not self.leaving:
            times.append(self._next_probe)
        if len(self.broadcasts):
            times.append(self._next_gossip)
            if self._eager_at is not None:
                times.append(self._eager_at)
        p = self._probe
        if p is not None:
            times.append(p.end)
            if not p.indirect_sent:
                times.append(p.direct_deadline)
        for r in self._relays.values():
            times.append(r.expire)
            if r.nack_at is not None:
                times.append(r.nack_at)
        due = self._next_suspicion_deadline()
        if due is not None:
            times.append(due)
        j = self._join
        if j is not None and not j.done and j.in_flight == 0:
            times.append(j.next_at)
        return min(times)

    def drain(self) -> tuple[list[Effect], list[Event]]:
        """Take what the driver must do and what it should log."""
        out, ev = self._outbox, self._events
        self._outbox, self._events = [], []
        return out, ev

    def join(self, now: float, seeds: list[Address]) -> None:
        """Keep trying to push-pull with the seeds, with backoff, until one answers."""
        seeds = [s for s in seeds if s != self.addr]  # a seed list shared by all agents names this one too
        if seeds:
            self._join = _JoinLoop(list(seeds), next_at=now)
            self._tick_join(now)

    @property
    def joined(self) -> bool:
        return self._join is None or self._join.done

    @property
    def join_error(self) -> str:
        return self._join.last_error if self._join else ""

    def leave(self, now: float) -> None:
        """Announce a graceful leave: others will show us as ``left``, never dead."""
        self._now = now
        if self.leaving:
            return
        self.leaving = True
        self._probe = None
        d = Dead(self.name, self.me.incarnation, self.name)
        self._set_status(now, self.me, Status.LEFT, "leave requested")
        self._broadcast(self.name, d)
        self._gossip_round(now)
        # Said once, so said directly too, to up to LEAVE_DIRECT live members: its few
        # gossip transmissions go to random targets, members recently dead among them, and
        # may reach some members only seconds later (docs/membership.md, "Leaving"); the
        # epidemic from those told carries it beyond.
        up = [m for m in self.members.values() if m.name != self.name and m.status.up]
        for m in self.rng.sample(up, min(LEAVE_DIRECT, len(up))):
            self._send_only(m.addr, [d])

    def force_leave(self, now: float, name: str) -> str:
        """Mark ``name`` left everywhere, on its behalf (Serf's and Consul's force-leave).

        For a member that will never come back, before the reap removes it: a
        left member is not reconnected to, and shows as departed, not failed.
        The claim is a leave at the incarnation the member announced, so it is
        within the bound on accusations; a member that is in fact alive hears
        it, refutes, and stays.  Returns the status it had.
        """
        self._now = now
        m = self.members.get(name)
        if m is None:
            raise KeyError(name)
        if name == self.name:
            raise ValueError("this agent itself: use a graceful leave")
        was = m.status.value
        if m.status is not Status.LEFT:
            m = self._own(m)
            self._suspicions.pop(name, None)  # its heap entry goes stale
            self._set_status(now, m, Status.LEFT, f"forced to leave by {self.name}")
            self._broadcast(name, Dead(name, m.incarnation, name))
        return was

    def leave_spread(self, now: float) -> bool:
        """True once our leave has been sent its full retransmit budget."""
        return self.leaving and (
            not self.broadcasts.pending(self.name) or not self._gossip_targets(now)
        )

    # -- push-pull (TCP, driven by the agent) -----------------------------------------

    def stagger_push_pull(self, now: float, phase: float) -> None:
        """Put the next periodic push-pull ``phase`` (0..1) of a scaled interval from now.

        For a simulated cluster that has "been up a while": its members'
        push-pulls are spread over the interval for its size, not all due in
        the first unscaled interval as after a fresh start.
        """
        self._next_push_pull = now + phase * self.config.push_pull_scaled(self.num_up())

    def push_pull_payload(self, join: bool, lite: bool = False) -> bytes:
        """Our side of a push-pull.  ``lite`` (periodic syncs, purpose "sync"):
        without the members' signatures, tunnel keys and catalog digests, which
        are most of a push-pull's bytes and which a peer that already agrees
        with us does not need; a peer that finds something new in a lite
        exchange asks for a full one."""
        lite = lite and self.signer is not None
        return encode_push_pull_stream(PushPull(self.name, join, [], delegate=self._delegate_dump(),
                                                coords=self._coords_to_send(everyone=False), lite=lite,
                                                fresh=self._fresh()),
                                       self._packed_records(lite))

    def state_request_payload(self, node: str) -> bytes:
        return encode_stream([StateRequest(self.name, node)])

    def handle_stream(self, now: float, src: Address, data: bytes) -> bytes | None:
        """We are the TCP responder: answer a push-pull, a TCP ping or a state request.

        Returns None (and counts the drop) when the request is not valid; the
        agent then just closes the stream.
        """
        return self.handle_streams(now, [(src, data)])[0]

    def handle_streams(self, now: float, requests: list[tuple[Address, bytes]]) -> list[bytes | None]:
        """Answer several TCP requests that arrived together, in order.

        A burst of joins reaches a seed all at once, and the seed's CPU is what
        the whole cluster waits on.  Every push-pull of the batch is merged
        first; then one reply, encoded once, answers all that asked for the same
        kind (full or lite, join or not), and each joiner learns the others of
        its batch as well.
        """
        self._now = now
        replies: list[bytes | None] = [None] * len(requests)
        merged: list[tuple[int, PushPull]] = []
        for i, (src, data) in enumerate(requests):
            msg = self._decode_one(data, (StateRequest, PushPull, Ping))
            if msg is None:
                continue
            if isinstance(msg, Ping):
                if msg.target != self.name:
                    self.drop("wrong_node")
                    continue
                self.counters.stats["tcp_pings_in"] += 1
                replies[i] = encode_stream([Ack(msg.seq, self.name)])
                continue
            if isinstance(msg, StateRequest):
                held = self.delegate.encode_node(msg.node) if self.delegate else None
                self.counters.stats["state_requests_in"] += 1
                replies[i] = encode_stream([StateReply(msg.node, held or b"")])
                continue
            assert isinstance(msg, PushPull)
            remote = msg
            refusal = self._refusal(remote)
            if refusal is not None:
                code, refused = refusal
                if code is Refusal.SELF:
                    self.counters.stats["push_pull_self"] += 1
                else:
                    self._event(EventKind.JOIN_REFUSED, peer=remote.source, addr=format_addr(src), reason=refused)
                    self.counters.stats["push_pull_refused"] += 1
                replies[i] = encode_push_pull_stream(
                    PushPull(self.name, False, [], refused, b"", {}, False, (), code), self._packed_records(False))
                continue
            self.counters.stats["push_pull_in"] += 1
            self._merge(now, remote)
            self._merge_delegate(remote.delegate)
            merged.append((i, remote))
        answers: dict[tuple[bool, bool], bytes] = {}
        for i, remote in merged:
            lite = remote.lite and self.signer is not None
            kind = (lite, remote.join)
            answer = answers.get(kind)
            if answer is None:
                # A joiner gets every coordinate we hold; its own, if there, it ignores.
                answer = answers[kind] = encode_push_pull_stream(
                    PushPull(self.name, False, [], "", self._delegate_dump(),
                             self._coords_to_send(everyone=remote.join), lite, self._fresh()),
                    self._packed_records(lite))
            replies[i] = answer
        return replies

    def complete_fetch(self, now: float, node: str, reply: bytes | None) -> bool:
        """The reply to a FetchState arrived (or None: it failed)."""
        self._now = now
        if self.delegate is None:
            return False
        ok = self._apply_fetched(reply)
        m = self.members.get(node)
        up = m is not None and m.status.up
        if self.delegate.fetch_done(node, ok and up) and m is not None:
            self._outbox.append(FetchState(node, m.addr))  # it changed again meanwhile
        elif not ok and m is not None and up and m.state is not None:
            # We cannot reach the owner (a firewall, a one-sided partition: its
            # services may still be reachable through a relay): any member that
            # holds its catalog can answer, so ask a couple of others.
            tries = self._fetch_tries.get(node, 0)
            others = [x for x in self.members.values() if x.status is Status.ALIVE and x.name not in (self.name, node)]
            if tries < _FETCH_FALLBACKS and others and self.delegate.advertised(node, m.state[0], m.state[1]):
                self._fetch_tries[node] = tries + 1
                self._outbox.append(FetchState(node, self.rng.choice(others).addr))
        if ok:
            self._fetch_tries.pop(node, None)
        return ok

    def _apply_fetched(self, reply: bytes | None) -> bool:
        assert self.delegate is not None
        if reply is None:
            return False
        try:
            msgs = decode_stream(reply)
        except DecodeError as exc:
            self.drop(exc.reason)
            return False
        if len(msgs) != 1 or not isinstance(msgs[0], StateReply) or not msgs[0].data:
            return False
        try:
            self.delegate.apply_node(msgs[0].data)
        except DecodeError as exc:
            self.drop("state_" + exc.reason)
            return False
        self.counters.stats["state_fetched"] += 1
        return True

    def state_changed(self) -> None:
        """The delegate's state changed: a new incarnation advertises it."""
        if self.delegate is None:
            return
        st = self.delegate.state()
        if st != self.me.state:
            self.me.state = st
            self.me.incarnation += 1
            self._queue_alive_self()

    def _delegate_dump(self) -> bytes:
        return self.delegate.dump() if self.delegate else b""

    def _merge_delegate(self, data: bytes) -> None:
        if self.delegate is None or not data:
            return
        try:
            self.delegate.merge_dump(data)
        except DecodeError as exc:
            self.drop("state_" + exc.reason)
        self.state_changed()  # a restart may have made us move our version on

    def _verify_address(self, now: float, m: Member) -> None:
        """Open a push-pull to ``m``'s address: its answer says which key holds that address now."""
        last = self._verified_at.get(m.name)
        if last is not None and now - last < VERIFY_ADDRESS_EVERY:
            return
        self._verified_at[m.name] = now
        self._outbox.append(StartPushPull(m.addr, Purpose.VERIFY))

    def _replaced_at_address(self, now: float, target: Address, remote: PushPull) -> None:
        """The member at ``target``, which we dialled, answers with a new identity key: its old one is gone.

        The strongest evidence SWIM has: a UDP or TCP address is held by one
        process at a time, and we chose the address, so whoever answers there
        is the member now.  Its own record is signed with the new key.  The
        old key's member is taken as dead here, and the new key's alive (next,
        in _merge) takes the name.  A live impostor elsewhere never gets this
        far: dialling the member's address reaches the member, not it.
        """
        held = self.members.get(remote.source)
        if held is None or remote.lite or remote.source == self.name or not held.status.up:
            return
        own = next((r for r in remote.members if r.name == remote.source), None)
        if (own is None or own.identity is None or held.identity is None or own.identity == held.identity
                or own.addr != target or held.addr != target):
            return
        if not self._signature_ok(_alive_of(own)):
            return
        m = self._own(held)
        self._suspicions.pop(m.name, None)  # its heap entry goes stale
        self._set_status(now, m, Status.DEAD, "replaced at its address by a new identity key")
        self.counters.stats["identities_replaced"] += 1

    def complete_push_pull(
        self, now: float, target: Address, purpose: Purpose, reply: bytes | None, error: str = ""
    ) -> tuple[bool, str]:
        """We were the initiator: merge the reply (or note the failure)."""
        self._now = now
        purpose = Purpose(purpose)  # a driver may hand back the value it was given
        ok, reason = False, error or "no reply"
        if reply is not None:
            remote = self._decode_push_pull(reply)
            if remote is None:
                reason = "malformed reply"
            elif remote.refusal == Refusal.SELF:
                # The seed is this agent itself (under another address or name of the
                # host): not a failure, and not a seed to retry.
                reason = "that seed is this agent itself"
                self._failed_seeds.discard(target)
                j = self._join
                if j is not None and target in j.seeds:
                    j.seeds.remove(target)
                    if not j.seeds:
                        j.done, j.last_error = True, ""  # the only seed was ourselves: we are first
                if purpose is not Purpose.JOIN or j is None or j.done:
                    return False, reason
                purpose = Purpose.SELF  # counted off the attempt below without an error
            elif remote.refused:
                reason = f"refused by {remote.source}: {remote.refused}"
                self._event(EventKind.JOIN_REFUSED_BY_PEER, peer=remote.source, reason=remote.refused)
            else:
                news = self._news
                self._replaced_at_address(now, target, remote)
                self._merge(now, remote)
                self._merge_delegate(remote.delegate)
                self.counters.stats["push_pull_out"] += 1
                ok, reason = True, ""
                if purpose is Purpose.SETTLE and self._settle_left > 0:
                    if self._news != news:
                        self._settle_pending = True  # the burst was still spreading: settle again
                        self._settle_confirmed = False
                    elif not self._settle_confirmed:
                        # Nothing new, but the peer may have lagged as we did (a member that
                        # joined last reaches most of the cluster at about the same moment):
                        # one more settle, a doubled quiet from now, with another peer.
                        self._settle_pending = True
                        self._settle_confirmed = True
                        self._last_news = now
                if purpose in (Purpose.JOIN, Purpose.EXPLICIT):
                    self._settle_pending = True
                    self._settle_seed = target
                    self._settle_left = SETTLE_MAX
                    self._settle_confirmed = False
                    self._last_news = now
                    # Announce ourselves to the members we just learned about
                    # now, rather than at the next gossip tick.
                    self._gossip_round(now)
                    self._next_gossip = now + self.config.gossip_interval
        if purpose is Purpose.SETTLE and not ok and self._settle_left > 0:
            self._settle_pending = True  # that peer failed us: another, after the doubled quiet
        if purpose in (Purpose.JOIN, Purpose.RECONNECT):
            if ok:
                self._failed_seeds.discard(target)
            elif purpose is Purpose.JOIN:
                self._failed_seeds.add(target)
        j = self._join
        if purpose is Purpose.SELF and j is not None:
            j.in_flight = max(0, j.in_flight - 1)
            if j.in_flight == 0 and not j.done:
                j.next_at = now + self.config.join_retry_min * self.rng.uniform(0.8, 1.2)
            return False, reason
        if purpose is Purpose.JOIN and j is not None and not j.done:
            j.in_flight = max(0, j.in_flight - 1)
            if ok:
                j.done = True
                j.last_error = ""
            else:
                j.last_error = f"{format_addr(target)}: {reason}"
                if j.in_flight == 0:
                    backoff = min(
                        self.config.join_retry_max,
                        self.config.join_retry_min * 2 ** min(j.attempt - 1, 16),
                    )
                    j.next_at = now + backoff * self.rng.uniform(0.8, 1.2)
                    self._event(EventKind.JOIN_RETRY, seeds=[format_addr(s) for s in j.seeds],
                                error=j.last_error, retry_in=round(j.next_at - now, 2))
        elif ok and j is not None:
            j.done = True  # an explicit join succeeded: the seed loop can stop
        return ok, reason

    # -- introspection --------------------------------------------------------------

    def view_version(self) -> tuple[int, int]:
        """Changes whenever anything a member view shows may have changed."""
        return (MEMBER_CHANGES.value, len(self.members))

    def member_list(self) -> list[Member]:
        return sorted(self.members.values(), key=lambda m: m.name)

    def count_by_status(self) -> dict[str, int]:
        c = {s.value: 0 for s in Status}
        for m in self.members.values():
            c[m.status.value] += 1
        return c

    def num_up(self) -> int:
        # Every packet sent asks this (retransmit limit).  Status changes adjust
        # it (_set_status); a change of the member set recounts.  The count is
        # per machine: one shared by all (a class-wide version) would make each
        # of a simulated cluster's status changes cost every machine a recount.
        size = len(self.members)
        if self._up_count is None or self._up_count[0] != size:
            self._up_count = (size, sum(1 for m in self.members.values() if m.status.up))
        return self._up_count[1]

    # -- message handling ---------------------------------------------------------------

    def _handle(self, now: float, src: Address, msg: Message) -> None:
        if isinstance(msg, (Ping, PingReq, Nack)) and msg.source != self.name:
            m = self.members.get(msg.source)
            if m is not None and m.addr != src:
                self._address_mismatch(m, src)
        if isinstance(msg, Ping):
            if msg.target != self.name:
                # The address now belongs to someone else (memberlist checks this too).
                self.drop("wrong_node")
                return
            reply: list[Message] = [Ack(msg.seq, self.name, tuple(self.vivaldi.coordinate.to_wire()))]
            sender = self.members.get(msg.source)
            if sender is not None and sender.status in (Status.SUSPECT, Status.DEAD):
                # It is talking to us, so it is up; tell it what we think of it
                # so it refutes now rather than at its next push-pull.
                cls = Suspect if sender.status is Status.SUSPECT else Dead
                reply.append(cls(sender.name, sender.incarnation, self.name))
            self._send(src, reply)
        elif isinstance(msg, PingReq):
            self._on_ping_req(now, src, msg)
        elif isinstance(msg, Ack):
            self._on_ack(now, msg)
        elif isinstance(msg, Nack):
            p = self._probe
            if p is not None and p.seq == msg.seq:
                p.nacks += 1
        elif isinstance(msg, Alive):
            self._on_alive(now, msg)
        elif isinstance(msg, Suspect):
            self._on_suspect(now, msg)
        elif isinstance(msg, Dead):
            self._on_dead(now, msg)
        elif isinstance(msg, Query):
            self._on_query(now, msg)
        elif isinstance(msg, QueryResponse):
            answers = self.query_responses.get(msg.id)
            if answers is not None and msg.source in self.members:
                answers[msg.source] = msg.payload
        else:
            self.drop("unexpected_type")

    def _on_ping_req(self, now: float, src: Address, msg: PingReq) -> None:
        if msg.target == self.name:
            self._send(src, [Ack(msg.seq, self.name)])
            return
        seq = self._next_seq()
        nack_at = now + 0.8 * self.config.probe_timeout if msg.want_nack else None
        self._relays[seq] = _Relay(src, msg.seq, msg.target, nack_at, now + self.config.probe_timeout)
        self._send(msg.target_addr, [Ping(seq, msg.target, self.name)])

    def _on_ack(self, now: float, msg: Ack) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq:
            target = self.members.get(p.target)
            if target is not None and msg.source == p.target and not p.indirect_sent:
                sample = now - p.sent
                target = self._own(target)
                if self.udp_blocked.pop(target.name, None) is not None:
                    MEMBER_CHANGES.bump()
                    self._event(EventKind.UDP_RESTORED, name=target.name)
                target.rtt = sample if target.rtt is None else 0.8 * target.rtt + 0.2 * sample
                self.counters.rtt_buckets[bisect.bisect_left(RTT_BUCKETS, sample)] += 1
                self.counters.rtt_sum += sample
                if msg.coord is not None:
                    self._observe_coordinate(target.name, msg.coord, sample)
            self.awareness.apply_delta(-1)
            self._probe = None
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._send(relay.requester, [Ack(relay.orig_seq, relay.target)])

    def _observe_coordinate(self, name: str, raw: tuple[float, ...], rtt: float | None) -> bool:
        """Keep a member's coordinate (and, with an RTT sample, move ours); False if refused."""
        try:
            coord = Coordinate.from_wire(list(raw), COORDINATE_CONFIG.dimensionality)
            # Finite but absurd (a component of years) would only reset ours, over and over.
            if max(abs(x) for x in raw) > _MAX_COORD_COMPONENT:
                raise ValueError("coordinate out of range")
            if rtt is not None:
                self.vivaldi.update(name, coord, rtt)
        except ValueError:
            self.drop("bad_coordinate")
            return False
        self.coordinates[name] = coord
        return True

    # -- queries (Serf's internal queries: cluster-wide operations) ---------------------------

    def start_query(self, now: float, name: str, payload: bytes) -> int:
        """Ask every member to run ``name`` with ``payload``; returns the query id.

        The query spreads as a broadcast (so it reaches members we have no
        direct route to, with the same retransmit budget as any update);
        every member, us included, sees it once as a ``query`` event and
        answers with :meth:`respond_query`, straight to us.  Answers collect in
        ``query_responses[id]`` until :meth:`finish_query`.
        """
        if len(payload) > MAX_QUERY_PAYLOAD:
            raise ValueError(f"query payload over {MAX_QUERY_PAYLOAD} bytes")
        self._now = now
        qid = self._next_seq()
        self.query_responses[qid] = {}
        self._on_query(now, Query(qid, self.name, self.addr, name, payload))
        return qid

    def respond_query(self, now: float, origin: str, origin_addr: Address, qid: int, payload: bytes) -> None:
        self._now = now
        if origin == self.name:
            answers = self.query_responses.get(qid)
            if answers is not None:
                answers[self.name] = payload
            return
        self._send(origin_addr, [QueryResponse(qid, self.name, payload)])

    def finish_query(self, qid: int) -> dict[str, bytes]:
        return self.query_responses.pop(qid, {})

    def _on_query(self, now: float, q: Query) -> None:
        key = (q.origin, q.id)
        if key in self._queries_seen:
            return
        origin = self.members.get(q.origin)
        if origin is None or not origin.status.up:
            self.drop("query_unknown_origin")
            return
        self._queries_seen[key] = now + QUERY_MEMORY
        self._broadcast(f"query:{q.origin}:{q.id}", q)
        self.counters.stats["queries"] += 1
        self._event(EventKind.QUERY, origin=q.origin, origin_addr=q.origin_addr, id=q.id, name=q.name,
                    payload=q.payload)

    # The three rules below follow memberlist's aliveNode/suspectNode/deadNode.

    def _signature_ok(self, a: Alive) -> bool:
        if a.identity is None or a.sig is None:
            return False
        data = alive_bytes(a.name, a.addr, a.incarnation, a.tags, a.state, a.tunnel)
        return self.verifier.verify(a.identity, data, a.sig)

    def _on_alive(self, now: float, a: Alive, spread_new: bool = True) -> None:
        if a.name == self.name:
            me = self.me
            if a.identity is not None and a.identity != me.identity and a.addr == me.addr:
                # Our own address under another key: a previous run of this agent (started without
                # --data-dir, it kept no identity).  Peers ask this address who holds it, and take
                # our key once we answer (_replaced_at_address).
                if (a.name, a.addr) not in self._addr_warned:
                    self._addr_warned.add((a.name, a.addr))
                    self._event(EventKind.PREVIOUS_IDENTITY, name=a.name, addr=format_addr(a.addr),
                                detail="peers still hold a previous run of this agent, with another identity key "
                                       "(keep --data-dir to keep it); they take this one once they ask this address")
            elif a.identity is not None and a.identity != me.identity and a.incarnation >= me.incarnation:
                # Someone else, with another key, claims our name: say so; our refutation wins
                # everywhere our key is bound.
                self._event(EventKind.NAME_CONFLICT, name=a.name, ours=format_addr(me.addr), theirs=format_addr(a.addr),
                            reason="another agent, with a different identity key, claims this agent's name")
                self.counters.stats["name_conflicts"] += 1
            elif a.addr != me.addr and a.incarnation >= me.incarnation and a.identity is None:
                self._event(EventKind.NAME_CONFLICT, name=a.name, ours=format_addr(me.addr),
                            theirs=format_addr(a.addr),
                            reason="another agent claims this agent's name")
                self.counters.stats["name_conflicts"] += 1
            if not self.leaving and (
                a.incarnation > me.incarnation
                or (a.incarnation == me.incarnation and (a.addr != me.addr or a.tags != me.tags))
            ):
                self._refute(now, a.incarnation, "stale alive about this agent")
            return
        m = self.members.get(a.name)
        if (m is not None and a.identity is not None and a.identity == m.identity and a.addr == m.addr
                and a.incarnation <= m.incarnation):
            # Old news from the key bound to this name (a join burst repeats every alive
            # many times): whatever its signature says, it would change nothing below.
            return
        if m is not None and a.name in self._unverified and not self._check_pending(now, a.name):
            m = None  # what we held was forged: this alive is the first we can take
        # Names bound to keys (gossip.signing): a signed cluster takes only signed alives.
        # A name seen for the first time is checked later (VERIFY_DELAY).
        if a.identity is not None:
            if m is not None and not self._signature_ok(a):
                self.drop("bad_signature")
                return
        elif self.signer is not None:
            self.drop("unsigned_alive")
            return
        if m is None:
            m = Member(a.name, a.addr, a.incarnation, Status.ALIVE, dict(a.tags), now, state=a.state,
                       tunnel=a.tunnel, identity=a.identity, sig=a.sig)
            self._note_state(m)
            self.members[a.name] = m
            self._names = None
            if self._up_count is not None and self._up_count[0] == len(self.members) - 1:
                self._up_count = (len(self.members), self._up_count[1] + 1)  # no recount per join
            # Insert at a random place so a new member is probed soon (memberlist).
            # (Into the part of this pass not probed yet: before it, it would shift
            # one already probed back under the cursor.)
            self._probe_order.insert(self.rng.randint(self._probe_index, len(self._probe_order)), a.name)
            if a.identity is not None:
                self._unverified[a.name] = (now, a)
            self._event(EventKind.MEMBER, name=a.name, addr=format_addr(a.addr), status="alive",
                        previous="none", incarnation=a.incarnation, reason="joined")
            self._last_news = now
            self._news += 1
            if spread_new:
                self._broadcast(a.name, a)
            return
        same_key = a.identity is not None and a.identity == m.identity
        if m.identity is not None and not same_key:
            if m.status.up:
                # Another key claims a live name: refused, whatever its incarnation -- unless
                # the member's own address now answers with that key (a restart with a new
                # identity, as an agent without --data-dir has).  Ask the address itself.
                if a.addr == m.addr:
                    self._verify_address(now, m)
                if (a.name, a.addr) not in self._addr_warned:
                    self._addr_warned.add((a.name, a.addr))
                    self._event(EventKind.NAME_CONFLICT, name=a.name, ours=format_addr(m.addr),
                                theirs=format_addr(a.addr),
                                reason="a different identity key claims this live member's name; refused")
                self.counters.stats["name_conflicts"] += 1
                self.drop("identity_conflict")
                return
            # Dead or departed: the name may be taken by a new key (a rebuilt node).
            self._event(EventKind.MEMBER_REKEYED, name=a.name, addr=format_addr(a.addr))
        if a.addr != m.addr:
            if m.status.up and not same_key:
                self._event(EventKind.NAME_CONFLICT, name=a.name, ours=format_addr(m.addr),
                            theirs=format_addr(a.addr),
                            reason=f"name already alive at {format_addr(m.addr)}; refused")
                self.counters.stats["name_conflicts"] += 1
                return
            if m.status.up and a.incarnation <= m.incarnation:
                return  # a stale alive from before the member moved
            # A dead or departed member may come back at a new address; a live
            # one moves when its own key says so (restarted at a new address).
            m = self._own(m)
            if m.status.up:
                self._event(EventKind.MEMBER_MOVED, name=a.name, old=format_addr(m.addr), new=format_addr(a.addr))
            m.addr = a.addr
        elif a.incarnation <= m.incarnation and (same_key or m.identity is None):
            return  # (a new key's life counts its incarnations anew: the old key's are no bar)
        m = self._own(m)
        m.incarnation = a.incarnation
        m.tags = dict(a.tags)
        m.tunnel = a.tunnel
        m.identity = a.identity
        m.sig = a.sig
        if a.state != m.state:
            m.state = a.state
            self._note_state(m)
        self._suspicions.pop(a.name, None)  # its heap entry goes stale
        if m.status is not Status.ALIVE:
            reason = "refuted suspicion" if m.status is Status.SUSPECT else "rejoined"
            self._set_status(now, m, Status.ALIVE, reason)
        self._broadcast(a.name, a)

    def _beyond_announced(self, m: Member, incarnation: int) -> bool:
        """An accusation above the incarnation the member itself announced (its latest alive).

        SWIM's rule that only a member raises its own incarnation makes such a
        claim a lie or a bug: honest accusers name the incarnation they hold,
        which came from the member's own (signed) alive.  Taken, one datagram
        with the largest incarnation the wire carries would kill the member for
        good, since no refutation could outbid it.  Dropped and counted.
        """
        if incarnation > m.incarnation:
            self.drop("accusation_beyond_alive")
            return True
        return False

    def _on_suspect(self, now: float, s: Suspect) -> None:
        if s.name == self.name:
            self._accused(now, s.incarnation, f"suspected by {s.source}")
            return
        m = self.members.get(s.name)
        if m is None or s.incarnation < m.incarnation or self._beyond_announced(m, s.incarnation):
            return
        sus = self._suspicions.get(s.name)
        if sus is not None:
            if sus.confirm(s.source):
                heapq.heappush(self._suspicion_heap, (sus.deadline, s.name))  # it moved earlier
                self.counters.stats["suspicion_confirmations"] += 1
                self._broadcast(s.name, s)
            return
        if m.status is not Status.ALIVE:
            return
        m = self._own(m)
        m.incarnation = s.incarnation
        self._set_status(now, m, Status.SUSPECT, f"suspected by {s.source}")
        self.counters.stats["suspicions"] += 1
        n = self.num_up()
        k = self.config.suspicion_mult - 2
        if n - 2 < k or not self.config.lifeguard:
            k = 0  # too few members for independent confirmations (memberlist); or a fixed timeout
        sus = self._suspicions[s.name] = Suspicion(
            now, s.source, k, self.config.suspicion_min(n), self.config.suspicion_max(n)
        )
        heapq.heappush(self._suspicion_heap, (sus.deadline, s.name))
        self._broadcast(s.name, s)

    def _on_dead(self, now: float, d: Dead) -> None:
        if d.name == self.name:
            # Our own name as the source is our own earlier leave (or a force-leave said for us).
            self._accused(now, d.incarnation, "an earlier leave of this agent" if d.source == d.name
                          else f"declared dead by {d.source}")
            return
        m = self.members.get(d.name)
        if m is None or d.incarnation < m.incarnation or self._beyond_announced(m, d.incarnation):
            return
        if m.status is Status.DEAD and d.source == d.name:
            # We timed out our own suspicion before the leave reached us; a
            # graceful leave is the truer story, so it replaces "dead".
            m = self._own(m)
            m.incarnation = d.incarnation
            self._set_status(now, m, Status.LEFT, "left gracefully")
            self._broadcast(d.name, d)
            return
        if not m.status.up:
            return
        m = self._own(m)
        m.incarnation = d.incarnation
        self._suspicions.pop(d.name, None)  # its heap entry goes stale
        if d.source == d.name:
            self._set_status(now, m, Status.LEFT, "left gracefully")
        else:
            self._set_status(now, m, Status.DEAD, f"declared dead by {d.source}")
        self._broadcast(d.name, d)

    def _accused(self, now: float, incarnation: int, reason: str) -> None:
        """Someone claims we are suspect or dead."""
        if self.leaving:
            return
        if incarnation >= MAX_INCARNATION:
            # No refutation can outbid it; peers drop it (_beyond_announced), so we need not.
            self.drop("accusation_beyond_alive")
            return
        if incarnation >= self.me.incarnation:
            # Above what we announced is still possible here: a restarted agent starts low,
            # and its past self's incarnation comes back to it as "dead at N".
            self._refute(now, incarnation, reason)
        elif not self.broadcasts.pending(self.name):
            # A stale claim: its sender missed our refutation.  Repeat our
            # current alive so it learns (it rides on the ack of a buddy probe).
            self._queue_alive_self()

    def _note_state(self, m: Member) -> None:
        if self.delegate is not None and m.state is not None:
            if self.delegate.advertised(m.name, m.state[0], m.state[1]):
                self._outbox.append(FetchState(m.name, m.addr))

    def _refute(self, now: float, accused: int, reason: str) -> None:
        """SWIM: only a member raises its own incarnation, to overrule a claim."""
        self.me.incarnation = max(self.me.incarnation, accused) + 1
        self.awareness.apply_delta(1)  # Lifeguard: being suspected hints we are slow
        self.counters.stats["refutations"] += 1
        self._event(EventKind.REFUTE, incarnation=self.me.incarnation, reason=reason)
        self._queue_alive_self()

    # -- timers ---------------------------------------------------------------------

    def _tick_probe(self, now: float) -> None:
        p = self._probe
        if p is not None and now - p.end > self.config.probe_interval:
            # We overslept by more than a whole period (process paused or
            # starved): the missing ack says nothing about the target.  Drop
            # the probe instead of accusing it, and count it against our own
            # health as Lifeguard does for other signs of local trouble.
            self._probe = p = None
            self.awareness.apply_delta(1)
            self.counters.stats["probes_abandoned_late"] += 1
        if p is not None and not p.indirect_sent and now >= p.direct_deadline:
            self._send_indirect(now, p)
        if p is not None and now >= p.end:
            self._probe_failed(now, p)
            self._probe = None
        if not self.leaving and now >= self._next_probe:
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        interval = self.awareness.scale(self.config.probe_interval)
        self._next_probe = now + interval
        target = self._next_probe_target()
        if target is None:
            return
        seq = self._next_seq()
        msgs: list[Message] = [Ping(seq, target.name, self.name)]
        if target.status is Status.SUSPECT and self.config.lifeguard:
            # Lifeguard's buddy system: tell the member it is suspected, so it
            # can refute at once instead of waiting for gossip to reach it.
            msgs.append(Suspect(target.name, target.incarnation, self.name))
        timeout = self.awareness.scale(self.config.probe_timeout)
        self._probe = _Probe(target.name, seq, now, now + timeout, now + interval)
        self.counters.stats["probes"] += 1
        self._send(target.addr, msgs)

    def _next_probe_target(self) -> Member | None:
        # SWIM section 4.3: round-robin over a shuffled list, reshuffled each pass,
        # bounds the time to first detection.  The shuffle is done lazily, one
        # Fisher-Yates step per probe (the same uniform order): a pass over ten
        # thousand members then costs no ten-thousand-step shuffle up front.
        order = self._probe_order
        for _ in range(2):
            while self._probe_index < len(order):
                i = self._probe_index
                j = self.rng.randrange(i, len(order))
                order[i], order[j] = order[j], order[i]
                name = order[i]
                self._probe_index += 1
                m = self.members.get(name)
                if m is not None and m.status.up and name != self.name:
                    return m
            order = self._probe_order = [n for n, m in self.members.items() if n != self.name and m.status.up]
            self._probe_index = 0
        return None

    def complete_tcp_probe(self, now: float, seq: int, reply: bytes | None, refused: bool = False) -> None:
        """The TCP fallback probe ``seq`` ended: ``reply`` is what came back (None: nothing).

        ``refused``: the connection was refused (a reset from the target's own host):
        the host is reachable and nothing listens on the member's gossip port, so its
        agent is gone -- killed, crashed, or stopped without a leave.  Helpers' ping-reqs
        cannot change that answer, so the probe fails now rather than at the end of its
        period: a crashed agent is suspected half a protocol period sooner.  (A firewall
        that answers for the host with resets, while dropping our UDP, would get the
        member suspected; it refutes as soon as the suspicion reaches it.)
        """
        self._now = now
        p = self._probe
        if p is None or p.seq != seq:
            return
        if reply is None:
            if refused:
                self._probe = None
                self.counters.stats["probes_refused"] += 1
                self._probe_failed(now, p, refused=True)
            return
        try:
            msgs = decode_stream(reply)
        except DecodeError as exc:
            self.drop(exc.reason)
            return
        if len(msgs) == 1 and isinstance(msgs[0], Ack) and msgs[0].seq == seq and msgs[0].source == p.target:
            p.tcp_ok = True

    def port_unreachable(self, now: float, addr: Address) -> None:
        """The host at ``addr`` said nothing listens on that UDP port (ICMP port unreachable).

        If that is the member we are probing, its direct ping has failed already: waiting
        out the probe timeout would only delay the same verdict.  The indirect phase
        starts now -- the TCP fallback ping and the ping-reqs -- so that the TCP ping
        decides: refused (the agent is gone) fails the probe at once; answered (UDP is
        rejected by a firewall, TCP gets through) keeps the member alive as before.  The
        ICMP alone never fails a probe: rejecting UDP is a common firewall setting, and
        an off-path forger of ICMP should not be able to get a member suspected.
        """
        self._now = now
        p = self._probe
        if p is None or p.indirect_sent:
            return
        target = self.members.get(p.target)
        if target is None or target.addr != addr:
            return
        self.counters.stats["probes_unreachable"] += 1
        self._send_indirect(now, p)

    def _send_indirect(self, now: float, p: _Probe) -> None:
        p.indirect_sent = True
        target = self.members.get(p.target)
        if target is None:
            return
        if self.config.tcp_fallback:
            # memberlist's fallback ping: at the same time as the ping-reqs.
            self._outbox.append(TcpProbe(target.addr, p.seq, encode_stream([Ping(p.seq, target.name, self.name)]),
                                         p.end))
            self.counters.stats["tcp_pings"] += 1
        helpers = [
            m for m in self.members.values()
            if m.status is Status.ALIVE and m.name not in (self.name, p.target)
        ]
        chosen = self.rng.sample(helpers, min(self.config.indirect_checks, len(helpers)))
        for h in chosen:
            self._send(h.addr, [PingReq(p.seq, target.name, target.addr, self.name, self.config.lifeguard)])
        p.expected_nacks = len(chosen) if self.config.lifeguard else 0
        self.counters.stats["ping_reqs"] += len(chosen)

    def _probe_failed(self, now: float, p: _Probe, refused: bool = False) -> None:
        if p.tcp_ok:
            # Reached over TCP only: the member is up, the UDP path to it is not.
            # Say so (once, until UDP works again) rather than accuse it.
            if p.target not in self.udp_blocked:
                m = self.members.get(p.target)
                self._event(EventKind.UDP_BLOCKED, name=p.target, addr=format_addr(m.addr) if m else "?",
                            detail="probes over UDP fail but TCP reaches it: is a firewall dropping UDP?")
            self.udp_blocked[p.target] = now
            MEMBER_CHANGES.bump()  # member views show it
            self.counters.stats["tcp_fallback_saves"] += 1
            return
        # Lifeguard: missing nacks mean our own links are at fault, not the target's --
        # unless the target's host refused us, which shows our links work (the nacks
        # are not due yet then).
        if not refused:
            if p.expected_nacks > 0:
                self.awareness.apply_delta(max(0, p.expected_nacks - p.nacks))
            else:
                self.awareness.apply_delta(1)
        self.counters.stats["probe_failures"] += 1
        m = self.members.get(p.target)
        if m is not None and m.status.up:
            # On a member already suspect this is an independent confirmation,
            # which shortens its suspicion everywhere (Lifeguard section IV-B).
            self._on_suspect(now, Suspect(m.name, m.incarnation, self.name))

    def _tick_relays(self, now: float) -> None:
        for seq, r in list(self._relays.items()):
            if r.nack_at is not None and now >= r.nack_at:
                r.nack_at = None
                self._send(r.requester, [Nack(r.orig_seq, self.name)])
            if now >= r.expire:
                del self._relays[seq]

    def _next_suspicion_deadline(self) -> float | None:
        """The earliest live suspicion's deadline; stale heap entries are discarded on the way."""
        heap, live = self._suspicion_heap, self._suspicions
        while heap:
            deadline, name = heap[0]
            sus = live.get(name)
            if sus is not None and sus.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def _tick_suspicions(self, now: float) -> None:
        while True:
            due = self._next_suspicion_deadline()
            if due is None or now < due:
                return
            _, name = heapq.heappop(self._suspicion_heap)
            del self._suspicions[name]
            m = self.members.get(name)
            if m is not None and m.status is Status.SUSPECT:
                self.counters.stats["suspicion_timeouts"] += 1
                self._on_dead(now, Dead(name, m.incarnation, self.name))

    def _gossip_eligible(self, m: Member, now: float) -> bool:
        """Up, or dead recently enough that it may still hear (and refute) what we say."""
        return m.status.up or (m.status is Status.DEAD and now - m.status_since < self.config.gossip_to_the_dead)

    def _gossip_targets(self, now: float) -> list[Member]:
        return [m for m in self.members.values() if m.name != self.name and self._gossip_eligible(m, now)]

    def _random_gossip_targets(self, now: float, k: int) -> list[Member]:
        """k distinct gossip targets at random, as memberlist's kRandomNodes finds them.

        Scanning the whole table every gossip round costs O(N) per round, which
        at thousands of members is most of a node's work; random probes into
        the name list find k eligible members in about k tries.  Small tables
        are sampled exactly.
        """
        if len(self.members) <= _EXACT_SAMPLE_MAX:
            candidates = self._gossip_targets(now)
            return self.rng.sample(candidates, min(k, len(candidates)))
        names = self._names
        if names is None or len(names) != len(self.members):
            names = self._names = list(self.members)
        n = len(names)
        out: list[Member] = []
        tried: set[str] = set()
        for _ in range(3 * n):
            if len(out) >= k:
                break
            name = names[self.rng.randrange(n)]
            if name in tried or name == self.name:
                continue
            tried.add(name)
            m = self.members.get(name)
            if m is not None and self._gossip_eligible(m, now):
                out.append(m)
        return out

    def _gossip_round(self, now: float) -> None:
        self._last_gossip = now
        for m in self._random_gossip_targets(now, self.config.gossip_nodes):
            if not len(self.broadcasts):
                break
            self._send(m.addr, [])

    def _start_sync(self, now: float) -> None:
        self._next_push_pull = now + self.config.push_pull_scaled(self.num_up())
        self._sync_with_random_peer()

    def _settle_due(self) -> float:
        done = SETTLE_MAX - self._settle_left
        return self._last_news + self.config.settle_quiet() * 2.0 ** done

    def _sync_with_random_peer(self, purpose: Purpose = Purpose.SYNC, avoid: Address | None = None,
                               prefer: Address | None = None) -> Address | None:
        """A push-pull with ``prefer`` if it is an alive member, else with a random alive
        member (other than ``avoid`` if there is another): its address, or None if there is none."""
        peers = [m for m in self.members.values() if m.status is Status.ALIVE and m.name != self.name]
        if not peers or self.leaving:
            return None
        if prefer is not None and any(m.addr == prefer for m in peers):
            target = prefer
        else:
            if avoid is not None:
                peers = [m for m in peers if m.addr != avoid] or peers
            target = self.rng.choice(peers).addr
        self._outbox.append(StartPushPull(target, purpose))
        return target

    def _start_reconnect(self, now: float) -> None:
        # memberlist leaves this to Serf's reconnect loop; without it a partition
        # longer than the suspicion timeout never heals by itself.  Members that
        # left gracefully are not retried.
        self._next_reconnect = now + self.config.reconnect_interval
        targets = [m.addr for m in self.members.values()
                   if m.status is Status.DEAD and now - m.status_since < self.config.reconnect_timeout]
        if self._failed_seeds and (self._join is None or self._join.done):  # the join loop retries its own
            up = {m.addr for m in self.members.values() if m.status.up}
            self._failed_seeds -= up
            targets += sorted(self._failed_seeds)
        if targets and not self.leaving:
            self.counters.stats["reconnect_attempts"] += 1
            self._outbox.append(StartPushPull(self.rng.choice(targets), Purpose.RECONNECT))

    def _tick_join(self, now: float) -> None:
        j = self._join
        if j is None or j.done or j.in_flight or now < j.next_at:
            return
        j.attempt += 1
        j.in_flight = len(j.seeds)
        for seed in j.seeds:
            self._outbox.append(StartPushPull(seed, Purpose.JOIN))

    def _reap(self, now: float) -> None:
        for name, m in list(self.members.items()):
            if not m.status.up and name != self.name and now - m.status_since >= self.config.dead_reap_after:
                self._forget(name)
                self._event(EventKind.MEMBER_REAPED, name=name, status=m.status.value)

    def _forget(self, name: str) -> None:
        """Remove a member and everything held about it."""
        m = self.members.pop(name)
        self._names = None
        if self._up_count is not None and self._up_count[0] == len(self.members) + 1:
            self._up_count = (len(self.members), self._up_count[1] - m.status.up)  # no recount
        self._unverified.pop(name, None)
        self._suspicions.pop(name, None)  # its heap entry goes stale
        self.broadcasts.discard(name)
        self.coordinates.pop(name, None)
        self.udp_blocked.pop(name, None)
        self._fetch_tries.pop(name, None)
        self.vivaldi.forget(name)
        if self.delegate is not None:
            self.delegate.forget(name)

    # -- first-sight signatures (VERIFY_DELAY) -----------------------------------------------

    def _verify_due(self) -> float:
        return next(iter(self._unverified.values()))[0] + VERIFY_DELAY

    def _check_pending(self, now: float, name: str) -> bool:
        """Check the signature of a member seen once; a forgery is forgotten, loudly."""
        entry = self._unverified.pop(name, None)
        if entry is None:
            return name in self.members
        if self._signature_ok(entry[1]):
            return True
        self.drop("bad_signature")
        if name in self.members:
            self._forget(name)
            self._event(EventKind.MEMBER_FORGED, name=name, addr=format_addr(entry[1].addr),
                        reason="its alive was not signed by the key it carried; forgotten")
        return False

    def checked(self, name: str) -> bool:
        """Whether ``name``'s record has had its signature checked (checking it now if not).

        The data plane asks before it trusts a member's tunnel key.
        """
        return self._check_pending(self._now, name)

    # -- push-pull helpers -----------------------------------------------------------------

    def _packed_records(self, lite: bool) -> list[bytes]:
        """Every member's push-pull record, encoded; each is kept on its Member until it changes."""
        attr = "wire_lite" if lite else "wire_full"
        out = []
        for m in self.members.values():
            d = m.__dict__
            w = d.get(attr)
            if w is None:
                if lite:
                    # What a lite record is checked for: name, address, incarnation, status (and
                    # our own record's tags, which a refutation compares).  The signature,
                    # tunnel key and catalog digest, most of a record's bytes and none of them
                    # compressible, come with the full exchange a difference asks for
                    # (docs/membership.md, "Push-pull").
                    w = pack_record(m.name, m.addr, m.incarnation, m.status.value, m.tags, None, None)
                else:
                    w = pack_record(m.name, m.addr, m.incarnation, m.status.value, m.tags, m.state, m.tunnel,
                                    m.identity, m.sig)
                d[attr] = w  # not through __setattr__: the cache is no change of the member
            out.append(w)
        return out

    def _fresh(self) -> tuple[str, ...]:
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
        if not len(self.broadcasts):
            return ()
        members = self.members
        return tuple(k for k in self.broadcasts.keys()
                     if k != self.name and (m := members.get(k)) is not None and m.status is Status.ALIVE)

    def _decode_one(self, data: bytes, kinds: tuple[type[Message], ...]) -> Message | None:
        """A stream payload holding exactly one message of ``kinds``; else None, drop counted."""
        try:
            msgs = decode_stream(data)
        except DecodeError as exc:
            self.drop(exc.reason)
            return None
        if len(msgs) != 1 or not isinstance(msgs[0], kinds):
            self.drop("unexpected_type")
            return None
        return msgs[0]

    def _decode_push_pull(self, data: bytes) -> PushPull | None:
        msg = self._decode_one(data, (PushPull,))
        return msg if isinstance(msg, PushPull) else None

    def _refusal(self, remote: PushPull) -> tuple[Refusal, str] | None:
        """Why we refuse ``remote``'s push-pull (a code and a sentence), or None."""
        if remote.source == self.name:
            own = next((r for r in remote.members if r.name == remote.source), None)
            if own is not None and (own.addr == self.addr or (
                    own.identity is not None and own.identity == self.me.identity)):
                return Refusal.SELF, "that is this agent itself"
            return Refusal.NAME_TAKEN, f"name {self.name!r} is already taken by the agent at {format_addr(self.addr)}"
        own = next((r for r in remote.members if r.name == remote.source), None)
        existing = self.members.get(remote.source)
        if own is not None and existing is not None and existing.status.up and existing.addr != own.addr:
            if existing.identity is not None and own.identity == existing.identity and own.sig is not None and (
                    self._signature_ok(_alive_of(own))):
                return None  # the same key: the member itself, restarted at a new address
            return Refusal.NAME_ALIVE, f"name {remote.source!r} is already alive at {format_addr(existing.addr)}"
        return None

    def _learn_announced(self, held: Member, r: MemberRecord) -> None:
        """Take the incarnation a push-pull record proves the member itself announced (its signed alive)."""
        if (r.addr != held.addr or r.identity is None or r.identity != held.identity
                or not self._signature_ok(_alive_of(r))):
            return  # unproven: the accusation that follows is dropped as beyond what was announced
        m = self._own(held)
        m.incarnation = r.incarnation
        m.tags = dict(r.tags)
        m.tunnel = r.tunnel
        m.sig = r.sig
        if r.state != m.state:
            m.state = r.state
            self._note_state(m)

    def _merge(self, now: float, remote: PushPull) -> None:
        # memberlist mergeState: a remote "dead" only makes us suspect, so one
        # node's stale view cannot kill a member we can still reach.
        news = False
        members = self.members
        fresh = set(remote.fresh)
        for r in remote.members:
            held = members.get(r.name)
            if held is not None and r.name != self.name and (
                    (r.status == "alive" and r.addr == held.addr and r.incarnation <= held.incarnation
                     and (r.identity is None or r.identity == held.identity))
                    or (r.status != "alive" and r.incarnation < held.incarnation)):
                # Nothing this record can change (an alive needs a higher incarnation or,
                # for a departed member, a new address or a new key; an accusation a current
                # incarnation): most of a push-pull, skipped cheaply.
                continue
            if r.status == "alive":
                if remote.lite and r.name != self.name:
                    # Lite (no signature, no keys): only confirms what we hold.  Anything new needs
                    # the member's signature, so ask this peer for a full exchange.
                    if held is None or r.incarnation > held.incarnation or (
                            r.addr != held.addr and not held.status.up):
                        news = True
                    continue
                # A member new to us that a push-pull shows is old news to the cluster
                # (a joiner learns everyone this way): spreading it again would flood
                # gossip with thousands of alives everybody holds, ahead of the updates
                # that matter.  The peer itself, and any change to a member we know, still spread.
                self._on_alive(now, _alive_of(r), spread_new=r.name == remote.source or r.name in fresh)
            else:
                if held is not None and r.name != self.name and r.incarnation > held.incarnation:
                    # The peer holds a later incarnation than ours, accused.  Its record carries
                    # the member's own signed alive for it: learn that first, so the accusation
                    # is within what the member announced.  A lite record carries no signature:
                    # ask for the full exchange instead.
                    if remote.lite:
                        news = True
                        continue
                    self._learn_announced(held, r)
                if r.status == "left":
                    self._on_dead(now, Dead(r.name, r.incarnation, r.name))
                else:
                    self._on_suspect(now, Suspect(r.name, r.incarnation, remote.source))
        if news:
            own = next((r for r in remote.members if r.name == remote.source), None)
            if own is not None:
                self._ask_full_sync(now, own.addr)
        # A member's own coordinate is the freshest there is; others' only fill
        # gaps, since our own acks keep the ones we probe current.
        for name, raw in remote.coords.items():
            if name != self.name and name in self.members and (
                    name == remote.source or name not in self.coordinates):
                if not self._observe_coordinate(name, raw, None):
                    break

    def _ask_full_sync(self, now: float, addr: Address) -> None:
        """A lite push-pull showed news we cannot check: fetch it signed, once per interval per peer."""
        if self._full_sync_after.get(addr, 0.0) > now:
            return
        if len(self._full_sync_after) > 1024:
            self._full_sync_after = {a: t for a, t in self._full_sync_after.items() if t > now}
        self._full_sync_after[addr] = now + self.config.push_pull_interval
        self.counters.stats["full_syncs_asked"] += 1
        self._outbox.append(StartPushPull(addr, Purpose.FULL))

    def _coords_to_send(self, everyone: bool) -> dict[str, tuple[float, ...]]:
        """Our coordinate; on a join, every up member's we hold, so the newcomer
        can estimate RTTs at once.  Periodic push-pulls carry only our own: the
        rest would double an idle agent's bytes for what acks renew anyway."""
        coords = {self.name: tuple(self.vivaldi.coordinate.to_wire())}
        if everyone:
            for name, c in self.coordinates.items():
                m = self.members.get(name)
                if m is not None and m.status.up:
                    coords[name] = tuple(c.to_wire())
        return coords

    # -- latency -------------------------------------------------------------------------

    def coordinate_of(self, name: str) -> Coordinate | None:
        return self.vivaldi.coordinate if name == self.name else self.coordinates.get(name)

    def rtt_estimate(self, a: str, b: str) -> tuple[float, str] | None:
        """RTT between two members in seconds, and how we know it.

        From us to a member we probe directly: the smoothed measurement
        ("measured").  Anything else: the distance between the two Vivaldi
        coordinates ("coordinates"), as ``serf rtt`` does.
        """
        if a == b:
            return (0.0, "measured")
        if self.name in (a, b):
            other = self.members.get(b if a == self.name else a)
            if other is not None and other.rtt is not None:
                return (other.rtt, "measured")
        ca, cb = self.coordinate_of(a), self.coordinate_of(b)
        if ca is None or cb is None or not ca.is_compatible_with(cb):
            return None
        return (ca.distance_to(cb), "coordinates")

    # -- output helpers -------------------------------------------------------------------

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    def _queue_alive_self(self) -> None:
        me = self.me
        if self.signer is not None:
            me.identity = self.signer.public
            me.sig = self.signer.sign(alive_bytes(me.name, me.addr, me.incarnation, me.tags, me.state, me.tunnel))
        self._broadcast(self.name, Alive(self.name, me.incarnation, me.addr, dict(me.tags), me.state, me.tunnel,
                                         me.identity, me.sig))

    def set_tunnel(self, tunnel: Tunnel) -> None:
        """Our tunnel address or key changed (e.g. bound to a port the OS chose)."""
        if tunnel != self.me.tunnel:
            self.me.tunnel = tunnel
            self.me.incarnation += 1
            self._queue_alive_self()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Change our tags: a new incarnation carries them to everyone."""
        self.me.tags = dict(tags)
        self.me.incarnation += 1
        self._queue_alive_self()

    def _broadcast(self, key: str, msg: Message) -> None:
        encoded = encode_message(msg)
        if len(encoded) > self._packet_budget:
            # It could never ride in a datagram; push-pull (TCP) carries it.
            self.counters.stats["broadcast_too_large"] += 1
            return
        self.broadcasts.set_cluster_size(self.num_up())
        dropped = self.broadcasts.dropped
        self.broadcasts.queue(key, encoded, PRIORITY_ALIVE if isinstance(msg, Alive) else PRIORITY_OTHER)
        if self.broadcasts.dropped != dropped:
            self.counters.stats["broadcasts_dropped"] += self.broadcasts.dropped - dropped
            if self._now >= self._next_drop_report:
                # Logged at most every 10 s, with the total: never silent, never a flood.
                self._next_drop_report = self._now + 10.0
                self._event(EventKind.BROADCASTS_DROPPED, total=self.counters.stats["broadcasts_dropped"],
                            bound=self.broadcasts.max_depth,
                            detail="more updates than the queue holds; the least valuable were dropped "
                                   "(push-pull repairs what they would have said)")
        if self._eager_at is None:
            self._eager_at = max(self._now, self._last_gossip + self.config.eager_gossip_gap)

    def _send(self, addr: Address, msgs: list[Message]) -> None:
        encoded = [encode_message(m) for m in msgs]
        budget = self._packet_budget - sum(len(e) for e in encoded)
        limit = self.config.retransmit_limit(self.num_up())
        encoded.extend(self.broadcasts.get(budget, limit))
        self._send_encoded(addr, encoded)

    def _send_only(self, addr: Address, msgs: list[Message]) -> None:
        """A datagram of ``msgs`` alone, with no queued broadcasts riding along."""
        self._send_encoded(addr, [encode_message(m) for m in msgs])

    def _send_encoded(self, addr: Address, encoded: list[bytes]) -> None:
        if not encoded:
            return
        payload = pack_packet(encoded)
        stats = self.counters.stats
        stats["packets_out"] += 1
        for e in encoded:
            n = e[_ENCODED_TYPE_AT] & 0x1F
            stats["msg_out." + e[_ENCODED_TYPE_AT + 1:_ENCODED_TYPE_AT + 1 + n].decode()] += 1
        self._outbox.append(SendPacket(addr, payload))

    def _address_mismatch(self, m: Member, src: Address) -> None:
        """Packets from a member arrive from another address than it advertises: say so, once.

        The usual cause is NAT or a wrong --advertise; everyone else sends to
        the advertised address, so the operator needs both to fix it.
        """
        key = (m.name, src)
        if key in self._addr_warned or len(self._addr_warned) >= _MAX_ADDR_WARNINGS:
            return
        self._addr_warned.add(key)
        self.counters.stats["address_mismatches"] += 1
        self._event(EventKind.ADDRESS_MISMATCH, name=m.name, advertised=format_addr(m.addr), seen=format_addr(src),
                    detail="its packets come from another address than it advertises (NAT?); "
                           "others send to the advertised one: check its --advertise")

    def _own(self, m: Member) -> Member:
        """The record of ``m`` that this machine may change.

        The simulator lets thousands of machines share one record per member
        (``Member.shared``), which is what makes 10,000 simulated nodes fit in
        memory; the first machine to change a shared record takes a private
        copy.  A real agent's records are never shared: this returns ``m``.
        """
        if not m.shared:
            return m
        mine = copy.copy(m)
        del mine.__dict__["shared"]
        self.members[m.name] = mine
        return mine

    def _set_status(self, now: float, m: Member, status: Status, reason: str) -> None:
        assert not m.shared, "a shared member record must be copied (_own) before it changes"
        previous = m.status
        m.status = status
        m.status_since = now
        if previous.up != status.up and self._up_count is not None:
            size, up = self._up_count
            self._up_count = (size, up + (1 if status.up else -1))
        if previous is not status:
            self._event(EventKind.MEMBER, name=m.name, addr=format_addr(m.addr), status=status.value,
                        previous=previous.value, incarnation=m.incarnation, reason=reason)

    def _event(self, kind: EventKind, **fields: Any) -> None:
        self._events.append(Event(kind, fields))
