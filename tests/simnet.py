"""A tiny deterministic network and virtual clock for driving Membership machines.

Time only moves when :meth:`SimNet.run` jumps it to the next thing that has to
happen: a datagram arriving or some node's ``next_deadline()``.  Every source of
randomness is a ``random.Random`` seeded from the net's seed (one per node, one
for the network), so a scenario replays identically.

Failure injection: per-packet ``loss``; ``block(src, dst)`` for one-way link
failures; ``partition(*groups)``; ``crash`` (the process is gone until
``restart``); ``pause``/``resume`` (a frozen process: it neither ticks nor
receives, and datagrams sent to it meanwhile are lost).

Two invariants are checked on every step, so every scenario checks them too:
no datagram exceeds ``udp_packet_size - SEAL_OVERHEAD`` and decodes cleanly,
and ``tick(now)`` always moves a machine's ``next_deadline()`` past ``now``.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gossip.config import LOCAL, GossipConfig
from gossip.keyring import SEAL_OVERHEAD
from gossip.swim import Delegate, Event, FetchState, Membership, SendPacket, StartPushPull, TcpProbe
from gossip.wire import Address, decode_packet

PORT = 7946


@dataclass
class Node:
    name: str
    addr: Address
    m: Membership
    state: str = "up"  # "up", "paused" or "crashed"
    generation: int = 0
    #: m.next_deadline() as of the last call into m (it changes only then).
    deadline: float = 0.0

    @property
    def up(self) -> bool:
        return self.state == "up"


@dataclass(order=True)
class _Pending:
    at: float
    seq: int
    # Not part of the ordering: (at, seq) is unique.
    action: Callable[[], None] = field(compare=False)


class SimNet:
    def __init__(
        self,
        config: GossipConfig = LOCAL,
        *,
        seed: int = 0,
        loss: float = 0.0,
        latency: float = 0.002,
        jitter: float = 0.001,
    ) -> None:
        self.config = config
        self.seed = seed
        self.loss = loss
        self.latency = latency
        self.jitter = jitter
        self.now = 0.0
        self.rng = random.Random(f"net:{seed}")
        self.nodes: dict[str, Node] = {}
        self._by_addr: dict[Address, Node] = {}
        self._blocked: set[tuple[str, str]] = set()
        self._pending: list[_Pending] = []
        self._seq = 0
        #: (time, observer, event) for every event any machine emitted.
        self.events: list[tuple[float, str, Event]] = []
        self.packets_sent = 0
        self.packets_lost = 0
        self.max_payload = 0
        self.payload_limit = config.udp_packet_size - SEAL_OVERHEAD

    # -- building a cluster -------------------------------------------------------

    def add(
        self,
        name: str,
        *,
        seeds: Iterable[str] = (),
        tags: dict[str, str] | None = None,
        addr: Address | None = None,
        delegate: Delegate | None = None,
    ) -> Node:
        """Start a node now; it joins through the named seeds, if any."""
        if addr is None:
            addr = (f"10.0.{len(self.nodes) // 250}.{len(self.nodes) % 250 + 1}", PORT)
        node = Node(name, addr, self._machine(name, addr, tags, 0, delegate))
        self.nodes[name] = node
        self._by_addr[addr] = node
        self._flush(node)
        self.join(name, seeds)
        return node

    def cluster(self, n: int, prefix: str = "n") -> list[Node]:
        """n nodes, all joining through the first one."""
        first = self.add(f"{prefix}0")
        return [first] + [self.add(f"{prefix}{i}", seeds=[first.name]) for i in range(1, n)]

    def join(self, name: str, seeds: Iterable[str]) -> None:
        node = self.nodes[name]
        seed_addrs = [self.nodes[s].addr for s in seeds]
        if seed_addrs:
            node.m.join(self.now, seed_addrs)
            self._flush(node)

    def _machine(self, name: str, addr: Address, tags: dict[str, str] | None, gen: int,
                 delegate: Delegate | None = None) -> Membership:
        rng = random.Random(f"node:{self.seed}:{name}:{gen}")
        return Membership(name, addr, self.config, tags=tags, rng=rng, now=self.now, delegate=delegate)

    def leave(self, name: str) -> None:
        node = self.nodes[name]
        node.m.leave(self.now)
        self._flush(node)

    # -- failures -----------------------------------------------------------------

    def crash(self, name: str) -> None:
        self.nodes[name].state = "crashed"

    def pause(self, name: str) -> None:
        self.nodes[name].state = "paused"

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        assert node.state == "paused", f"{name} is {node.state}"
        node.state = "up"

    def restart(self, name: str, seeds: Iterable[str] = (), tags: dict[str, str] | None = None) -> Node:
        """A fresh process with the same name and address (incarnation 0)."""
        node = self.nodes[name]
        node.generation += 1
        node.m = self._machine(name, node.addr, tags, node.generation)
        node.state = "up"
        self._flush(node)
        self.join(name, seeds)
        return node

    def block(self, src: str, dst: str) -> None:
        """Datagrams and streams from src to dst are lost (one direction)."""
        self._blocked.add((src, dst))

    def unblock(self, src: str, dst: str) -> None:
        self._blocked.discard((src, dst))

    def partition(self, *groups: Iterable[str]) -> None:
        sets = [set(g) for g in groups]
        for a in self.nodes:
            for b in self.nodes:
                if a != b and not any(a in g and b in g for g in sets):
                    self._blocked.add((a, b))

    def heal(self) -> None:
        self._blocked.clear()

    # -- observation ----------------------------------------------------------------

    def status(self, observer: str, subject: str) -> str | None:
        m = self.nodes[observer].m.members.get(subject)
        return None if m is None else m.status.value

    def incarnation(self, observer: str, subject: str) -> int | None:
        m = self.nodes[observer].m.members.get(subject)
        return None if m is None else m.incarnation

    def up_names(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.up]

    def all_see(self, subject: str, status: str, observers: Iterable[str] | None = None) -> bool:
        obs = [o for o in (observers if observers is not None else self.up_names()) if o != subject]
        return all(self.status(o, subject) == status for o in obs)

    def converged(self, names: Iterable[str] | None = None) -> bool:
        """Every named (default: running) node sees exactly those nodes, all alive."""
        group = sorted(names if names is not None else self.up_names())
        for o in group:
            view = self.nodes[o].m.members
            if sorted(n for n, m in view.items() if m.status.value == "alive") != group:
                return False
        return True

    def member_events(self, status: str | None = None) -> list[tuple[float, str, dict[str, object]]]:
        """(time, observer, fields) of every member status change, optionally filtered."""
        return [
            (t, o, e.fields) for t, o, e in self.events
            if e.kind == "member" and (status is None or e.fields["status"] == status)
        ]

    # -- running ----------------------------------------------------------------------

    def run(self, duration: float) -> None:
        self.run_until(lambda: False, duration)

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Advance until predicate() holds (True) or timeout virtual seconds pass (False)."""
        end = self.now + timeout
        while True:
            if predicate():
                return True
            nxt = self._next_time()
            if nxt > end:
                self.now = end
                return predicate()
            self.now = max(self.now, nxt)
            self._step()

    def _next_time(self) -> float:
        times = [n.deadline for n in self.nodes.values() if n.up]
        if self._pending:
            times.append(self._pending[0].at)
        return min(times, default=float("inf"))

    def _step(self) -> None:
        now = self.now
        while self._pending and self._pending[0].at <= now:
            heapq.heappop(self._pending).action()
        for node in list(self.nodes.values()):
            if node.up and node.deadline <= now:
                node.m.tick(now)
                self._flush(node)
                assert node.deadline > now, f"{node.name}: tick({now}) left a deadline due"

    def _schedule(self, at: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._pending, _Pending(at, self._seq, action))

    def _delay(self) -> float:
        return self.latency + self.rng.uniform(0, self.jitter)

    def _flush(self, node: Node) -> None:
        """Collect what node.m asked for; called after every call into a machine."""
        node.deadline = node.m.next_deadline()
        effects, events = node.m.drain()
        self.events.extend((self.now, node.name, e) for e in events)
        for eff in effects:
            if isinstance(eff, SendPacket):
                self._send(node, eff)
            elif isinstance(eff, StartPushPull):
                self._schedule(self.now + self._delay(), self._push_pull_action(node, node.m, eff))
            elif isinstance(eff, FetchState):
                self._schedule(self.now + self._delay(), self._fetch_action(node, node.m, eff))
            elif isinstance(eff, TcpProbe):
                self._schedule(self.now + 2 * self._delay(), self._tcp_probe_action(node, node.m, eff))
            else:  # pragma: no cover - a new effect type the harness does not know
                raise AssertionError(f"unknown effect {eff!r}")

    def _send(self, node: Node, eff: SendPacket) -> None:
        payload = eff.payload
        assert len(payload) <= self.payload_limit, f"{len(payload)} byte datagram from {node.name}"
        decode_packet(payload)  # a machine never sends what it could not read
        self.max_payload = max(self.max_payload, len(payload))
        self.packets_sent += 1
        dst = self._by_addr.get(eff.addr)
        lost = self.rng.random() < self.loss  # drawn for every packet: keeps replays aligned
        if dst is None or lost or (node.name, dst.name) in self._blocked:
            self.packets_lost += 1
            return
        src_addr = node.addr

        def deliver() -> None:
            if dst.up:
                dst.m.receive(self.now, src_addr, payload)
                self._flush(dst)

        self._schedule(self.now + self._delay(), deliver)

    def _tcp_probe_action(self, node: Node, machine: Membership, eff: TcpProbe) -> Callable[[], None]:
        """TCP retransmits what loss takes, so only a block or a node that is down stops it."""
        def action() -> None:
            if node.m is not machine or not node.up:
                return
            target = self._by_addr.get(eff.addr)
            if target is None or not target.up or {(node.name, target.name), (target.name, node.name)} & self._blocked:
                return  # a connection needs both directions
            reply = target.m.handle_stream(self.now, node.addr, eff.payload)
            self._flush(target)
            machine.complete_tcp_probe(self.now, eff.seq, reply)
            self._flush(node)

        return action

    def _fetch_action(self, node: Node, machine: Membership, eff: FetchState) -> Callable[[], None]:
        def action() -> None:
            if node.m is not machine or not node.up:
                return
            target = self._by_addr.get(eff.addr)
            reply: bytes | None = None
            if target is not None and target.up and (node.name, target.name) not in self._blocked:
                reply = target.m.handle_stream(self.now, node.addr, machine.state_request_payload(eff.node))
                self._flush(target)
            machine.complete_fetch(self.now, eff.node, reply)
            self._flush(node)

        return action

    def _push_pull_action(self, node: Node, machine: Membership, eff: StartPushPull) -> Callable[[], None]:
        def action() -> None:
            if node.m is not machine or not node.up:
                return  # the initiator died or was restarted meanwhile
            target = self._by_addr.get(eff.target)
            reply: bytes | None = None
            error = "connection refused"
            if (
                target is not None
                and target.up
                and (node.name, target.name) not in self._blocked
                and (target.name, node.name) not in self._blocked
            ):
                request = machine.push_pull_payload(eff.purpose == "join", lite=eff.purpose == "sync")
                reply = target.m.handle_stream(self.now, node.addr, request)
                self._flush(target)
                error = "" if reply is not None else "stream closed"
            machine.complete_push_pull(self.now, eff.target, eff.purpose, reply, error)
            self._flush(node)

        return action
