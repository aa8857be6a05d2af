"""A member as this node sees it, and SWIM's precedence between claims about it.

SWIM orders claims by incarnation number, which only the member itself may
raise: a higher incarnation always wins; at equal incarnation, suspect beats
alive and dead/left beat both (SWIM section 4.2, memberlist state.go).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from gossip.wire import Address, NodeState, Tunnel, pack_record


class Status(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"

    @property
    def up(self) -> bool:
        """Alive or suspect: still a member we talk to."""
        return self in _UP


#: A set of members, not ``(Status.ALIVE, Status.SUSPECT)``: looking enum
#: members up on their class is slow, and ``up`` is asked per member per packet.
_UP = frozenset({Status.ALIVE, Status.SUSPECT})
_RANK = {Status.ALIVE: 0, Status.SUSPECT: 1, Status.DEAD: 2, Status.LEFT: 2}


def overrides(new_status: Status, new_inc: int, old_status: Status, old_inc: int) -> bool:
    """Whether a claim (new_status, new_inc) supersedes what we hold.

    This is the rule the message handlers apply case by case; it lives here
    once so that property tests can check them against it.
    """
    if new_inc != old_inc:
        return new_inc > old_inc
    return _RANK[new_status] > _RANK[old_status]


class ChangeCount:
    """Counts writes to any member's fields, in this process.

    Views built from the member table (the API's member list, polled many times
    a second by dashboards and benchmarks) are cached until it moves.  It is an
    object of its own, not a class attribute of Member: writing a class
    attribute invalidates CPython's per-type attribute caches, so every member
    field read after each write would take the slow path, and a join burst
    writes fields constantly (docs/membership.md, "Costs").
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


MEMBER_CHANGES = ChangeCount()


@dataclass
class Member:
    #: True on a record shared between many member tables (gossip.table.shared_record,
    #: the simulator's); a table copies it before changing it (MemberTable.own).  Set per instance.
    shared: ClassVar[bool] = False

    name: str
    addr: Address
    incarnation: int
    status: Status
    tags: dict[str, str] = field(default_factory=dict)
    #: When (protocol clock) the status last changed; drives reaping.
    status_since: float = 0.0
    #: Smoothed round-trip time of direct probes, seconds.
    rtt: float | None = None
    #: The member's application state summary (registry version, digest).
    state: NodeState | None = None
    #: Where its encrypted tunnels listen, and its static tunnel key.
    tunnel: Tunnel | None = None
    #: The Ed25519 key bound to its name, and its signature over the current
    #: alive (relayed as is in push-pull): gossip.signing.
    identity: bytes | None = None
    sig: bytes | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        MEMBER_CHANGES.value += 1
        if name != "rtt":
            # The push-pull encodings of this record (packed_records) are stale.
            d = self.__dict__
            d.pop("wire_full", None)
            d.pop("wire_lite", None)


def packed_records(members: Iterable[Member], lite: bool) -> list[bytes]:
    """Every member's push-pull record, encoded; each is kept on its Member until it changes.

    The encoding lives in the instance ``__dict__`` beside the fields, written
    there directly: the cache is no change of the member, and ``__setattr__``
    drops it on any real one.
    """
    attr = "wire_lite" if lite else "wire_full"
    out = []
    for m in members:
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
            d[attr] = w
        out.append(w)
    return out
