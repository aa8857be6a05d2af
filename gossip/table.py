"""The member table every membership component works over, and what they share besides it.

SWIM's components (failure detection, dissemination, anti-entropy, queries)
all read and change one list of members; this module holds it, with the
bookkeeping that must stay consistent whoever changes a member: the count of
members up (asked for every datagram sent), the status-change events, what
happens when a member comes or goes, and where effects and events collect for
the driver.  Components keep their own state beside it and hear of a member's
arrival or removal through ``on_admit`` and ``on_forget``.

Records shared between tables: the simulator runs thousands of machines that
start out knowing each other, and one record per member per machine would
not fit in memory.  It gives every table the same records (``share``, built
with ``shared_record``); a table copies a record before its first change to it
(``own``), so sharing never shows in what any machine sees.  A real agent's
records are never shared.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping
from typing import Any

from gossip.awareness import Awareness
from gossip.config import GossipConfig
from gossip.effects import Counters, Effect, Event, EventKind
from gossip.member import MEMBER_CHANGES, Member, Status
from gossip.wire import Address, format_addr


def shared_record(name: str, addr: Address, status_since: float, tags: dict[str, str]) -> Member:
    """An alive member's record at incarnation 0 for many tables to share (``MemberTable.share``).

    Built without Member's counting ``__setattr__``: the simulator builds one
    per member of a converged cluster, and the count only matters for records
    a machine changes, which it copies first.  ``tags`` is shared too, and must
    not be changed.
    """
    rec = Member.__new__(Member)
    vars(rec).update({"name": name, "addr": addr, "incarnation": 0, "status": Status.ALIVE, "tags": tags,
                      "status_since": status_since, "rtt": None, "state": None, "tunnel": None,
                      "identity": None, "sig": None, "shared": True})
    return rec


class MemberTable:
    def __init__(self, me: Member, config: GossipConfig, rng: random.Random, now: float) -> None:
        self.name = me.name
        self.addr = me.addr
        self.config = config
        self.rng = rng
        self.me = me
        #: Every member we know, us included; the same dict for the table's life.
        self.members: dict[str, Member] = {me.name: me}
        self.counters = Counters()
        #: Lifeguard's local health: failed probes, missed nacks and refutations all say we may be the slow one.
        self.awareness = Awareness(config.awareness_max_multiplier if config.lifeguard else 1)
        #: What the driver must do and log, until it drains them (Membership.drain takes the lists).
        self.outbox: list[Effect] = []
        self.events: list[Event] = []
        #: The protocol time of the input being handled.
        self.now = now
        #: Set by a graceful leave: we stop probing, refuting and syncing.
        self.leaving = False
        #: New members learned so far, and when the last came (a settle compares them).
        self.news = 0
        self.last_news = 0.0
        self._seq = rng.randrange(1 << 30)
        #: (member-table size it was counted at, members up): kept current by
        #: set_status; recounted only when the table's size changes.
        self._up_count: tuple[int, int] | None = None
        #: Member names for random choice (kRandomNodes); rebuilt when members come or go.
        self._names: list[str] | None = None
        self._admit_hooks: list[Callable[[str], None]] = []
        self._forget_hooks: list[Callable[[str], None]] = []
        self.reap_every = max(1.0, min(60.0, config.dead_reap_after / 10))
        self.next_reap = now + self.reap_every

    def on_admit(self, hook: Callable[[str], None]) -> None:
        """hook(name) whenever a member new to the table is admitted."""
        self._admit_hooks.append(hook)

    def on_forget(self, hook: Callable[[str], None]) -> None:
        """hook(name) whenever a member is removed: drop whatever is held about it."""
        self._forget_hooks.append(hook)

    # -- outputs -------------------------------------------------------------------------

    def event(self, kind: EventKind, **fields: Any) -> None:
        self.events.append(Event(kind, fields))

    def drop(self, reason: str) -> None:
        """Count a packet or stream dropped for ``reason`` (visible in info)."""
        self.counters.drops[reason] += 1

    def next_seq(self) -> int:
        """A sequence number for a probe, a relayed ping or a query: one counter for all."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        return self._seq

    # -- the members ---------------------------------------------------------------------

    def num_up(self) -> int:
        # Every packet sent asks this (retransmit limit).  Status changes adjust
        # it (set_status); a change of the member set recounts.  The count is
        # per machine: one shared by all (a class-wide version) would make each
        # of a simulated cluster's status changes cost every machine a recount.
        size = len(self.members)
        if self._up_count is None or self._up_count[0] != size:
            self._up_count = (size, sum(1 for m in self.members.values() if m.status.up))
        return self._up_count[1]

    def names(self) -> list[str]:
        """Every member's name, for random choice; the same list until members come or go."""
        names = self._names
        if names is None or len(names) != len(self.members):
            names = self._names = list(self.members)
        return names

    def admit(self, now: float, m: Member) -> None:
        """Add a member new to us; its arrival is news (a settle after a join waits for news to stop)."""
        self.members[m.name] = m
        self._names = None
        if self._up_count is not None and self._up_count[0] == len(self.members) - 1:
            self._up_count = (len(self.members), self._up_count[1] + m.status.up)  # no recount per join
        for hook in self._admit_hooks:
            hook(m.name)
        self.last_news = now
        self.news += 1

    def forget(self, name: str) -> None:
        """Remove a member and everything held about it."""
        m = self.members.pop(name)
        self._names = None
        if self._up_count is not None and self._up_count[0] == len(self.members) + 1:
            self._up_count = (len(self.members), self._up_count[1] - m.status.up)  # no recount
        for hook in self._forget_hooks:
            hook(name)

    def reap(self, now: float) -> None:
        """Forget members down longer than ``dead_reap_after``: kept until then so that a
        late claim about them is recognised as old, and a return as a return."""
        self.next_reap = now + self.reap_every
        for name, m in list(self.members.items()):
            if not m.status.up and name != self.name and now - m.status_since >= self.config.dead_reap_after:
                self.forget(name)
                self.event(EventKind.MEMBER_REAPED, name=name, status=m.status.value)

    def own(self, m: Member) -> Member:
        """The record of ``m`` that this table may change: ``m``, or a private copy of a shared record."""
        if not m.shared:
            return m
        mine = copy.copy(m)
        del mine.__dict__["shared"]
        self.members[m.name] = mine
        return mine

    def share(self, records: Mapping[str, Member]) -> None:
        """Take ``records`` (``shared_record``), shared with other tables, for members we hold no record of.

        What this table already holds of its own (us, and members an earlier
        join taught it) stays.
        """
        members = self.members
        known = {k: v for k, v in members.items() if k != self.name} if len(members) > 1 else None
        members.update(records)
        members[self.name] = self.me
        if known:
            members.update(known)

    def set_status(self, now: float, m: Member, status: Status, reason: str) -> None:
        assert not m.shared, "a shared member record must be copied (own) before it changes"
        previous = m.status
        m.status = status
        m.status_since = now
        if previous.up != status.up and self._up_count is not None:
            size, up = self._up_count
            self._up_count = (size, up + (1 if status.up else -1))
        if previous is not status:
            self.event(EventKind.MEMBER, name=m.name, addr=format_addr(m.addr), status=status.value,
                       previous=previous.value, incarnation=m.incarnation, reason=reason)

    # -- views ---------------------------------------------------------------------------

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
