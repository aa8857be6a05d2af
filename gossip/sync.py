"""Anti-entropy over TCP: push-pull, and the join, settle and reconnect loops built on it.

SWIM's dissemination reaches every member with high probability, not for
certain, and not across a partition; memberlist adds a periodic full-state
exchange (push-pull) with a random member, which repairs whatever gossip
missed.  A join is a push-pull with a seed; a settle is one more after news of
new members stops (docs/membership.md, "Settling after a join"); a reconnect
is one with a member marked dead, which heals a partition that outlasted the
suspicion timeout.  The merge follows memberlist's mergeState: a remote
"dead" only makes us suspect, so one member's stale view cannot kill a member
we can still reach.
"""

from __future__ import annotations

from enum import StrEnum

from gossip.config_sync import ConfigPeer
from gossip.delegate import StateTransfer
from gossip.dissemination import Dissemination
from gossip.effects import EventKind, Purpose, StartPushPull
from gossip.latency import Latency
from gossip.member import Status, packed_records
from gossip.state import StateRules, alive_of
from gossip.table import MemberTable
from gossip.wire import (
    Ack,
    Address,
    ConfigPull,
    Dead,
    DecodeError,
    Message,
    Ping,
    PushPull,
    StateReply,
    StateRequest,
    Suspect,
    decode_stream,
    encode_push_pull_stream,
    encode_stream,
    format_addr,
)

#: Settling push-pulls after one join at most (see Sync's settle state).
#: An agent that joins early in a burst hears news in lulls for as long as the
#: burst lasts, and each settle that brings news spends one, so the cap must
#: outlast the burst (docs/membership.md, "Settling after a join").
SETTLE_MAX = 8


class Refusal(StrEnum):
    """Why a push-pull was refused, as the wire carries it beside the sentence for people."""

    #: The initiator is this agent itself (a seed list that names us): not a failure.
    SELF = "self"
    #: Our name, claimed by another agent.
    NAME_TAKEN = "name_taken"
    #: The initiator's name is alive elsewhere under this name.
    NAME_ALIVE = "name_alive"


class _JoinLoop:
    # A plain class, not a dataclass: built at every start, never compared or printed (gossip.frozen).
    __slots__ = ("seeds", "next_at", "attempt", "in_flight", "done", "last_error", "all_refused")

    def __init__(self, seeds: list[Address], next_at: float) -> None:
        self.seeds = seeds
        self.next_at = next_at
        self.attempt = 0
        self.in_flight = 0
        self.done = False
        self.last_error = ""
        #: Whether every seed of the current attempt refused the connection so far.
        self.all_refused = True


class Sync:
    def __init__(self, table: MemberTable, dissemination: Dissemination, rules: StateRules, latency: Latency,
                 transfer: StateTransfer, now: float) -> None:
        self.table = table
        self.config = config = table.config
        self.dissemination = dissemination
        self.rules = rules
        self.latency = latency
        self.transfer = transfer
        self._name = table.name
        self._members = table.members
        self._rng = table.rng
        self._stats = table.counters.stats
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
        #: Peers we asked for a full push-pull after a lite one, until when not to ask again.
        self._full_sync_after: dict[Address, float] = {}
        #: Seeds a join could not reach: retried with the dead (a seed down at our
        #: start may be the only way to the rest of a cluster that was split).
        self._failed_seeds: set[Address] = set()
        #: The node's config entries (gossip.config_sync), if it takes them: their digest rides
        #: in every push-pull, and a peer's pull is answered from them.
        self.config_peer: ConfigPeer | None = None
        self._next_push_pull = now + self._rng.uniform(0.5, 1.0) * config.push_pull_interval
        self._next_reconnect = now + self._rng.uniform(0.5, 1.0) * config.reconnect_interval

    # -- timers --------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """The periodic push-pull and reconnect, and the join's seed loop."""
        if now >= self._next_push_pull:
            self._next_push_pull = now + self.config.push_pull_scaled(self.table.num_up())
            self._sync_with_random_peer()
        if now >= self._next_reconnect:
            self._start_reconnect(now)
        self._tick_join(now)

    def tick_settle(self, now: float) -> None:
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
                self._stats["settle_syncs"] += 1

    def next_deadline(self) -> float:
        t = self._next_push_pull
        if self._next_reconnect < t:
            t = self._next_reconnect
        if self._settle_pending:
            due = self._settle_due()
            if due < t:
                t = due
        j = self._join
        if j is not None and not j.done and j.in_flight == 0 and j.next_at < t:
            t = j.next_at
        return t

    def stagger(self, now: float, phase: float) -> None:
        """Put the next periodic push-pull ``phase`` (0..1) of a scaled interval from now."""
        self._next_push_pull = now + phase * self.config.push_pull_scaled(self.table.num_up())

    def _settle_due(self) -> float:
        done = SETTLE_MAX - self._settle_left
        return self.table.last_news + self.config.settle_quiet() * 2.0 ** done

    def _sync_with_random_peer(self, purpose: Purpose = Purpose.SYNC, avoid: Address | None = None,
                               prefer: Address | None = None) -> Address | None:
        """A push-pull with ``prefer`` if it is an alive member, else with a random alive
        member (other than ``avoid`` if there is another): its address, or None if there is none."""
        peers = [m for m in self._members.values() if m.status is Status.ALIVE and m.name != self._name]
        if not peers or self.table.leaving:
            return None
        if prefer is not None and any(m.addr == prefer for m in peers):
            target = prefer
        else:
            if avoid is not None:
                peers = [m for m in peers if m.addr != avoid] or peers
            target = self._rng.choice(peers).addr
        self.table.outbox.append(StartPushPull(target, purpose))
        return target

    def _start_reconnect(self, now: float) -> None:
        # memberlist leaves this to Serf's reconnect loop; without it a partition
        # longer than the suspicion timeout never heals by itself.  Members that
        # left gracefully are not retried.
        self._next_reconnect = now + self.config.reconnect_interval
        targets = [m.addr for m in self._members.values()
                   if m.status is Status.DEAD and now - m.status_since < self.config.reconnect_timeout]
        if self._failed_seeds and (self._join is None or self._join.done):  # the join loop retries its own
            up = {m.addr for m in self._members.values() if m.status.up}
            self._failed_seeds -= up
            targets += sorted(self._failed_seeds)
        if targets and not self.table.leaving:
            self._stats["reconnect_attempts"] += 1
            self.table.outbox.append(StartPushPull(self._rng.choice(targets), Purpose.RECONNECT))

    # -- joining -------------------------------------------------------------------------

    def join(self, now: float, seeds: list[Address]) -> None:
        """Keep trying to push-pull with the seeds, with backoff, until one answers."""
        seeds = [s for s in seeds if s != self.table.addr]  # a seed list shared by all agents names this one too
        if seeds:
            self._join = _JoinLoop(list(seeds), next_at=now)
            self._tick_join(now)

    @property
    def joined(self) -> bool:
        return self._join is None or self._join.done

    @property
    def join_error(self) -> str:
        return self._join.last_error if self._join else ""

    def _tick_join(self, now: float) -> None:
        j = self._join
        if j is None or j.done or j.in_flight or now < j.next_at:
            return
        j.attempt += 1
        j.in_flight = len(j.seeds)
        j.all_refused = True
        for seed in j.seeds:
            self.table.outbox.append(StartPushPull(seed, Purpose.JOIN))

    # -- the exchange --------------------------------------------------------------------

    def payload(self, join: bool, lite: bool = False) -> bytes:
        """Our side of a push-pull (Membership.push_pull_payload)."""
        lite = lite and self.rules.signer is not None
        return encode_push_pull_stream(PushPull(self._name, join, [], delegate=self.transfer.dump(),
                                                coords=self.latency.to_send(everyone=False), lite=lite,
                                                fresh=self.dissemination.fresh(), config=self._config_digest()),
                                       packed_records(self._members.values(), lite))

    def _config_digest(self) -> bytes | None:
        return None if self.config_peer is None else self.config_peer.digest()

    def handle_streams(self, now: float, requests: list[tuple[Address, bytes]]) -> list[bytes | None]:
        """Answer TCP requests that arrived together, in order (Membership.handle_streams)."""
        replies: list[bytes | None] = [None] * len(requests)
        merged: list[tuple[int, PushPull]] = []
        stats = self._stats
        for i, (src, data) in enumerate(requests):
            msg = self._decode_one(data, (StateRequest, PushPull, Ping, ConfigPull))
            if msg is None:
                continue
            if isinstance(msg, ConfigPull):
                if self.config_peer is None:
                    self.table.drop("unexpected_type")
                    continue
                stats["config_pulls_in"] += 1
                replies[i] = encode_stream([self.config_peer.answer(msg, src)])
                continue
            if isinstance(msg, Ping):
                if msg.target != self._name:
                    self.table.drop("wrong_node")
                    continue
                stats["tcp_pings_in"] += 1
                replies[i] = encode_stream([Ack(msg.seq, self._name)])
                continue
            if isinstance(msg, StateRequest):
                held = self.transfer.encode_node(msg.node)
                stats["state_requests_in"] += 1
                replies[i] = encode_stream([StateReply(msg.node, held)])
                continue
            assert isinstance(msg, PushPull)
            remote = msg
            refusal = self._refusal(remote)
            if refusal is not None:
                code, refused = refusal
                if code is Refusal.SELF:
                    stats["push_pull_self"] += 1
                else:
                    self.table.event(EventKind.JOIN_REFUSED, peer=remote.source, addr=format_addr(src),
                                     reason=refused)
                    stats["push_pull_refused"] += 1
                replies[i] = encode_push_pull_stream(
                    PushPull(self._name, False, [], refused, b"", {}, False, (), code),
                    packed_records(self._members.values(), False))
                continue
            stats["push_pull_in"] += 1
            self._merge(now, remote)
            self._merge_delegate(remote.delegate)
            if self.config_peer is not None:
                self.config_peer.observed(remote.source, src, remote.config)
            merged.append((i, remote))
        answers: dict[tuple[bool, bool], bytes] = {}
        for i, remote in merged:
            lite = remote.lite and self.rules.signer is not None
            kind = (lite, remote.join)
            answer = answers.get(kind)
            if answer is None:
                # A joiner gets every coordinate we hold; its own, if there, it ignores.
                answer = answers[kind] = encode_push_pull_stream(
                    PushPull(self._name, False, [], "", self.transfer.dump(),
                             self.latency.to_send(everyone=remote.join), lite, self.dissemination.fresh(),
                             config=self._config_digest()),
                    packed_records(self._members.values(), lite))
            replies[i] = answer
        return replies

    def complete(self, now: float, target: Address, purpose: Purpose, reply: bytes | None,
                 error: str = "", refused: bool = False) -> tuple[bool, str]:
        """We were the initiator: merge the reply (or note the failure); ``refused``: the target's
        host refused the connection (nothing listens there)."""
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
                self.table.event(EventKind.JOIN_REFUSED_BY_PEER, peer=remote.source, reason=remote.refused)
            else:
                news = self.table.news
                self.rules.replaced_at_address(now, target, remote)
                self._merge(now, remote)
                self._merge_delegate(remote.delegate)
                if self.config_peer is not None:
                    self.config_peer.observed(remote.source, target, remote.config)
                self._stats["push_pull_out"] += 1
                ok, reason = True, ""
                if purpose is Purpose.SETTLE and self._settle_left > 0:
                    if self.table.news != news:
                        self._settle_pending = True  # the burst was still spreading: settle again
                        self._settle_confirmed = False
                    elif not self._settle_confirmed:
                        # Nothing new, but the peer may have lagged as we did (a member that
                        # joined last reaches most of the cluster at about the same moment):
                        # one more settle, a doubled quiet from now, with another peer.
                        self._settle_pending = True
                        self._settle_confirmed = True
                        self.table.last_news = now
                if purpose in (Purpose.JOIN, Purpose.EXPLICIT):
                    self._settle_pending = True
                    self._settle_seed = target
                    self._settle_left = SETTLE_MAX
                    self._settle_confirmed = False
                    self.table.last_news = now
                    # Announce ourselves to the members we just learned about
                    # now, rather than at the next gossip tick.
                    self.dissemination.gossip_now(now)
                    self.rules.announce_joined(target)
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
                j.next_at = now + self.config.join_retry_min * self._rng.uniform(0.8, 1.2)
            return False, reason
        if purpose is Purpose.JOIN and j is not None and not j.done:
            j.in_flight = max(0, j.in_flight - 1)
            if ok:
                j.done = True
                j.last_error = ""
            else:
                j.last_error = f"{format_addr(target)}: {reason}"
                j.all_refused = j.all_refused and refused and reply is None
                if j.in_flight == 0:
                    # Seeds that all refused are most often agents started with this one (a
                    # rollout, a compose file, a boot) that do not listen yet: they are asked
                    # again after a gossip round, backing off from there, not from the retry
                    # interval, which would leave this agent out of the cluster for a second.
                    first = self.config.gossip_interval if j.all_refused else self.config.join_retry_min
                    backoff = min(self.config.join_retry_max, first * 2 ** min(j.attempt - 1, 16))
                    j.next_at = now + backoff * self._rng.uniform(0.8, 1.2)
                    self.table.event(EventKind.JOIN_RETRY, seeds=[format_addr(s) for s in j.seeds],
                                     error=j.last_error, retry_in=round(j.next_at - now, 2))
        elif ok and j is not None:
            j.done = True  # an explicit join succeeded: the seed loop can stop
        return ok, reason

    def _merge_delegate(self, data: bytes) -> None:
        if self.transfer.merge_dump(data):
            self.rules.state_changed()  # a restart may have made us move our version on

    def _decode_one(self, data: bytes, kinds: tuple[type[Message], ...]) -> Message | None:
        """A stream payload holding exactly one message of ``kinds``; else None, drop counted."""
        try:
            msgs = decode_stream(data)
        except DecodeError as exc:
            self.table.drop(exc.reason)
            return None
        if len(msgs) != 1 or not isinstance(msgs[0], kinds):
            self.table.drop("unexpected_type")
            return None
        return msgs[0]

    def _decode_push_pull(self, data: bytes) -> PushPull | None:
        msg = self._decode_one(data, (PushPull,))
        return msg if isinstance(msg, PushPull) else None

    def _refusal(self, remote: PushPull) -> tuple[Refusal, str] | None:
        """Why we refuse ``remote``'s push-pull (a code and a sentence), or None."""
        table = self.table
        if remote.source == self._name:
            own = next((r for r in remote.members if r.name == remote.source), None)
            if own is not None and (own.addr == table.addr or (
                    own.identity is not None and own.identity == table.me.identity)):
                return Refusal.SELF, "that is this agent itself"
            return (Refusal.NAME_TAKEN,
                    f"name {self._name!r} is already taken by the agent at {format_addr(table.addr)}")
        own = next((r for r in remote.members if r.name == remote.source), None)
        existing = self._members.get(remote.source)
        if own is not None and existing is not None and existing.status.up and existing.addr != own.addr:
            if existing.identity is not None and own.identity == existing.identity and own.sig is not None and (
                    self.rules.signature_ok(alive_of(own))):
                return None  # the same key: the member itself, restarted at a new address
            return Refusal.NAME_ALIVE, f"name {remote.source!r} is already alive at {format_addr(existing.addr)}"
        return None

    def _merge(self, now: float, remote: PushPull) -> None:
        # memberlist mergeState: a remote "dead" only makes us suspect, so one
        # node's stale view cannot kill a member we can still reach.
        news = False
        members = self._members
        me = self._name
        rules = self.rules
        fresh = set(remote.fresh)
        for r in remote.members:
            held = members.get(r.name)
            if held is not None and r.name != me and (
                    (r.status == "alive" and r.addr == held.addr and r.incarnation <= held.incarnation
                     and (r.identity is None or r.identity == held.identity))
                    or (r.status != "alive" and r.incarnation < held.incarnation)):
                # Nothing this record can change (an alive needs a higher incarnation or,
                # for a departed member, a new address or a new key; an accusation a current
                # incarnation): most of a push-pull, skipped cheaply.
                continue
            if r.status == "alive":
                if remote.lite and r.name != me:
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
                rules.on_alive(now, alive_of(r), spread_new=r.name == remote.source or r.name in fresh)
            else:
                if held is not None and r.name != me and r.incarnation > held.incarnation:
                    # The peer holds a later incarnation than ours, accused.  Its record carries
                    # the member's own signed alive for it: learn that first, so the accusation
                    # is within what the member announced.  A lite record carries no signature:
                    # ask for the full exchange instead.
                    if remote.lite:
                        news = True
                        continue
                    rules.learn_announced(held, r)
                if r.status == "left":
                    rules.on_dead(now, Dead(r.name, r.incarnation, r.name))
                else:
                    rules.on_suspect(now, Suspect(r.name, r.incarnation, remote.source))
        if news:
            own = next((r for r in remote.members if r.name == remote.source), None)
            if own is not None:
                self._ask_full_sync(now, own.addr)
        self.latency.merge(remote.source, remote.coords)

    def _ask_full_sync(self, now: float, addr: Address) -> None:
        """A lite push-pull showed news we cannot check: fetch it signed, once per interval per peer."""
        if self._full_sync_after.get(addr, 0.0) > now:
            return
        if len(self._full_sync_after) > 1024:
            self._full_sync_after = {a: t for a, t in self._full_sync_after.items() if t > now}
        self._full_sync_after[addr] = now + self.config.push_pull_interval
        self._stats["full_syncs_asked"] += 1
        self.table.outbox.append(StartPushPull(addr, Purpose.FULL))
