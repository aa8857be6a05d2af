"""SWIM membership with Lifeguard's refinements, as a sans-I/O state machine.

The caller owns time and sockets.  It feeds :class:`Membership` with
``receive(now, src, packet)`` and ``tick(now)``, performs what ``drain()``
returns (datagrams to send, TCP push-pull exchanges to run), and calls
``tick`` again at ``next_deadline()``.  The same object runs in the trio agent
and in the simulator on a virtual clock.

Membership is the front of components that share one member table
(gossip.table), each holding one part of the protocol:

* gossip.state -- the alive/suspect/dead rules, refutation, identity checks;
* gossip.probe -- the failure detector: probes, ping-req, nacks, local health;
* gossip.dissemination -- piggybacked updates and gossip rounds;
* gossip.sync -- push-pull anti-entropy, and join, settle and reconnect on it;
* gossip.query -- Serf's cluster-wide queries;
* gossip.latency -- measured RTTs and Vivaldi coordinates;
* gossip.delegate -- the application state that rides on membership.

References: SWIM (Das, Gupta, Motivala, 2002) for probing, ping-req, suspicion
and infection-style dissemination; Lifeguard (Dadgar, Phillips, Currey, 2018)
for the local health multiplier, dynamic suspicion timeouts and the buddy
system; hashicorp/memberlist for the concrete rules and defaults.
"""

from __future__ import annotations

import random

from gossip.config import GossipConfig
from gossip.config_sync import ConfigPeer
from gossip.coordinate import Coordinate
from gossip.delegate import Delegate, StateTransfer
from gossip.dissemination import Dissemination
from gossip.effects import (
    RTT_BUCKETS,
    Effect,
    Event,
    EventKind,
    FetchState,
    Purpose,
    SendPacket,
    StartPushPull,
    TcpProbe,
)
from gossip.keyring import SEAL_OVERHEAD
from gossip.latency import Latency
from gossip.member import Member, Status
from gossip.probe import Prober
from gossip.query import QUERY_MEMORY, Queries
from gossip.signing import Signer
from gossip.state import LEAVE_DIRECT, VERIFY_DELAY, StateRules
from gossip.sync import SETTLE_MAX, Refusal, Sync
from gossip.table import MemberTable
from gossip.wire import (
    Ack,
    Address,
    Alive,
    Dead,
    DecodeError,
    Nack,
    Ping,
    PingReq,
    Query,
    QueryResponse,
    StateRequest,
    Suspect,
    Tunnel,
    decode_packet,
    encode_stream,
    message_to_obj,
)

__all__ = [
    "LEAVE_DIRECT", "QUERY_MEMORY", "RTT_BUCKETS", "SETTLE_MAX", "VERIFY_DELAY", "Delegate", "Effect", "Event",
    "EventKind", "FetchState", "Membership", "Purpose", "Refusal", "SendPacket", "StartPushPull", "TcpProbe",
]

#: The counter of each message type received ("msg_in.alive", ...), built once per type.
_MSG_IN_KEYS: dict[type, str] = {}


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
        self.signer = signer
        me = Member(name, addr, incarnation, Status.ALIVE, dict(tags or {}), now,
                    state=delegate.state() if delegate else None, tunnel=tunnel)
        # (Built in this order: each takes its first random draws as it is built.)
        self.table = table = MemberTable(me, config, self.rng, now)
        self.dissemination = Dissemination(table, seal_overhead, now)
        self.latency = Latency(table)
        self.transfer = StateTransfer(table, delegate)
        self.rules = StateRules(table, self.dissemination, self.transfer, signer)
        self.prober = Prober(table, self.dissemination, self.rules, self.latency, now)
        self.sync = Sync(table, self.dissemination, self.rules, self.latency, self.transfer, now)
        self.queries = Queries(table, self.dissemination)
        # What callers read directly: the same objects the components hold.
        self.me = me
        self.members = table.members
        self.counters = table.counters
        self.awareness = table.awareness
        self.verifier = self.rules.verifier
        self.broadcasts = self.dissemination.queue
        self.vivaldi = self.latency.vivaldi
        self.coordinates = self.latency.coordinates
        self.query_responses = self.queries.responses
        self.udp_blocked = self.prober.udp_blocked
        self.rules.announce()

    @property
    def leaving(self) -> bool:
        return self.table.leaving

    @property
    def now(self) -> float:
        """The protocol time of the latest input."""
        return self.table.now

    # -- public inputs --------------------------------------------------------------

    def receive(self, now: float, src: Address, packet: bytes) -> None:
        """A UDP packet (already opened by the keyring) arrived from ``src``."""
        self.table.now = now
        try:
            messages = decode_packet(packet)
        except DecodeError as exc:
            self.table.drop(exc.reason)
            return
        stats = self.counters.stats
        stats["packets_in"] += 1
        # Answer pings last, so whatever the rest of the packet makes us say
        # (a refutation of a buddy-system suspicion, above all) rides on the ack.
        messages.sort(key=lambda m: isinstance(m, Ping))
        prober, rules = self.prober, self.rules
        for msg in messages:
            kind = type(msg)
            key = _MSG_IN_KEYS.get(kind)
            if key is None:
                key = _MSG_IN_KEYS[kind] = "msg_in." + message_to_obj(msg)["t"]
            stats[key] += 1
            if isinstance(msg, Ping):
                prober.on_ping(now, src, msg)
            elif isinstance(msg, Ack):
                prober.on_ack(now, msg)
            elif isinstance(msg, Alive):
                rules.on_alive(now, msg)
            elif isinstance(msg, Suspect):
                rules.on_suspect(now, msg)
            elif isinstance(msg, Dead):
                rules.on_dead(now, msg)
            elif isinstance(msg, PingReq):
                prober.on_ping_req(now, src, msg)
            elif isinstance(msg, Nack):
                prober.on_nack(now, src, msg)
            elif isinstance(msg, Query):
                self.queries.on_query(now, msg)
            elif isinstance(msg, QueryResponse):
                self.queries.on_response(now, src, msg)
            else:
                self.table.drop("unexpected_type")

    def drop(self, reason: str) -> None:
        """Count a packet or stream dropped for ``reason`` (visible in info)."""
        self.table.drop(reason)

    def tick(self, now: float) -> None:
        """Run every timer that is due at ``now``."""
        table = self.table
        table.now = now
        self.prober.tick(now)
        self.rules.tick(now)
        self.dissemination.tick(now)
        self.sync.tick(now)
        self.rules.tick_unverified(now)
        self.sync.tick_settle(now)
        if now >= table.next_reap:
            table.reap(now)
            self.queries.prune(now)

    def next_deadline(self) -> float:
        """The protocol time at which ``tick`` must next be called."""
        return min(self.table.next_reap, self.sync.next_deadline(), self.prober.next_deadline(),
                   self.dissemination.next_deadline(), self.rules.next_deadline())

    def drain(self) -> tuple[list[Effect], list[Event]]:
        """Take what the driver must do and what it should log."""
        table = self.table
        out, ev = table.outbox, table.events
        table.outbox, table.events = [], []
        return out, ev

    def join(self, now: float, seeds: list[Address]) -> None:
        """Keep trying to push-pull with the seeds, with backoff, until one answers."""
        self.sync.join(now, seeds)

    @property
    def joined(self) -> bool:
        return self.sync.joined

    @property
    def join_error(self) -> str:
        return self.sync.join_error

    def leave(self, now: float) -> None:
        """Announce a graceful leave: others will show us as ``left``, never dead."""
        self.table.now = now
        if self.table.leaving:
            return
        self.prober.stop()
        self.rules.leave(now)

    def force_leave(self, now: float, name: str) -> str:
        """Mark ``name`` left everywhere, on its behalf (Serf's and Consul's force-leave).

        For a member that will never come back, before the reap removes it: a
        left member is not reconnected to, and shows as departed, not failed.
        The claim is a leave at the incarnation the member announced, so it is
        within the bound on accusations; a member that is in fact alive hears
        it, refutes, and stays.  Returns the status it had.
        """
        self.table.now = now
        return self.rules.force_leave(now, name)

    def leave_spread(self, now: float) -> bool:
        """True once our leave has been sent its full retransmit budget."""
        return self.table.leaving and (
            not self.dissemination.pending(self.name) or not self.dissemination.targets(now)
        )

    def set_config_peer(self, peer: ConfigPeer) -> None:
        """Take part in config-entry anti-entropy (gossip.config_sync): a digest in every push-pull."""
        self.sync.config_peer = peer

    def set_tunnel(self, tunnel: Tunnel) -> None:
        """Our tunnel address or key changed (e.g. bound to a port the OS chose)."""
        self.rules.set_tunnel(tunnel)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Change our tags: a new incarnation carries them to everyone."""
        self.rules.set_tags(tags)

    def state_changed(self) -> None:
        """The delegate's state changed: a new incarnation advertises it."""
        self.rules.state_changed()

    # -- push-pull and other TCP exchanges (driven by the agent) ---------------------------

    def stagger_push_pull(self, now: float, phase: float) -> None:
        """Put the next periodic push-pull ``phase`` (0..1) of a scaled interval from now.

        For a simulated cluster that has "been up a while": its members'
        push-pulls are spread over the interval for its size, not all due in
        the first unscaled interval as after a fresh start.
        """
        self.sync.stagger(now, phase)

    def push_pull_payload(self, join: bool, lite: bool = False) -> bytes:
        """Our side of a push-pull.  ``lite`` (periodic syncs, purpose "sync"):
        without the members' signatures, tunnel keys and catalog digests, which
        are most of a push-pull's bytes and which a peer that already agrees
        with us does not need; a peer that finds something new in a lite
        exchange asks for a full one."""
        return self.sync.payload(join, lite)

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
        self.table.now = now
        return self.sync.handle_streams(now, requests)

    def complete_push_pull(
        self, now: float, target: Address, purpose: Purpose, reply: bytes | None, error: str = "",
        refused: bool = False,
    ) -> tuple[bool, str]:
        """We were the initiator: merge the reply (or note the failure).  ``refused``: the target's
        host refused the connection (nothing listens on that port), which a join retries sooner."""
        self.table.now = now
        # (Purpose(): a driver may hand back the enum's value.)
        return self.sync.complete(now, target, Purpose(purpose), reply, error, refused)

    def complete_fetch(self, now: float, node: str, reply: bytes | None) -> bool:
        """The reply to a FetchState arrived (or None: it failed)."""
        self.table.now = now
        return self.transfer.complete_fetch(node, reply)

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
        self.table.now = now
        self.prober.complete_tcp_probe(now, seq, reply, refused)

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
        self.table.now = now
        self.prober.port_unreachable(now, addr)

    def checked(self, name: str) -> bool:
        """Whether ``name``'s record has had its signature checked (checking it now if not).

        The data plane asks before it trusts a member's tunnel key.
        """
        return self.rules.checked(name)

    # -- queries (Serf's internal queries: cluster-wide operations) ---------------------------

    def start_query(self, now: float, name: str, payload: bytes) -> int:
        """Ask every member to run ``name`` with ``payload``; returns the query id.

        Every member, us included, sees it once as a ``query`` event and
        answers with :meth:`respond_query`, straight to us.  Answers collect in
        ``query_responses[id]`` until :meth:`finish_query`.
        """
        self.table.now = now
        return self.queries.start(now, name, payload)

    def respond_query(self, now: float, origin: str, origin_addr: Address, qid: int, payload: bytes) -> None:
        self.table.now = now
        self.queries.respond(origin, origin_addr, qid, payload)

    def finish_query(self, qid: int) -> dict[str, bytes]:
        return self.queries.finish(qid)

    # -- introspection --------------------------------------------------------------

    def view_version(self) -> tuple[int, int]:
        """Changes whenever anything a member view shows may have changed."""
        return self.table.view_version()

    def member_list(self) -> list[Member]:
        return self.table.member_list()

    def count_by_status(self) -> dict[str, int]:
        return self.table.count_by_status()

    def num_up(self) -> int:
        return self.table.num_up()

    def coordinate_of(self, name: str) -> Coordinate | None:
        return self.latency.coordinate_of(name)

    def rtt_estimate(self, a: str, b: str) -> tuple[float, str] | None:
        """RTT between two members in seconds, and how we know it (gossip.latency)."""
        return self.latency.rtt_estimate(a, b)
