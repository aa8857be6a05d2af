"""SWIM's failure detector: one probe per protocol period, ping-req through others, and Lifeguard's refinements.

Each period a member pings the next one of a shuffled round-robin order
(SWIM section 4.3); with no ack by the probe timeout it asks
``indirect_checks`` others to ping the target for it (ping-req) and, as
memberlist does, pings it over TCP as well.  No ack by the end of the period
makes the target suspect (gossip.state).  Lifeguard adds nacks from the
helpers, so a prober whose own links fail learns so, and the local health
multiplier (gossip.awareness) that stretches a struggling member's periods.
"""

from __future__ import annotations

import bisect
import math

from gossip.dissemination import Dissemination
from gossip.effects import RTT_BUCKETS, EventKind, TcpProbe
from gossip.latency import Latency
from gossip.member import MEMBER_CHANGES, Member, Status
from gossip.state import StateRules
from gossip.table import MemberTable
from gossip.wire import (
    Ack,
    Address,
    Dead,
    DecodeError,
    Message,
    Nack,
    Ping,
    PingReq,
    Suspect,
    decode_stream,
    encode_stream,
    format_addr,
)


class Probe:
    """The probe in flight: its target, and how far it got."""

    # (Plain classes, not dataclasses: built at every agent start, and nothing
    # compares or prints them; gossip.frozen says what a dataclass costs.)
    __slots__ = ("target", "seq", "sent", "direct_deadline", "end", "indirect_sent", "expected_nacks", "nacks",
                 "tcp_ok")

    def __init__(self, target: str, seq: int, sent: float, direct_deadline: float, end: float) -> None:
        self.target = target
        self.seq = seq
        self.sent = sent
        self.direct_deadline = direct_deadline
        self.end = end
        self.indirect_sent = False
        self.expected_nacks = 0
        self.nacks = 0
        #: The TCP fallback probe got the target's ack.
        self.tcp_ok = False


class _Relay:
    """A ping-req we are serving for someone else."""

    __slots__ = ("requester", "orig_seq", "target", "nack_at", "expire")

    def __init__(self, requester: Address, orig_seq: int, target: str, nack_at: float | None, expire: float) -> None:
        self.requester = requester
        self.orig_seq = orig_seq
        self.target = target
        self.nack_at = nack_at
        self.expire = expire


class Prober:
    def __init__(self, table: MemberTable, dissemination: Dissemination, rules: StateRules, latency: Latency,
                 now: float) -> None:
        self.table = table
        self.config = table.config
        self.awareness = table.awareness
        self.rules = rules
        self.latency = latency
        self._name = table.name
        self._members = table.members
        self._rng = table.rng
        self._stats = table.counters.stats
        self._send = dissemination.send
        #: The probe in flight, if any.
        self.current: Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._order: list[str] = []
        self._index = 0
        #: Members our UDP probes miss but TCP reaches (a firewall dropping UDP,
        #: most likely): name -> when that was last seen.
        self.udp_blocked: dict[str, float] = {}
        # Spread the first probe over one interval so agents started together
        # do not probe in lockstep.
        self.next_probe = now + self._rng.uniform(0, self.config.probe_interval)
        table.on_admit(self._admit)
        table.on_forget(self._forget)

    def _admit(self, name: str) -> None:
        # Insert at a random place so a new member is probed soon (memberlist).
        # (Into the part of this pass not probed yet: before it, it would shift
        # one already probed back under the cursor.)
        self._order.insert(self._rng.randint(self._index, len(self._order)), name)

    def _forget(self, name: str) -> None:
        self.udp_blocked.pop(name, None)

    def stop(self) -> None:
        """No more probing (we are leaving): the probe in flight is dropped."""
        self.current = None

    # -- messages ------------------------------------------------------------------------

    def on_ping(self, now: float, src: Address, msg: Ping) -> None:
        sender = self._members.get(msg.source)
        if sender is not None and sender.addr != src and msg.source != self._name:
            self.rules.address_mismatch(sender, src)
        if msg.target != self._name:
            # The address now belongs to someone else (memberlist checks this too).
            self.table.drop("wrong_node")
            return
        reply: list[Message] = [Ack(msg.seq, self._name, self.latency.own_wire())]
        if sender is not None and sender.status in (Status.SUSPECT, Status.DEAD):
            # It is talking to us, so it is up; tell it what we think of it
            # so it refutes now rather than at its next push-pull.
            cls = Suspect if sender.status is Status.SUSPECT else Dead
            reply.append(cls(sender.name, sender.incarnation, self._name))
        self._send(src, reply)

    def on_ping_req(self, now: float, src: Address, msg: PingReq) -> None:
        sender = self._members.get(msg.source)
        if sender is not None and sender.addr != src and msg.source != self._name:
            self.rules.address_mismatch(sender, src)
        if msg.target == self._name:
            self._send(src, [Ack(msg.seq, self._name)])
            return
        seq = self.table.next_seq()
        nack_at = now + 0.8 * self.config.probe_timeout if msg.want_nack else None
        self._relays[seq] = _Relay(src, msg.seq, msg.target, nack_at, now + self.config.probe_timeout)
        self._send(msg.target_addr, [Ping(seq, msg.target, self._name)])

    def on_nack(self, now: float, src: Address, msg: Nack) -> None:
        sender = self._members.get(msg.source)
        if sender is not None and sender.addr != src and msg.source != self._name:
            self.rules.address_mismatch(sender, src)
        p = self.current
        if p is not None and p.seq == msg.seq:
            p.nacks += 1

    def on_ack(self, now: float, msg: Ack) -> None:
        p = self.current
        if p is not None and p.seq == msg.seq:
            target = self._members.get(p.target)
            if target is not None and msg.source == p.target and not p.indirect_sent:
                sample = now - p.sent
                target = self.table.own(target)
                if self.udp_blocked.pop(target.name, None) is not None:
                    MEMBER_CHANGES.bump()
                    self.table.event(EventKind.UDP_RESTORED, name=target.name)
                target.rtt = sample if target.rtt is None else 0.8 * target.rtt + 0.2 * sample
                counters = self.table.counters
                counters.rtt_buckets[bisect.bisect_left(RTT_BUCKETS, sample)] += 1
                counters.rtt_sum += sample
                if msg.coord is not None:
                    self.latency.observe(target.name, msg.coord, sample)
            self.awareness.apply_delta(-1)
            self.current = None
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._send(relay.requester, [Ack(relay.orig_seq, relay.target)])

    # -- timers --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        p = self.current
        if p is not None and now - p.end > self.config.probe_interval:
            # We overslept by more than a whole period (process paused or
            # starved): the missing ack says nothing about the target.  Drop
            # the probe instead of accusing it, and count it against our own
            # health as Lifeguard does for other signs of local trouble.
            self.current = p = None
            self.awareness.apply_delta(1)
            self._stats["probes_abandoned_late"] += 1
        if p is not None and not p.indirect_sent and now >= p.direct_deadline:
            self._send_indirect(now, p)
        if p is not None and now >= p.end:
            self._probe_failed(now, p)
            self.current = None
        if not self.table.leaving and now >= self.next_probe:
            self._start_probe(now)
        if self._relays:
            self._tick_relays(now)

    def next_deadline(self) -> float:
        t = math.inf if self.table.leaving else self.next_probe
        p = self.current
        if p is not None:
            if p.end < t:
                t = p.end
            if not p.indirect_sent and p.direct_deadline < t:
                t = p.direct_deadline
        for r in self._relays.values():
            if r.expire < t:
                t = r.expire
            if r.nack_at is not None and r.nack_at < t:
                t = r.nack_at
        return t

    def _start_probe(self, now: float) -> None:
        interval = self.awareness.scale(self.config.probe_interval)
        self.next_probe = now + interval
        target = self._next_target()
        if target is None:
            return
        seq = self.table.next_seq()
        msgs: list[Message] = [Ping(seq, target.name, self._name)]
        if target.status is Status.SUSPECT and self.config.lifeguard:
            # Lifeguard's buddy system: tell the member it is suspected, so it
            # can refute at once instead of waiting for gossip to reach it.
            msgs.append(Suspect(target.name, target.incarnation, self._name))
        timeout = self.awareness.scale(self.config.probe_timeout)
        self.current = Probe(target.name, seq, now, now + timeout, now + interval)
        self._stats["probes"] += 1
        self._send(target.addr, msgs)

    def _next_target(self) -> Member | None:
        # SWIM section 4.3: round-robin over a shuffled list, reshuffled each pass,
        # bounds the time to first detection.  The shuffle is done lazily, one
        # Fisher-Yates step per probe (the same uniform order): a pass over ten
        # thousand members then costs no ten-thousand-step shuffle up front.
        order = self._order
        members = self._members
        for _ in range(2):
            while self._index < len(order):
                i = self._index
                j = self._rng.randrange(i, len(order))
                order[i], order[j] = order[j], order[i]
                name = order[i]
                self._index += 1
                m = members.get(name)
                if m is not None and m.status.up and name != self._name:
                    return m
            order = self._order = [n for n, m in members.items() if n != self._name and m.status.up]
            self._index = 0
        return None

    def _tick_relays(self, now: float) -> None:
        for seq, r in list(self._relays.items()):
            if r.nack_at is not None and now >= r.nack_at:
                r.nack_at = None
                self._send(r.requester, [Nack(r.orig_seq, self._name)])
            if now >= r.expire:
                del self._relays[seq]

    # -- the indirect phase ----------------------------------------------------------------

    def complete_tcp_probe(self, now: float, seq: int, reply: bytes | None, refused: bool = False) -> None:
        """The TCP fallback probe ``seq`` ended (Membership.complete_tcp_probe)."""
        p = self.current
        if p is None or p.seq != seq:
            return
        if reply is None:
            if refused:
                self.current = None
                self._stats["probes_refused"] += 1
                self._probe_failed(now, p, refused=True)
            return
        try:
            msgs = decode_stream(reply)
        except DecodeError as exc:
            self.table.drop(exc.reason)
            return
        if len(msgs) == 1 and isinstance(msgs[0], Ack) and msgs[0].seq == seq and msgs[0].source == p.target:
            p.tcp_ok = True

    def port_unreachable(self, now: float, addr: Address) -> None:
        """Nothing listens on ``addr``'s UDP port: the indirect phase starts now (Membership.port_unreachable)."""
        p = self.current
        if p is None or p.indirect_sent:
            return
        target = self._members.get(p.target)
        if target is None or target.addr != addr:
            return
        self._stats["probes_unreachable"] += 1
        self._send_indirect(now, p)

    def _send_indirect(self, now: float, p: Probe) -> None:
        p.indirect_sent = True
        target = self._members.get(p.target)
        if target is None:
            return
        if self.config.tcp_fallback:
            # memberlist's fallback ping: at the same time as the ping-reqs.
            self.table.outbox.append(TcpProbe(target.addr, p.seq,
                                              encode_stream([Ping(p.seq, target.name, self._name)]), p.end))
            self._stats["tcp_pings"] += 1
        helpers = [
            m for m in self._members.values()
            if m.status is Status.ALIVE and m.name not in (self._name, p.target)
        ]
        chosen = self._rng.sample(helpers, min(self.config.indirect_checks, len(helpers)))
        for h in chosen:
            self._send(h.addr, [PingReq(p.seq, target.name, target.addr, self._name, self.config.lifeguard)])
        p.expected_nacks = len(chosen) if self.config.lifeguard else 0
        self._stats["ping_reqs"] += len(chosen)

    def _probe_failed(self, now: float, p: Probe, refused: bool = False) -> None:
        if p.tcp_ok:
            # Reached over TCP only: the member is up, the UDP path to it is not.
            # Say so (once, until UDP works again) rather than accuse it.
            if p.target not in self.udp_blocked:
                m = self._members.get(p.target)
                self.table.event(EventKind.UDP_BLOCKED, name=p.target, addr=format_addr(m.addr) if m else "?",
                                 detail="probes over UDP fail but TCP reaches it: is a firewall dropping UDP?")
            self.udp_blocked[p.target] = now
            MEMBER_CHANGES.bump()  # member views show it
            self._stats["tcp_fallback_saves"] += 1
            return
        # Lifeguard: missing nacks mean our own links are at fault, not the target's --
        # unless the target's host refused us, which shows our links work (the nacks
        # are not due yet then).
        if not refused:
            if p.expected_nacks > 0:
                self.awareness.apply_delta(max(0, p.expected_nacks - p.nacks))
            else:
                self.awareness.apply_delta(1)
        self._stats["probe_failures"] += 1
        m = self._members.get(p.target)
        if m is not None and m.status.up:
            # On a member already suspect this is an independent confirmation,
            # which shortens its suspicion everywhere (Lifeguard section IV-B).
            self.rules.on_suspect(now, Suspect(m.name, m.incarnation, self._name))
