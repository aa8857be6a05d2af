"""What the membership machines hand their driver: effects to perform, events to log, counters to show.

The machines never touch a socket or a clock.  Each input may leave effects
(a datagram to send, a TCP exchange to run) and events (something worth a log
line) behind, which the driver takes with ``Membership.drain()``; counters are
read whenever the driver wants them (``mesh-agent info``, ``/metrics``).
"""

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from gossip.frozen import same_class_equality
from gossip.wire import Address

#: Upper bounds (seconds) of the probe RTT histogram: loopback to intercontinental.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@same_class_equality
class SendPacket(NamedTuple):
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
    #: Who holds a member's address now (StateRules.verify_address).
    VERIFY = "verify"
    #: A join whose seed turned out to be this agent itself (never sent; counted off the join).
    SELF = "self"


@same_class_equality
class StartPushPull(NamedTuple):
    """Open TCP to ``target``, send ``push_pull_payload()``, read the reply, and
    report back with ``complete_push_pull``.  ``target`` may hold a host name
    (a seed), which the driver resolves at each attempt."""

    target: Address
    purpose: Purpose


@same_class_equality
class FetchState(NamedTuple):
    """Ask ``addr`` over TCP for ``node``'s full state (``state_request_payload``)
    and hand the reply to ``complete_fetch``."""

    node: str
    addr: Address


@same_class_equality
class TcpProbe(NamedTuple):
    """memberlist's fallback ping: send ``payload`` (a Ping) over TCP to ``addr``
    and report the reply (an Ack) with ``complete_tcp_probe(seq, reply)`` before
    ``deadline``.  A member whose UDP is blocked by a firewall stays alive this
    way, and is reported as such instead of flapping."""

    addr: Address
    seq: int
    payload: bytes
    deadline: float


Effect = SendPacket | StartPushPull | FetchState | TcpProbe


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


@same_class_equality
class Event(NamedTuple):
    """Something worth a log line: ``kind`` is the event name, ``fields`` its data."""

    kind: EventKind
    fields: dict[str, Any]


@dataclass
class Counters:
    drops: Counter[str] = field(default_factory=Counter)
    stats: Counter[str] = field(default_factory=Counter)
    #: Direct-probe round trips: counts per RTT_BUCKETS bound (the last: above
    #: them all) and their sum, in seconds -- a Prometheus histogram's parts.
    rtt_buckets: list[int] = field(default_factory=lambda: [0] * (len(RTT_BUCKETS) + 1))
    rtt_sum: float = 0.0
