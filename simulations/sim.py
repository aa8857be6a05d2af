"""A scalable, deterministic simulator driving the real ``gossip.swim.Membership`` machines.

Every node is a real :class:`~gossip.swim.Membership`; only the clock and the
network are simulated.  Time is virtual and jumps from one event to the next.
A single heap holds every future event -- datagrams in flight, node deadlines,
TCP push-pull exchanges and scenario actions -- so a step costs O(log E), not
O(N) as a scan of every node's deadline per step would.  Node
deadlines are invalidated lazily: each node remembers the deadline it last
scheduled and a generation number; a popped deadline whose generation is stale
is skipped.

The network model (:class:`NetModel`):

* latency: nodes are placed in a synthetic latency space -- ``regions`` points
  on a plane, a node sits near one of them -- and the one-way delay of a
  datagram is ``base + distance(src, dst) + access(src) + access(dst) +
  uniform(0, jitter)``, so same-region links are sub-millisecond and
  cross-region ones tens of milliseconds;
* loss: every datagram is lost independently with probability ``loss``
  (a draw is made for every datagram, so replays stay aligned);
* partitions: ``partition(groups)`` puts nodes in numbered groups; datagrams
  and streams between groups are dropped (checked at send and at arrival) until
  ``heal()``;
* one-way link failures: ``block(src, dst)`` drops datagrams from src to dst
  (checked at send) and every stream between them, since a connection needs
  both directions, until ``unblock`` or ``heal()``;
* slow nodes: ``pause(name)`` freezes a process (no timers run; datagrams that
  arrive are held in a bounded socket buffer and handled on ``resume``, late);
  ``slow(name, backlog)`` starves it of CPU: its timers fire, but each datagram
  to it waits up to ``backlog`` seconds in its receive queue;
* churn: ``add`` (a real join through seeds), ``crash`` (gone for good, or
  until ``restart``, a new process with a new generation), ``leave``
  (graceful; the process stops after ``leave_propagate_timeout``).

TCP push-pull is modelled as a connection costing one round trip plus a
one-way request and a one-way reply; it is not subject to packet loss (TCP
retransmits) but is cut by partitions and by the peer being down.

Determinism: one ``random.Random`` for the network and one per node, all
seeded from ``seed`` and names; the heap breaks time ties by insertion order.
The same seed therefore gives the same run, event for event.

Invariant checks are off by default, because they cost on every datagram or
timer, and on in the tests: ``check_packets`` (every datagram fits
``udp_packet_size - SEAL_OVERHEAD`` and decodes) and ``check_deadlines``
(``tick(now)`` always moves a machine's ``next_deadline()`` past ``now``; a
machine that broke it would spin at one instant of virtual time).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gossip.config import LAN, GossipConfig
from gossip.delegate import Delegate
from gossip.keyring import SEAL_OVERHEAD
from gossip.member import MEMBER_CHANGES, Status
from gossip.swim import Event, FetchState, Membership, Purpose, SendPacket, StartPushPull, TcpProbe
from gossip.table import shared_record
from gossip.wire import Address, decode_packet

PORT = 7946


@contextlib.contextmanager
def young_gc_only() -> Iterator[None]:
    """Let the cyclic collector sweep only the young generations while a simulation runs.

    Every machine's member table is a dict of N entries, so a full collection
    walks N^2 references: at 2,000 nodes, 39 full collections took 12 of a
    35 s run, and at 10,000 nodes one took longer than the gossip it
    interrupted.  The objects that live long here (tables, records) are freed
    by reference counting when they go; only cyclic garbage that outlives a
    young collection is left for a later full one, outside the run.
    """
    t0, t1, t2 = gc.get_threshold()
    gc.set_threshold(t0, t1, 2**30)
    try:
        yield
    finally:
        gc.set_threshold(t0, t1, t2)

# Heap entry kinds.  An entry is (time, seq, kind, a, b, c).
_TICK = 0  # a: node index, b: generation
_PACKET = 1  # a: dst index, b: src index, c: payload
_PUSH_PULL = 2  # a: initiator index, b: (machine, effect, phase, reply)
_CALL = 3  # a: callable


@dataclass
class NetModel:
    """Parameters of the modelled network (seconds, probabilities)."""

    #: Independent loss probability of every datagram.
    loss: float = 0.0
    #: Number of regions in the latency space.
    regions: int = 3
    #: Regions sit on a circle of this radius (seconds of one-way delay), so
    #: the farthest two are about 2 * radius apart.
    region_radius: float = 0.015
    #: A node sits within this distance of its region's centre.
    node_spread: float = 0.0005
    #: Fixed part of every one-way delay (stack, switch).
    base: float = 0.0001
    #: Per-packet jitter, uniform in [0, jitter].
    jitter: float = 0.0005
    #: How many datagrams a paused node's socket buffer holds.
    pause_buffer: int = 256

    @classmethod
    def uniform(cls, latency: float = 0.002, jitter: float = 0.001, loss: float = 0.0) -> NetModel:
        """Every link alike: one region, every node at its centre.

        For tests of the protocol's rules, whose time bounds should not depend
        on where the latency space happened to put each node.
        """
        return cls(loss=loss, regions=1, node_spread=0.0, base=latency, jitter=jitter)


@dataclass
class SimNode:
    index: int
    name: str
    addr: Address
    m: Membership
    x: float
    y: float
    region: int
    #: "up", "paused", "crashed" or "left".
    state: str = "up"
    group: int = 0
    generation: int = 0
    #: Deadline currently in the heap for this node (+inf if none) and its generation.
    scheduled: float = math.inf
    tick_gen: int = 0
    incarnation_of_process: int = 0
    buffered: list[tuple[int, bytes]] = field(default_factory=list)
    #: CPU starvation: datagrams to this node wait up to this long (uniform) in
    #: its receive queue before they are handled; its timers still run on time.
    slow_in: float = 0.0
    packets_out: int = 0
    bytes_out: int = 0
    stream_bytes_out: int = 0

    @property
    def up(self) -> bool:
        return self.state == "up"


EventHook = Callable[[float, "SimNode", Event], None]


class Sim:
    def __init__(
        self,
        config: GossipConfig = LAN,
        *,
        seed: int = 0,
        net: NetModel | None = None,
        check_packets: bool = False,
        check_deadlines: bool = False,
        keep_events: bool = False,
    ) -> None:
        self.config = config
        self.seed = seed
        self.net = net if net is not None else NetModel()
        self.check_packets = check_packets
        self.check_deadlines = check_deadlines
        self.now = 0.0
        self.rng = random.Random(f"net:{seed}")
        self.nodes: list[SimNode] = []
        self.by_name: dict[str, SimNode] = {}
        self._by_addr: dict[Address, SimNode] = {}
        #: One-way link failures, as (src index, dst index).
        self._blocked: set[tuple[int, int]] = set()
        self._heap: list[tuple[Any, ...]] = []
        self._seq = 0
        self._hooks: list[EventHook] = []
        self._after_call: list[Callable[[SimNode], None]] = []
        #: (time, observer, kind, fields) of every event, when keep_events.
        self.keep_events = keep_events
        self.events: list[tuple[float, str, str, dict[str, Any]]] = []
        self.payload_limit = config.udp_packet_size - SEAL_OVERHEAD
        # Counters.
        self.packets_sent = 0
        self.packets_lost = 0  # random loss
        self.packets_cut = 0  # partition, or nobody at the address
        self.packets_dropped_down = 0  # arrived at a crashed/left node or a full buffer
        self.bytes_sent = 0
        self.stream_bytes = 0
        self.push_pulls = 0
        self.steps = 0
        self.latencies: list[float] | None = None  # set to [] to record every datagram's delay
        self._region_xy = [
            (
                self.net.region_radius * math.cos(2 * math.pi * r / max(1, self.net.regions)),
                self.net.region_radius * math.sin(2 * math.pi * r / max(1, self.net.regions)),
            )
            for r in range(max(1, self.net.regions))
        ]
        self._shared_tags: dict[str, str] = {}
        #: The sender of the datagram being handled (for after_call hooks), else None.
        self.current_src: SimNode | None = None

    # -- building -------------------------------------------------------------------------

    def _place(self) -> tuple[float, float, int]:
        region = self.rng.randrange(len(self._region_xy))
        cx, cy = self._region_xy[region]
        angle = self.rng.uniform(0, 2 * math.pi)
        r = self.net.node_spread * math.sqrt(self.rng.random())
        return cx + r * math.cos(angle), cy + r * math.sin(angle), region

    def _machine(self, name: str, addr: Address, gen: int, tags: dict[str, str] | None,
                 delegate: Delegate | None = None) -> Membership:
        rng = random.Random(f"node:{self.seed}:{name}:{gen}")
        return Membership(name, addr, self.config, tags=tags, rng=rng, now=self.now, delegate=delegate)

    def add(self, name: str, *, seeds: Iterable[str] = (), tags: dict[str, str] | None = None,
            delegate: Delegate | None = None) -> SimNode:
        """Start a node now; it joins through the named seeds (a real push-pull join).

        With a delegate, its state rides on membership and the machine's
        ``FetchState`` requests are served over a modelled TCP stream.
        """
        i = len(self.nodes)
        addr: Address = (f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", PORT)
        x, y, region = self._place()
        node = SimNode(i, name, addr, self._machine(name, addr, 0, tags, delegate), x, y, region)
        self.nodes.append(node)
        self.by_name[name] = node
        self._by_addr[addr] = node
        seed_addrs = [self.by_name[s].addr for s in seeds]
        if seed_addrs:
            node.m.join(self.now, seed_addrs)
        self._flush(node)
        return node

    def converged_cluster(self, n: int, prefix: str = "n") -> list[SimNode]:
        """n nodes that already know each other as alive (a cluster that has been up a while).

        Faster than n real joins (which cost O(n^2) messages), and what most
        scenarios want to start from.  Every machine's table takes the same
        records (``MemberTable.share``) and its broadcast queue is emptied.
        """
        start = len(self.nodes)
        new = [self.add(f"{prefix}{start + i}") for i in range(n)]
        # One record per member, shared by every machine until one of them
        # changes it (MemberTable.own copies it then): n records instead of
        # n^2, which is what lets 10,000 nodes fit in memory.
        shared = {o.name: shared_record(o.name, o.addr, self.now, self._shared_tags) for o in self.nodes}
        stagger = random.Random(f"stagger:{self.seed}:{start}")
        for node in self.nodes:
            node.m.table.share(shared)
            node.m.broadcasts.reset()
            # Up a while: push-pulls spread over the interval for this size (SWIM's
            # anti-entropy at 10,000 nodes comes every 5 minutes, not all at once).
            node.m.stagger_push_pull(self.now, stagger.random())
            self._flush(node)
        MEMBER_CHANGES.bump()  # member views cached by the machines must be rebuilt
        return new

    def join_cluster(self, n: int, prefix: str = "n") -> list[SimNode]:
        """n nodes started now, all joining through the first one by real push-pull joins.

        Unlike :meth:`converged_cluster` this exercises the join path itself,
        at O(n^2) messages: for tests of joining and small clusters.
        """
        first = self.add(f"{prefix}0")
        return [first] + [self.add(f"{prefix}{i}", seeds=[first.name]) for i in range(1, n)]

    def flush(self, node: SimNode) -> None:
        """After a scenario called into ``node``'s machine itself: send what it queued, re-arm its timer."""
        self._flush(node)

    def set_tags(self, name: str, tags: dict[str, str]) -> None:
        """The node changes its tags: a new incarnation of it spreads by gossip."""
        node = self.by_name[name]
        node.m.set_tags(tags)
        self._flush(node)

    # -- failures and churn -------------------------------------------------------------------

    def crash(self, name: str) -> None:
        node = self.by_name[name]
        node.state = "crashed"
        node.buffered.clear()

    def pause(self, name: str) -> None:
        node = self.by_name[name]
        if node.state == "up":
            node.state = "paused"

    def slow(self, name: str, backlog: float) -> None:
        """Starve the node: each datagram to it is handled up to ``backlog`` s late (0: normal again)."""
        self.by_name[name].slow_in = backlog

    def resume(self, name: str) -> None:
        node = self.by_name[name]
        if node.state != "paused":
            return
        node.state = "up"
        held, node.buffered = node.buffered, []
        for src_index, payload in held:
            src = self.nodes[src_index]
            node.m.receive(self.now, src.addr, payload)
        node.scheduled = math.inf  # its heap entry was dropped while paused
        self._flush(node)

    def leave(self, name: str) -> None:
        node = self.by_name[name]
        node.m.leave(self.now)
        self._flush(node)
        self.at(self.now + self.config.leave_propagate_timeout, lambda: self._stop(node))

    def _stop(self, node: SimNode) -> None:
        if node.state in ("up", "paused"):
            node.state = "left"

    def restart(self, name: str, seeds: Iterable[str] = (), tags: dict[str, str] | None = None) -> SimNode:
        """A fresh process (incarnation 0) with the same name and address.

        The new generation seeds a new random stream, so the new process does
        not replay the old one's choices.
        """
        node = self.by_name[name]
        node.generation += 1
        node.m = self._machine(name, node.addr, node.generation, tags)
        node.state = "up"
        node.buffered.clear()
        node.scheduled = math.inf
        seed_addrs = [self.by_name[s].addr for s in seeds]
        if seed_addrs:
            node.m.join(self.now, seed_addrs)
        self._flush(node)
        return node

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the named groups apart; nodes named in no group form one more group."""
        for node in self.nodes:
            node.group = len(groups) + 1
        for g, names in enumerate(groups, start=1):
            for name in names:
                self.by_name[name].group = g

    def block(self, src: str, dst: str) -> None:
        """Datagrams from src to dst are lost (one direction), and so is every stream between them."""
        self._blocked.add((self.by_name[src].index, self.by_name[dst].index))

    def unblock(self, src: str, dst: str) -> None:
        self._blocked.discard((self.by_name[src].index, self.by_name[dst].index))

    def _cut(self, a: SimNode, b: SimNode) -> bool:
        """No connection between a and b: a partition, or a block in either direction."""
        return a.group != b.group or (a.index, b.index) in self._blocked or (b.index, a.index) in self._blocked

    def heal(self) -> None:
        """End every partition and every one-way block."""
        for node in self.nodes:
            node.group = 0
        self._blocked.clear()

    # -- the latency space ------------------------------------------------------------------------

    def base_latency(self, src: SimNode, dst: SimNode) -> float:
        """One-way delay without jitter."""
        return self.net.base + math.hypot(src.x - dst.x, src.y - dst.y)

    def latency_bounds(self, src: SimNode, dst: SimNode) -> tuple[float, float]:
        lo = self.base_latency(src, dst)
        return lo, lo + self.net.jitter

    def _delay(self, src: SimNode, dst: SimNode) -> float:
        return self.net.base + math.hypot(src.x - dst.x, src.y - dst.y) + self.rng.random() * self.net.jitter

    # -- observation ------------------------------------------------------------------------

    def on_event(self, hook: EventHook) -> None:
        """hook(time, observer, event) for every event any machine emits."""
        self._hooks.append(hook)

    def after_call(self, hook: Callable[[SimNode], None]) -> None:
        """hook(node) after every call into node's machine."""
        self._after_call.append(hook)

    def up_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes if n.up]

    def up_names(self) -> list[str]:
        return [n.name for n in self.nodes if n.up]

    def status(self, observer: str, subject: str) -> str | None:
        m = self.by_name[observer].m.members.get(subject)
        return None if m is None else m.status.value

    def incarnation(self, observer: str, subject: str) -> int | None:
        m = self.by_name[observer].m.members.get(subject)
        return None if m is None else m.incarnation

    def all_see(self, subject: str, status: str, observers: Iterable[str] | None = None) -> bool:
        """Every named (default: running) node but the subject sees it with this status.

        O(N): a predicate for small clusters, not for run_until at scale.
        """
        obs = observers if observers is not None else self.up_names()
        return all(self.status(o, subject) == status for o in obs if o != subject)

    def member_events(self, status: str | None = None) -> list[tuple[float, str, dict[str, Any]]]:
        """(time, observer, fields) of every member status change, optionally of one status."""
        assert self.keep_events, "member_events needs Sim(keep_events=True)"
        return [
            (t, o, f) for t, o, kind, f in self.events
            if kind == "member" and (status is None or f["status"] == status)
        ]

    def agree_all_alive(self, names: Iterable[str] | None = None) -> bool:
        """Every named (default: running) node sees exactly those nodes, all alive."""
        group = sorted(names) if names is not None else sorted(n.name for n in self.nodes if n.up)
        want = set(group)
        for o in group:
            view = self.by_name[o].m.members
            alive = {n for n, m in view.items() if m.status is Status.ALIVE}
            if alive != want:
                return False
        return True

    # -- scheduling ------------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run action() at virtual time ``when``."""
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, _CALL, action, None, None))

    def _push(self, when: float, kind: int, a: Any, b: Any, c: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, a, b, c))

    def run(self, duration: float) -> None:
        self.run_until(None, duration)

    def run_until(self, predicate: Callable[[], bool] | None, timeout: float) -> bool:
        """Advance until predicate() holds (True) or ``timeout`` virtual seconds pass (False).

        The predicate is checked after every step; keep it O(1).
        """
        end = self.now + timeout
        if predicate is not None and predicate():
            return True
        with young_gc_only():
            return self._loop(predicate, end)

    def _loop(self, predicate: Callable[[], bool] | None, end: float) -> bool:
        heap = self._heap
        nodes = self.nodes
        pop = heapq.heappop
        check_deadlines = self.check_deadlines
        while heap and heap[0][0] <= end:
            when, _seq, kind, a, b, c = pop(heap)
            if when > self.now:
                self.now = when
            self.steps += 1
            if kind == _TICK:
                node = nodes[a]
                if b != node.tick_gen or node.state != "up":
                    continue
                node.scheduled = math.inf
                node.m.tick(self.now)
                self._flush(node)
                if check_deadlines:
                    assert node.m.next_deadline() > self.now, f"{node.name}: tick({self.now}) left a deadline due"
            elif kind == _PACKET:
                self._deliver(nodes[a], b, c)
            elif kind == _PUSH_PULL:
                self._push_pull_step(nodes[a], b)
            else:
                a()
            if predicate is not None and predicate():
                return True
        self.now = max(self.now, end)
        return predicate() if predicate is not None else False

    # -- plumbing ------------------------------------------------------------------------

    def _flush(self, node: SimNode) -> None:
        """Collect what node.m asked for; called after every call into a machine."""
        m = node.m
        effects, events = m.drain()
        if events:
            now = self.now
            for e in events:
                if self.keep_events:
                    self.events.append((now, node.name, e.kind, e.fields))
                for hook in self._hooks:
                    hook(now, node, e)
        for eff in effects:
            if type(eff) is SendPacket:
                self._send(node, eff)
            elif type(eff) is StartPushPull:
                self._start_push_pull(node, eff)
            elif type(eff) is TcpProbe:
                self._tcp_probe(node, eff)
            elif type(eff) is FetchState:
                self._fetch_state(node, eff)
            else:  # pragma: no cover - a new effect type the simulator does not know
                raise AssertionError(f"unknown effect {eff!r}")
        for after in self._after_call:
            after(node)
        if node.state == "up":
            d = m.next_deadline()
            if d < node.scheduled:
                node.tick_gen += 1
                node.scheduled = d
                self._seq += 1
                heapq.heappush(self._heap, (max(d, self.now), self._seq, _TICK, node.index, node.tick_gen, None))

    def _send(self, node: SimNode, eff: SendPacket) -> None:
        payload = eff.payload
        if self.check_packets:
            assert len(payload) <= self.payload_limit, f"{len(payload)} byte datagram from {node.name}"
            decode_packet(payload)
        self.packets_sent += 1
        node.packets_out += 1
        size = len(payload) + SEAL_OVERHEAD
        node.bytes_out += size
        self.bytes_sent += size
        lost = self.rng.random() < self.net.loss  # drawn for every datagram: keeps replays aligned
        dst = self._by_addr.get(eff.addr)
        if dst is None or dst.group != node.group or (self._blocked and (node.index, dst.index) in self._blocked):
            self.packets_cut += 1
            return
        if lost:
            self.packets_lost += 1
            return
        delay = self._delay(node, dst)
        if dst.slow_in > 0.0:
            delay += self.rng.random() * dst.slow_in
        if self.latencies is not None:
            self.latencies.append(delay)
        self._seq += 1
        heapq.heappush(self._heap, (self.now + delay, self._seq, _PACKET, dst.index, node.index, payload))

    def _deliver(self, dst: SimNode, src_index: int, payload: bytes) -> None:
        src = self.nodes[src_index]
        if src.group != dst.group:
            self.packets_cut += 1
            return
        state = dst.state
        if state == "up":
            self.current_src = src
            dst.m.receive(self.now, src.addr, payload)
            self._flush(dst)
            self.current_src = None
        elif state == "paused" and len(dst.buffered) < self.net.pause_buffer:
            dst.buffered.append((src_index, payload))
        else:
            self.packets_dropped_down += 1

    def _tcp_probe(self, node: SimNode, eff: TcpProbe) -> None:
        """The fallback ping over TCP: lost packets are retransmitted by TCP, so only
        a partition or a node that is not up keeps it from answering in time."""
        target = self._by_addr.get(eff.addr)
        if target is None or target.state != "up" or self._cut(node, target):
            return  # nothing comes back; the probe ends at its own deadline
        one_way = self.base_latency(node, target)
        machine = node.m

        def answer() -> None:
            if target.state != "up" or self._cut(node, target):
                return
            reply = target.m.handle_stream(self.now, node.addr, eff.payload)
            self._flush(target)
            node.stream_bytes_out += len(eff.payload)
            self.stream_bytes += len(eff.payload) + len(reply or b"")

            def back() -> None:
                if node.m is machine and node.state == "up":
                    machine.complete_tcp_probe(self.now, eff.seq, reply)
                    self._flush(node)

            self._push(self.now + one_way, _CALL, back, None, None)

        # SYN, SYN-ACK, then the ping arrives: 3 one-way delays.
        self._push(self.now + 3 * one_way, _CALL, answer, None, None)

    def _fetch_state(self, node: SimNode, eff: FetchState) -> None:
        """A delegate's state fetched over TCP, timed like a push-pull: three one-way
        delays to connect and send the request, one for the reply.  A cut link or a
        peer that is not up fails it (no reply) when the request would have arrived."""
        target = self._by_addr.get(eff.addr)
        one_way = self.base_latency(node, target) if target is not None else self.net.base
        machine = node.m

        def request() -> None:
            if node.m is not machine or node.state != "up":
                return  # the requester died or was restarted meanwhile
            if target is None or target.state != "up" or self._cut(node, target):
                machine.complete_fetch(self.now, eff.node, None)
                self._flush(node)
                return
            payload = machine.state_request_payload(eff.node)
            node.stream_bytes_out += len(payload)
            self.stream_bytes += len(payload)
            reply = target.m.handle_stream(self.now, node.addr, payload)
            self._flush(target)
            if reply is not None:
                target.stream_bytes_out += len(reply)
                self.stream_bytes += len(reply)

            def back() -> None:
                if node.m is machine and node.state == "up":
                    machine.complete_fetch(self.now, eff.node, reply)
                    self._flush(node)

            self._push(self.now + one_way, _CALL, back, None, None)

        self._push(self.now + 3 * one_way, _CALL, request, None, None)

    def _start_push_pull(self, node: SimNode, eff: StartPushPull) -> None:
        target = self._by_addr.get(eff.target)
        one_way = self.base_latency(node, target) if target is not None else self.net.base
        # SYN, SYN-ACK, then the request arrives: 3 one-way delays.
        self._push(self.now + 3 * one_way, _PUSH_PULL, node.index, (node.m, eff, 0, None), None)

    def _push_pull_step(self, node: SimNode, job: tuple[Membership, StartPushPull, int, bytes | None]) -> None:
        machine, eff, phase, reply = job
        if phase == 0:
            target = self._by_addr.get(eff.target)
            if node.m is not machine or node.state != "up":
                return  # the initiator died or was restarted meanwhile
            error = "connection refused"
            if target is not None and target.state == "up" and not self._cut(node, target):
                request = machine.push_pull_payload(eff.purpose is Purpose.JOIN, lite=eff.purpose is Purpose.SYNC)
                node.stream_bytes_out += len(request)
                self.stream_bytes += len(request)
                self.push_pulls += 1
                reply = target.m.handle_stream(self.now, node.addr, request)
                self._flush(target)
                if reply is not None:
                    target.stream_bytes_out += len(reply)
                    self.stream_bytes += len(reply)
                    # The reply travels back: one more one-way delay.
                    self._push(self.now + self.base_latency(node, target), _PUSH_PULL, node.index,
                               (machine, eff, 1, reply), None)
                    return
                error = "stream closed"
            elif target is not None and target.state == "paused":
                # The kernel accepts the connection; the frozen process never answers.
                self._push(self.now + self.config.tcp_timeout, _PUSH_PULL, node.index, (machine, eff, 1, None), None)
                return
            machine.complete_push_pull(self.now, eff.target, eff.purpose, None, error)
            self._flush(node)
        else:
            if node.m is not machine or node.state != "up":
                return
            machine.complete_push_pull(self.now, eff.target, eff.purpose, reply, "" if reply else "timeout")
            self._flush(node)
