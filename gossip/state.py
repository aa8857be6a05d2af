"""SWIM's rules for claims about members -- alive, suspect, dead -- and a member's answer to claims about itself.

The three rules follow memberlist's aliveNode/suspectNode/deadNode: a claim
counts only at an incarnation at least the one held, and only the member
itself raises its incarnation, which it does to refute (SWIM section 4.2).
Lifeguard's dynamic suspicion timeout (gossip.suspicion) decides when a
suspicion becomes a death.  Names are bound to identity keys
(gossip.signing): a signed cluster takes an alive only under the key its name
already has, and a name seen for the first time has its signature checked a
moment later (VERIFY_DELAY).
"""

from __future__ import annotations

from gossip.delegate import StateTransfer
from gossip.dissemination import Dissemination
from gossip.effects import EventKind, Purpose, StartPushPull
from gossip.member import Member, Status
from gossip.signing import Signer, Verifier, alive_bytes
from gossip.suspicion import Suspicion, Suspicions
from gossip.table import MemberTable
from gossip.wire import (
    MAX_INCARNATION,
    Address,
    Alive,
    Dead,
    MemberRecord,
    PushPull,
    Suspect,
    Tunnel,
    format_addr,
)

#: Live members a leaving agent tells directly, besides gossiping its leave.
LEAVE_DIRECT = 32
#: A joining agent tells every live member directly, once its join's push-pull has named them,
#: when they are at most this many; a larger cluster hears of it by gossip alone.
JOIN_DIRECT = 32
#: A member seen for the first time has its signature checked this long after
#: it arrived, and before its tunnel key is used (``checked``).  Why it may
#: wait: on first sight the signature cannot bind anything -- the name takes
#: the key that comes with it (trust on first use, gossip.signing) -- it only
#: shows that the other fields are the key owner's.  In a burst of joins every
#: agent checks a signature per joiner while the seed, one process among many
#: sharing a few cores, is what the cluster waits on; checked after the burst,
#: the same work no longer delays it (docs/membership.md, "First-sight signatures").
VERIFY_DELAY = 1.0
#: How often, at most, we ask a member's address who holds it (StateRules.verify_address).
VERIFY_ADDRESS_EVERY = 2.0
#: Distinct address mismatches reported at most (a bound on what a peer can make us keep).
_MAX_ADDR_WARNINGS = 4096


def alive_of(r: MemberRecord) -> Alive:
    """The alive a push-pull record carries: the member's own, signed, where the record has its signature."""
    return Alive(r.name, r.incarnation, r.addr, r.tags, r.state, r.tunnel, r.identity, r.sig)


class StateRules:
    def __init__(self, table: MemberTable, dissemination: Dissemination, transfer: StateTransfer,
                 signer: Signer | None) -> None:
        self.table = table
        self.config = table.config
        self.dissemination = dissemination
        self.transfer = transfer
        #: Our identity key; None runs unsigned (the simulator), and then only
        #: unsigned members are accepted: a cluster is signed or not, as a whole.
        self.signer = signer
        self.verifier = Verifier()
        self.suspicions = Suspicions()
        self._name = table.name
        self._me = table.me
        self._members = table.members
        self._stats = table.counters.stats
        self._own = table.own
        self._set_status = table.set_status
        self._event = table.event
        self._broadcast = dissemination.broadcast
        #: Members seen once, signature not yet checked (VERIFY_DELAY): when, and the alive.
        self._unverified: dict[str, tuple[float, Alive]] = {}
        #: (member, source address) pairs already reported (address_mismatch, identity warnings).
        self._addr_warned: set[tuple[str, Address]] = set()
        #: Names whose address we asked who holds it (verify_address), and when, so we ask once a while.
        self._verified_at: dict[str, float] = {}
        table.on_forget(self._forget)

    def _forget(self, name: str) -> None:
        self._unverified.pop(name, None)
        self.suspicions.discard(name)

    # -- timers --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Suspicions that timed out become deaths."""
        if not len(self.suspicions):
            return
        for name in self.suspicions.expire(now):
            m = self._members.get(name)
            if m is not None and m.status is Status.SUSPECT:
                self._stats["suspicion_timeouts"] += 1
                self.on_dead(now, Dead(name, m.incarnation, self._name))

    def tick_unverified(self, now: float) -> None:
        """Check the first-sight signatures that are due."""
        if self._unverified and now >= self._verify_due():
            # Those due, and those a moment from it, in one go: fewer wake-ups.
            until = now - VERIFY_DELAY + self.config.settle_quiet()
            for name, (seen, _) in list(self._unverified.items()):
                if seen > until:
                    break  # (kept in arrival order)
                self._check_pending(now, name)

    def next_deadline(self) -> float:
        """The earliest suspicion timeout or first-sight check."""
        t = self.suspicions.next_deadline()
        if self._unverified:
            due = self._verify_due()
            if due < t:
                return due
        return t

    # -- the rules -----------------------------------------------------------------------

    def signature_ok(self, a: Alive) -> bool:
        if a.identity is None or a.sig is None:
            return False
        data = alive_bytes(a.name, a.addr, a.incarnation, a.tags, a.state, a.tunnel)
        return self.verifier.verify(a.identity, data, a.sig)

    def on_alive(self, now: float, a: Alive, spread_new: bool = True) -> None:
        if a.name == self._name:
            self._on_alive_self(now, a)
            return
        m = self._members.get(a.name)
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
            if m is not None and not self.signature_ok(a):
                self.table.drop("bad_signature")
                return
        elif self.signer is not None:
            self.table.drop("unsigned_alive")
            return
        if m is None:
            m = Member(a.name, a.addr, a.incarnation, Status.ALIVE, dict(a.tags), now, state=a.state,
                       tunnel=a.tunnel, identity=a.identity, sig=a.sig)
            self.transfer.note(m)
            self.table.admit(now, m)
            if a.identity is not None:
                self._unverified[a.name] = (now, a)
            self._event(EventKind.MEMBER, name=a.name, addr=format_addr(a.addr), status="alive",
                        previous="none", incarnation=a.incarnation, reason="joined")
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
                    self.verify_address(now, m)
                if (a.name, a.addr) not in self._addr_warned:
                    self._addr_warned.add((a.name, a.addr))
                    self._event(EventKind.NAME_CONFLICT, name=a.name, ours=format_addr(m.addr),
                                theirs=format_addr(a.addr),
                                reason="a different identity key claims this live member's name; refused")
                self._stats["name_conflicts"] += 1
                self.table.drop("identity_conflict")
                return
            # Dead or departed: the name may be taken by a new key (a rebuilt node).
            self._event(EventKind.MEMBER_REKEYED, name=a.name, addr=format_addr(a.addr))
        if a.addr != m.addr:
            if m.status.up and not same_key:
                self._event(EventKind.NAME_CONFLICT, name=a.name, ours=format_addr(m.addr),
                            theirs=format_addr(a.addr),
                            reason=f"name already alive at {format_addr(m.addr)}; refused")
                self._stats["name_conflicts"] += 1
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
            self.transfer.note(m)
        self.suspicions.discard(a.name)
        if m.status is not Status.ALIVE:
            reason = "refuted suspicion" if m.status is Status.SUSPECT else "rejoined"
            self._set_status(now, m, Status.ALIVE, reason)
        self._broadcast(a.name, a)

    def _on_alive_self(self, now: float, a: Alive) -> None:
        me = self._me
        if a.identity is not None and a.identity != me.identity and a.addr == me.addr:
            # Our own address under another key: a previous run of this agent (started without
            # --data-dir, it kept no identity).  Peers ask this address who holds it, and take
            # our key once we answer (replaced_at_address).
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
            self._stats["name_conflicts"] += 1
        elif a.addr != me.addr and a.incarnation >= me.incarnation and a.identity is None:
            self._event(EventKind.NAME_CONFLICT, name=a.name, ours=format_addr(me.addr),
                        theirs=format_addr(a.addr),
                        reason="another agent claims this agent's name")
            self._stats["name_conflicts"] += 1
        if not self.table.leaving and (
            a.incarnation > me.incarnation
            or (a.incarnation == me.incarnation and (a.addr != me.addr or a.tags != me.tags))
        ):
            self.refute(now, a.incarnation, "stale alive about this agent")

    def _beyond_announced(self, m: Member, incarnation: int) -> bool:
        """An accusation above the incarnation the member itself announced (its latest alive).

        SWIM's rule that only a member raises its own incarnation makes such a
        claim a lie or a bug: honest accusers name the incarnation they hold,
        which came from the member's own (signed) alive.  Taken, one datagram
        with the largest incarnation the wire carries would kill the member for
        good, since no refutation could outbid it.  Dropped and counted.
        """
        if incarnation > m.incarnation:
            self.table.drop("accusation_beyond_alive")
            return True
        return False

    def on_suspect(self, now: float, s: Suspect) -> None:
        if s.name == self._name:
            self._accused(now, s.incarnation, f"suspected by {s.source}")
            return
        m = self._members.get(s.name)
        if m is None or s.incarnation < m.incarnation or self._beyond_announced(m, s.incarnation):
            return
        suspicions = self.suspicions
        if s.name in suspicions:
            if suspicions.confirm(s.name, s.source):
                self._stats["suspicion_confirmations"] += 1
                self._broadcast(s.name, s)
            return
        if m.status is not Status.ALIVE:
            return
        m = self._own(m)
        m.incarnation = s.incarnation
        self._set_status(now, m, Status.SUSPECT, f"suspected by {s.source}")
        self._stats["suspicions"] += 1
        n = self.table.num_up()
        k = self.config.suspicion_mult - 2
        if n - 2 < k or not self.config.lifeguard:
            k = 0  # too few members for independent confirmations (memberlist); or a fixed timeout
        suspicions.start(s.name, Suspicion(now, s.source, k, self.config.suspicion_min(n),
                                           self.config.suspicion_max(n)))
        self._broadcast(s.name, s)

    def on_dead(self, now: float, d: Dead) -> None:
        if d.name == self._name:
            # Our own name as the source is our own earlier leave (or a force-leave said for us).
            self._accused(now, d.incarnation, "an earlier leave of this agent" if d.source == d.name
                          else f"declared dead by {d.source}")
            return
        m = self._members.get(d.name)
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
        self.suspicions.discard(d.name)
        if d.source == d.name:
            self._set_status(now, m, Status.LEFT, "left gracefully")
        else:
            self._set_status(now, m, Status.DEAD, f"declared dead by {d.source}")
        self._broadcast(d.name, d)

    # -- claims about ourselves --------------------------------------------------------------

    def _accused(self, now: float, incarnation: int, reason: str) -> None:
        """Someone claims we are suspect or dead."""
        if self.table.leaving:
            return
        if incarnation >= MAX_INCARNATION:
            # No refutation can outbid it; peers drop it (_beyond_announced), so we need not.
            self.table.drop("accusation_beyond_alive")
            return
        if incarnation >= self._me.incarnation:
            # Above what we announced is still possible here: a restarted agent starts low,
            # and its past self's incarnation comes back to it as "dead at N".
            self.refute(now, incarnation, reason)
        elif not self.dissemination.pending(self._name):
            # A stale claim: its sender missed our refutation.  Repeat our
            # current alive so it learns (it rides on the ack of a buddy probe).
            self.announce()

    def refute(self, now: float, accused: int, reason: str) -> None:
        """SWIM: only a member raises its own incarnation, to overrule a claim."""
        self._me.incarnation = max(self._me.incarnation, accused) + 1
        self.table.awareness.apply_delta(1)  # Lifeguard: being suspected hints we are slow
        self._stats["refutations"] += 1
        self._event(EventKind.REFUTE, incarnation=self._me.incarnation, reason=reason)
        self.announce()

    def announce(self) -> None:
        """Spread our own alive as it stands (signed, when we sign)."""
        me = self._me
        if self.signer is not None:
            me.identity = self.signer.public
            me.sig = self.signer.sign(alive_bytes(me.name, me.addr, me.incarnation, me.tags, me.state, me.tunnel))
        self._broadcast(self._name, self._own_alive())

    def _own_alive(self) -> Alive:
        """Our own alive as it stands."""
        me = self._me
        return Alive(self._name, me.incarnation, me.addr, dict(me.tags), me.state, me.tunnel, me.identity, me.sig)

    def announce_joined(self, skip: Address) -> None:
        """Just joined a small cluster: our alive, said directly to every live member but ``skip``
        (the member we joined through, which knows), one datagram each.

        Gossip alone reaches the last of them a few rounds later, and in a burst of joins
        the members that joined together know each other only from gossip.  Said directly,
        as a leave is, every member the join's push-pull named hears it at once.  Only in a
        cluster of up to JOIN_DIRECT: in a large burst most joiners are news to each other,
        which no push-pull names yet, so telling a sample of the cluster adds datagrams and
        gains nothing (docs/membership.md, "Join bursts", has the simulator's figures).
        """
        up = [m for m in self._members.values() if m.name != self._name and m.status.up and m.addr != skip]
        if len(up) > JOIN_DIRECT:
            return
        alive = self._own_alive()
        for m in up:
            self.dissemination.send_only(m.addr, [alive])

    def state_changed(self) -> None:
        """The delegate's state changed: a new incarnation advertises it."""
        delegate = self.transfer.delegate
        if delegate is None:
            return
        st = delegate.state()
        if st != self._me.state:
            self._me.state = st
            self._me.incarnation += 1
            self.announce()

    def set_tunnel(self, tunnel: Tunnel) -> None:
        """Our tunnel address or key changed (e.g. bound to a port the OS chose)."""
        if tunnel != self._me.tunnel:
            self._me.tunnel = tunnel
            self._me.incarnation += 1
            self.announce()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Change our tags: a new incarnation carries them to everyone."""
        self._me.tags = dict(tags)
        self._me.incarnation += 1
        self.announce()

    def leave(self, now: float) -> None:
        """Announce a graceful leave: others will show us as ``left``, never dead."""
        table = self.table
        table.leaving = True
        d = Dead(self._name, self._me.incarnation, self._name)
        self._set_status(now, self._me, Status.LEFT, "leave requested")
        self._broadcast(self._name, d)
        self.dissemination.gossip_round(now)
        # Said once, so said directly too, to up to LEAVE_DIRECT live members: its few
        # gossip transmissions go to random targets, members recently dead among them, and
        # may reach some members only seconds later (docs/membership.md, "Leaving"); the
        # epidemic from those told carries it beyond.
        up = [m for m in self._members.values() if m.name != self._name and m.status.up]
        for m in table.rng.sample(up, min(LEAVE_DIRECT, len(up))):
            self.dissemination.send_only(m.addr, [d])

    def force_leave(self, now: float, name: str) -> str:
        """Mark ``name`` left, on its behalf; returns the status it had (Membership.force_leave)."""
        m = self._members.get(name)
        if m is None:
            raise KeyError(name)
        if name == self._name:
            raise ValueError("this agent itself: use a graceful leave")
        was = m.status.value
        if m.status is not Status.LEFT:
            m = self._own(m)
            self.suspicions.discard(name)
            self._set_status(now, m, Status.LEFT, f"forced to leave by {self._name}")
            self._broadcast(name, Dead(name, m.incarnation, name))
        return was

    # -- identities --------------------------------------------------------------------------

    def verify_address(self, now: float, m: Member) -> None:
        """Open a push-pull to ``m``'s address: its answer says which key holds that address now."""
        last = self._verified_at.get(m.name)
        if last is not None and now - last < VERIFY_ADDRESS_EVERY:
            return
        self._verified_at[m.name] = now
        self.table.outbox.append(StartPushPull(m.addr, Purpose.VERIFY))

    def replaced_at_address(self, now: float, target: Address, remote: PushPull) -> None:
        """The member at ``target``, which we dialled, answers with a new identity key: its old one is gone.

        The strongest evidence SWIM has: a UDP or TCP address is held by one
        process at a time, and we chose the address, so whoever answers there
        is the member now.  Its own record is signed with the new key.  The
        old key's member is taken as dead here, and the new key's alive (next,
        in the merge) takes the name.  A live impostor elsewhere never gets this
        far: dialling the member's address reaches the member, not it.
        """
        held = self._members.get(remote.source)
        if held is None or remote.lite or remote.source == self._name or not held.status.up:
            return
        own = next((r for r in remote.members if r.name == remote.source), None)
        if (own is None or own.identity is None or held.identity is None or own.identity == held.identity
                or own.addr != target or held.addr != target):
            return
        if not self.signature_ok(alive_of(own)):
            return
        m = self._own(held)
        self.suspicions.discard(m.name)
        self._set_status(now, m, Status.DEAD, "replaced at its address by a new identity key")
        self._stats["identities_replaced"] += 1

    def learn_announced(self, held: Member, r: MemberRecord) -> None:
        """Take the incarnation a push-pull record proves the member itself announced (its signed alive)."""
        if (r.addr != held.addr or r.identity is None or r.identity != held.identity
                or not self.signature_ok(alive_of(r))):
            return  # unproven: the accusation that follows is dropped as beyond what was announced
        m = self._own(held)
        m.incarnation = r.incarnation
        m.tags = dict(r.tags)
        m.tunnel = r.tunnel
        m.sig = r.sig
        if r.state != m.state:
            m.state = r.state
            self.transfer.note(m)

    def address_mismatch(self, m: Member, src: Address) -> None:
        """Packets from ``m`` arrive from another address than it advertises: say so, once.

        The usual cause is NAT or a wrong --advertise; everyone else sends to
        the advertised address, so the operator needs both to fix it.
        """
        key = (m.name, src)
        if key in self._addr_warned or len(self._addr_warned) >= _MAX_ADDR_WARNINGS:
            return
        self._addr_warned.add(key)
        self._stats["address_mismatches"] += 1
        self._event(EventKind.ADDRESS_MISMATCH, name=m.name, advertised=format_addr(m.addr), seen=format_addr(src),
                    detail="its packets come from another address than it advertises (NAT?); "
                           "others send to the advertised one: check its --advertise")

    # -- first-sight signatures (VERIFY_DELAY) -----------------------------------------------

    def _verify_due(self) -> float:
        return next(iter(self._unverified.values()))[0] + VERIFY_DELAY

    def _check_pending(self, now: float, name: str) -> bool:
        """Check the signature of a member seen once; a forgery is forgotten, loudly."""
        entry = self._unverified.pop(name, None)
        if entry is None:
            return name in self._members
        if self.signature_ok(entry[1]):
            return True
        self.table.drop("bad_signature")
        if name in self._members:
            self.table.forget(name)
            self._event(EventKind.MEMBER_FORGED, name=name, addr=format_addr(entry[1].addr),
                        reason="its alive was not signed by the key it carried; forgotten")
        return False

    def checked(self, name: str) -> bool:
        """Whether ``name``'s record has had its signature checked (checking it now if not)."""
        return self._check_pending(self.table.now, name)
