"""The standard scenarios: each builds a :class:`~simulations.sim.Sim`, runs it and returns a flat summary dict.

Every scenario starts from a converged cluster (every node knows every other as
alive; see :meth:`Sim.converged_cluster`) and lets it run ``WARMUP`` virtual
seconds so that probes are spread over the period before anything happens.
Times in the summaries are virtual seconds counted from the moment of the
injected change; ``wall_s`` is real seconds for the whole run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from gossip import hlc
from gossip.config import PROFILES, GossipConfig
from gossip.config_store import ConfigStore, Entry
from gossip.config_sync import (
    QUERY_NAME,
    announcement,
    has_news_for,
    lacks,
    next_pull,
    parse_announcement,
    pull_reply,
    summary_to_wire,
    wants_pull,
)
from gossip.signing import Signer
from gossip.swim import Event
from gossip.wire import MAX_QUERY_PAYLOAD, Address, ConfigPull, ConfigPush, encode_stream
from simulations.sim import NetModel, Sim, SimNode

WARMUP = 5.0
E_RATIO = math.e / (math.e - 1)  # SWIM: expected probe periods to first detection

Summary = dict[str, Any]


@dataclasses.dataclass
class Params:
    nodes: int = 100
    seconds: float = 60.0
    seed: int = 1
    loss: float = 0.0
    profile: str = "lan"
    lifeguard: bool = True
    #: memberlist's fallback ping over TCP after a failed UDP probe (on in the agent).
    #: The modelled TCP loses nothing, so with it on, datagram loss alone never
    #: makes a healthy member suspect; the false-positive scenario also runs with
    #: it off, to measure what Lifeguard buys over plain UDP as its paper did.
    tcp_fallback: bool = True
    check_packets: bool = False
    regions: int = 3
    #: Fraction of nodes that are periodically starved (false_positives).
    starve: float = 0.0
    #: Fraction of nodes that leave, that crash, and that join (churn), each.
    churn: float = 0.01
    #: Progress lines on stderr every this many virtual seconds (0: none).
    progress: float = 10.0
    #: Config entries every node holds (config_bytes).
    entries: int = 1000

    def config(self) -> GossipConfig:
        return dataclasses.replace(PROFILES[self.profile], lifeguard=self.lifeguard, tcp_fallback=self.tcp_fallback)


def build(p: Params) -> Sim:
    sim = Sim(p.config(), seed=p.seed, net=NetModel(loss=p.loss, regions=p.regions), check_packets=p.check_packets)
    sim.converged_cluster(p.nodes)
    if p.progress > 0:
        _progress(sim, p.progress)
    return sim


def _progress(sim: Sim, every: float) -> None:
    start = time.perf_counter()

    def report() -> None:
        up = sum(1 for n in sim.nodes if n.up)
        print(f"  t={sim.now:7.1f}s  wall={time.perf_counter() - start:7.1f}s  up={up}  "
              f"datagrams={sim.packets_sent}  steps={sim.steps}", file=sys.stderr, flush=True)
        sim.at(sim.now + every, report)

    sim.at(every, report)


class _Traffic:
    """Datagrams and bytes sent between two instants."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.t0 = sim.now
        self.p0, self.b0, self.s0 = sim.packets_sent, sim.bytes_sent, sim.stream_bytes

    def summary(self, nodes: int) -> Summary:
        sim = self.sim
        dt = max(1e-9, sim.now - self.t0)
        per = nodes * dt
        return {
            "msgs_per_node_per_s": round((sim.packets_sent - self.p0) / per, 3),
            "bytes_per_node_per_s": round((sim.bytes_sent - self.b0) / per, 1),
            "stream_bytes_per_node_per_s": round((sim.stream_bytes - self.s0) / per, 1),
        }


def _common(p: Params, sim: Sim, wall0: float) -> Summary:
    cfg = sim.config
    return {
        "nodes": p.nodes, "seed": p.seed, "loss": p.loss, "profile": p.profile, "lifeguard": p.lifeguard,
        "tcp_fallback": p.tcp_fallback,
        "virtual_s": round(sim.now, 3), "wall_s": round(time.perf_counter() - wall0, 2),
        "datagrams": sim.packets_sent, "lost": sim.packets_lost, "steps": sim.steps,
        "probe_interval": cfg.probe_interval, "gossip_interval": cfg.gossip_interval,
    }


def _is_origin(observer: str, fields: dict[str, Any]) -> bool:
    """The observer raised this suspicion or declaration itself (its probe failed, its timer expired)."""
    reason = str(fields.get("reason", ""))
    return reason.endswith(f"by {observer}")


# -- detection ---------------------------------------------------------------------------


def detection(p: Params) -> Summary:
    """Crash one node of a converged cluster; when does the first, and the last, node mark it dead?"""
    wall0 = time.perf_counter()
    sim = build(p)
    sim.run(WARMUP)
    victim = random.Random(f"victim:{p.seed}").choice(sim.nodes).name
    t0 = sim.now
    first_suspect: list[float] = []
    dead_seen: set[str] = set()
    dead_times: list[float] = []
    fps: list[int] = [0, 0]  # false dead declarations (origin), false suspicions (origin)

    def hook(now: float, node: SimNode, e: Event) -> None:
        if e.kind != "member":
            return
        f = e.fields
        if f["name"] == victim:
            if f["status"] == "suspect" and not first_suspect:
                first_suspect.append(now - t0)
            elif f["status"] == "dead" and node.name not in dead_seen:
                dead_seen.add(node.name)
                dead_times.append(now - t0)
        elif f["status"] in ("dead", "suspect") and _is_origin(node.name, f):
            fps[0 if f["status"] == "dead" else 1] += 1

    sim.on_event(hook)
    sim.crash(victim)
    traffic = _Traffic(sim)
    others = p.nodes - 1
    sim.run_until(lambda: len(dead_seen) >= others, p.seconds)
    cfg = sim.config
    out = _common(p, sim, wall0)
    out.update({
        "scenario": "detection",
        "first_suspect_s": round(first_suspect[0], 3) if first_suspect else None,
        "first_detect_s": round(dead_times[0], 3) if dead_times else None,
        "all_detect_s": round(dead_times[-1], 3) if len(dead_seen) >= others else None,
        "detected_by": len(dead_seen),
        "false_positives": fps[0],
        "false_suspicions": fps[1],
        # SWIM: the failed member is first probed after e/(e-1) periods on
        # average; that probe fails one period later (no ack, no indirect ack).
        "expected_first_suspect_s": round((E_RATIO + 1) * cfg.probe_interval, 3),
        "suspicion_min_s": round(cfg.suspicion_min(p.nodes), 3),
        "suspicion_max_s": round(cfg.suspicion_max(p.nodes), 3),
    })
    out.update(traffic.summary(p.nodes))
    return out


# -- dissemination ---------------------------------------------------------------------------


def dissemination(p: Params) -> Summary:
    """One node changes its tags (a new incarnation); when have 50%, 99% and 100% of nodes learnt it?"""
    wall0 = time.perf_counter()
    sim = build(p)
    sim.run(WARMUP)
    origin = random.Random(f"origin:{p.seed}").choice(sim.nodes)
    waiting = {n.name for n in sim.nodes if n is not origin}
    reached: list[float] = []
    hops: dict[str, int] = {origin.name: 0}
    t0 = sim.now
    want = origin.m.me.incarnation + 1

    def check(node: SimNode) -> None:
        if node.name in waiting:
            rec = node.m.members.get(origin.name)
            if rec is not None and rec.incarnation >= want:
                waiting.discard(node.name)
                reached.append(sim.now - t0)
                src = sim.current_src
                hops[node.name] = hops.get(src.name, 0) + 1 if src is not None else 1

    sim.after_call(check)
    traffic = _Traffic(sim)
    sim.set_tags(origin.name, {"version": "2"})
    sim.run_until(lambda: not waiting, p.seconds)
    others = p.nodes - 1

    def quantile(q: float) -> float | None:
        k = max(1, math.ceil(q * others))
        return round(reached[k - 1], 3) if len(reached) >= k else None

    cfg = sim.config
    out = _common(p, sim, wall0)
    t50, t99, t100 = quantile(0.5), quantile(0.99), quantile(1.0)
    out.update({
        "scenario": "dissemination",
        "t50_s": t50, "t99_s": t99, "t100_s": t100,
        "reached": len(reached), "of": others,
        "rounds_50": None if t50 is None else round(t50 / cfg.gossip_interval, 2),
        "rounds_99": None if t99 is None else round(t99 / cfg.gossip_interval, 2),
        "rounds_100": None if t100 is None else round(t100 / cfg.gossip_interval, 2),
        "max_hops": max(hops.values()),
        "median_hops": sorted(hops.values())[len(hops) // 2],
        "log2_n": round(math.log2(p.nodes), 2),
        "ln_n": round(math.log(p.nodes), 2),
        "log_fanout_n": round(math.log(p.nodes) / math.log(cfg.gossip_nodes + 1), 2),
    })
    out.update(traffic.summary(p.nodes))
    return out


# -- load -----------------------------------------------------------------------------------


def load(p: Params) -> Summary:
    """Steady state: datagrams and bytes sent per node per second (SWIM: constant in N)."""
    wall0 = time.perf_counter()
    sim = build(p)
    sim.run(WARMUP)
    traffic = _Traffic(sim)
    sim.run(p.seconds)
    out = _common(p, sim, wall0)
    out["scenario"] = "load"
    out.update(traffic.summary(p.nodes))
    return out


# -- false positives ---------------------------------------------------------------------------


def false_positives(p: Params) -> Summary:
    """Nobody fails; count healthy nodes marked suspect and dead, per hour of virtual time.

    With ``starve`` > 0 that fraction of nodes (at least one) is repeatedly
    starved, every 10-30 s: either paused (frozen) for 2-5 s, or for 5-10 s
    CPU-starved (timers run, but each datagram it receives is handled up to 2 s
    late).  The figures for the other (healthy) nodes are the false positives
    that Lifeguard is meant to prevent.
    """
    wall0 = time.perf_counter()
    sim = build(p)
    rng = random.Random(f"starve:{p.seed}")
    starved: set[str] = set()
    if p.starve > 0:
        count = max(1, round(p.starve * p.nodes))
        starved = {n.name for n in rng.sample(sim.nodes, count)}
    counts = {k: 0 for k in ("suspect_origin", "dead_origin", "dead_marks", "suspect_marks",
                             "starved_dead_origin", "starved_suspect_origin")}
    active = [False]

    def hook(now: float, node: SimNode, e: Event) -> None:
        if e.kind != "member" or not active[0]:
            return
        f = e.fields
        status = f["status"]
        if status not in ("suspect", "dead"):
            return
        origin = _is_origin(node.name, f)
        if f["name"] in starved:
            if origin:
                counts[f"starved_{status}_origin"] += 1
            return
        counts[f"{status}_marks"] += 1
        if origin:
            counts[f"{status}_origin"] += 1

    sim.on_event(hook)

    def starve_loop(name: str) -> None:
        def pause() -> None:
            if rng.random() < 0.5:
                sim.pause(name)
                sim.at(sim.now + rng.uniform(2.0, 5.0), resume)
            else:
                sim.slow(name, 2.0)
                sim.at(sim.now + rng.uniform(5.0, 10.0), resume)

        def resume() -> None:
            sim.resume(name)
            sim.slow(name, 0.0)
            sim.at(sim.now + rng.uniform(10.0, 30.0), pause)

        sim.at(WARMUP + rng.uniform(0.0, 10.0), pause)

    for name in sorted(starved):
        starve_loop(name)
    sim.run(WARMUP)
    active[0] = True
    traffic = _Traffic(sim)
    sim.run(p.seconds)
    per_hour = 3600.0 / p.seconds
    out = _common(p, sim, wall0)
    out.update({"scenario": "false_positives", "starved": len(starved), "measured_s": p.seconds})
    for k, v in counts.items():
        out[k] = v
        out[k + "_per_h"] = round(v * per_hour, 1)
    out["false_positives"] = counts["dead_origin"]
    out.update(traffic.summary(p.nodes))
    return out


# -- partition -------------------------------------------------------------------------------


def partition(p: Params) -> Summary:
    """Cut the cluster in two halves for ``cut`` seconds, heal, and time the return to full agreement.

    ``seconds`` bounds the wait after the heal; the cut lasts 60 s.
    """
    cut = 60.0
    wall0 = time.perf_counter()
    sim = build(p)
    n = p.nodes
    # alive_pairs counts (observer, subject) pairs with the subject seen alive.
    alive_pairs = [n * (n - 1)]
    full = n * (n - 1)

    def hook(now: float, node: SimNode, e: Event) -> None:
        if e.kind != "member":
            return
        f = e.fields
        if f["previous"] == "alive":
            alive_pairs[0] -= 1
        if f["status"] == "alive":
            alive_pairs[0] += 1

    sim.on_event(hook)
    sim.run(WARMUP)
    rng = random.Random(f"halves:{p.seed}")
    names = [nd.name for nd in sim.nodes]
    rng.shuffle(names)
    half = names[: n // 2]
    t0 = sim.now
    sim.partition(half)
    # Each half must come to see the other half as not alive: n/2 * n/2 * 2 pairs lost.
    split_target = full - 2 * len(half) * (n - len(half))
    split = sim.run_until(lambda: alive_pairs[0] <= split_target, cut)
    split_s = sim.now - t0 if split else None
    sim.run(t0 + cut - sim.now)
    sim.heal()
    t1 = sim.now
    ok = sim.run_until(lambda: alive_pairs[0] >= full, p.seconds)
    out = _common(p, sim, wall0)
    out.update({
        "scenario": "partition",
        "cut_s": cut,
        "split_s": None if split_s is None else round(split_s, 3),
        "heal_s": round(sim.now - t1, 3) if ok else None,
        "agreed": ok and sim.agree_all_alive(),
        "reconnect_interval": sim.config.reconnect_interval,
    })
    return out


# -- churn --------------------------------------------------------------------------------------


CHURN_WINDOW = 10.0


def churn(p: Params) -> Summary:
    """``churn`` of the nodes leave, as many crash and as many new ones join, at random moments of a
    10 s window; how long until every update has reached every live node (and none was lost)?

    What it checks, on every live node: each leaver shows as left, each crashed
    node as dead (a newcomer may instead not hold it at all: SWIM keeps no
    record of members gone before it came), each newcomer as alive; and each
    newcomer knows every live node.  The broadcast queues' drops are summed: the queue is bounded, and
    this shows whether the bound ever costs an update.
    """
    wall0 = time.perf_counter()
    sim = build(p)
    sim.run(WARMUP)
    rng = random.Random(f"churn:{p.seed}")
    k = max(1, round(p.churn * p.nodes))
    originals = [n.name for n in sim.nodes]
    picked = rng.sample(originals, 2 * k)
    leavers, crashers = picked[:k], picked[k:]
    stayers = [n for n in originals if n not in set(picked)]
    joiners = [f"j{i}" for i in range(k)]
    t0 = sim.now
    def join(name: str, seed: str) -> None:
        sim.add(name, seeds=[seed])

    for name in leavers:
        sim.at(t0 + rng.uniform(0, CHURN_WINDOW), functools.partial(sim.leave, name))
    for name in crashers:
        sim.at(t0 + rng.uniform(0, CHURN_WINDOW), functools.partial(sim.crash, name))
    for name in joiners:
        sim.at(t0 + rng.uniform(0, CHURN_WINDOW), functools.partial(join, name, rng.choice(stayers)))
    expected = {**{n: "left" for n in leavers}, **{n: "dead" for n in crashers}, **{n: "alive" for n in joiners}}
    joined = set(joiners)
    live_count = p.nodes - 2 * k + k
    state: dict[str, Any] = {"done_at": None, "missing": None, "max_queue": 0}

    def missing() -> int:
        live = [n for n in sim.nodes if n.state == "up"]
        if len(live) != live_count:
            return -1  # the window is not over yet
        gaps = 0
        for node in live:
            mem = node.m.members
            state["max_queue"] = max(state["max_queue"], len(node.m.broadcasts))
            for name, status in expected.items():
                rec = mem.get(name)
                if rec is None and status != "alive" and node.name in joined:
                    continue  # a newcomer need not hold members that were gone before it came
                if name != node.name and (rec is None or rec.status.value != status):
                    gaps += 1
            if node.name in joined:
                gaps += live_count - node.m.num_up()
        return gaps

    def check() -> None:
        gaps = missing()
        state["missing"] = gaps
        if gaps == 0 and state["done_at"] is None:
            state["done_at"] = sim.now - t0
        else:
            sim.at(sim.now + 1.0, check)

    sim.at(t0 + CHURN_WINDOW, check)
    traffic = _Traffic(sim)
    sim.run_until(lambda: state["done_at"] is not None, CHURN_WINDOW + p.seconds)
    out = _common(p, sim, wall0)
    out.update({
        "scenario": "churn",
        "churn_each": k,
        "all_updates_everywhere_s": None if state["done_at"] is None else round(state["done_at"], 3),
        "missing_at_end": state["missing"],
        "broadcasts_dropped": sum(n.m.counters.stats["broadcasts_dropped"] for n in sim.nodes),
        "max_queue_len": state["max_queue"],
        "queue_bound": max(n.m.broadcasts.max_depth for n in sim.nodes),
        "suspicion_max_s": round(sim.config.suspicion_max(p.nodes), 3),
    })
    out.update(traffic.summary(p.nodes))
    return out


# -- config entries -------------------------------------------------------------------------


class SimConfig:
    """Each node's config entries, spread as the agent spreads them (gossip.config_sync): a query
    announces a write, and push-pulls whose digests differ make the puller fetch what it lacks,
    one TCP exchange later, only while the two can reach each other.  A pull's request and answer
    are encoded as the agent sends them, and their bytes counted (``pull_bytes``, and in the
    simulator's stream bytes)."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.stores: dict[str, ConfigStore] = {}
        self.pulls = 0
        self.pull_bytes = 0
        self.rng = random.Random(f"config-news:{sim.seed}")
        for node in sim.nodes:
            self.attach(node)
        sim.on_event(self._on_event)

    def attach(self, node: SimNode) -> None:
        store = self.stores.setdefault(node.name, ConfigStore())
        node.m.set_config_peer(_SimPeer(self, node, store))

    def preload(self, entries: list[Entry]) -> None:
        """Every node holds ``entries`` already: a converged mesh."""
        for store in self.stores.values():
            for e in entries:
                store.apply(e)

    def write(self, origin: SimNode, entry: Entry) -> None:
        self.stores[origin.name].apply(entry)
        qid = origin.m.start_query(self.sim.now, QUERY_NAME, announcement(entry, MAX_QUERY_PAYLOAD))
        origin.m.finish_query(qid)
        self.sim.flush(origin)

    def _on_event(self, now: float, node: SimNode, e: Event) -> None:
        if e.kind == "query" and e.fields["name"] == QUERY_NAME:
            got = parse_announcement(e.fields["payload"])
            if isinstance(got, Entry):
                self.stores[node.name].apply(got)
            elif lacks(self.stores[node.name], got):
                self.later(node, e.fields["origin"])

    def pull(self, node: SimNode, peer_name: str, dull: int = 0) -> None:
        """``node`` pulls from ``peer_name``; the peer pulls back if it saw news; a node that gained
        news goes on pulling from random members while gossip.config_sync.next_pull says so, as the
        agent does (agent/config_spread.py, _pull_config)."""
        peer = self.sim.by_name.get(peer_name)
        if peer is None or not (node.up and peer.up) or node.group != peer.group:
            return
        mine, theirs = self.stores[node.name], self.stores[peer_name]
        learnt = told = False
        while True:
            self.pulls += 1
            summary = mine.summary()
            request = encode_stream([ConfigPull(node.name, summary_to_wire(summary))])
            back = has_news_for(theirs, summary)
            if back:
                told = True
                self.later(peer, node.name)  # the peer pulls back, and spreads what it learns itself
            entries, _keys, more = pull_reply(theirs, summary, with_keys=False)
            reply = encode_stream([ConfigPush([e.to_wire() for e in entries], None, more, back)])
            self._count(node, peer, len(request), len(reply))
            learnt = sum(1 for entry in entries if mine.apply(entry)) > 0 or learnt
            if not more:
                break
        carry = next_pull(dull, learnt, told)
        if carry is not None:
            others = [n for n in self.sim.nodes if n.up and n is not node and n is not peer]
            if others:
                self.later(node, self.rng.choice(others).name, carry)

    def _count(self, node: SimNode, peer: SimNode, request: int, reply: int) -> None:
        node.stream_bytes_out += request
        peer.stream_bytes_out += reply
        self.sim.stream_bytes += request + reply
        self.pull_bytes += request + reply

    def later(self, node: SimNode, peer: str, dull: int = 0) -> None:
        """A pull one round trip from now, as the agent's TCP exchange would take."""
        other = self.sim.by_name.get(peer)
        rtt = 2 * self.sim.base_latency(node, other) if other is not None else 0.0
        self.sim.at(self.sim.now + rtt, lambda: self.pull(node, peer, dull))

    def digests(self) -> set[bytes]:
        return {self.stores[n.name].digest() for n in self.sim.nodes if n.up}


class _SimPeer:
    def __init__(self, owner: SimConfig, node: SimNode, store: ConfigStore) -> None:
        self.owner, self.node, self.store = owner, node, store

    def digest(self) -> bytes:
        return self.store.digest()

    def observed(self, peer: str, addr: Address, digest: bytes | None) -> None:
        if wants_pull(self.store.digest(), digest):
            self.owner.later(self.node, peer)

    def answer(self, pull: ConfigPull, addr: Address) -> ConfigPush:  # the scenario pulls in process
        raise NotImplementedError


def config_spread(p: Params) -> Summary:
    """A config write beside a member update, both from one node at once: when has every node learnt
    each?  Then writes on both sides of a 60 s partition (conflicting, and a delete), and the time
    after the heal until every node holds the same entries (none may be left diverging)."""
    wall0 = time.perf_counter()
    sim = build(p)
    cfg_nodes = SimConfig(sim)
    sim.run(WARMUP)
    rng = random.Random(f"config:{p.seed}")
    origin = rng.choice(sim.nodes)
    signer = Signer(bytes(32))
    clock = [hlc.make(1_700_000_000_000)]

    def entry(writer: str, name: str, body: dict[str, Any] | None) -> Entry:
        clock[0] += 1
        return Entry.write(signer, writer, "intention", name, body, clock[0])

    def deny(src: str) -> dict[str, Any]:
        return {"source": src, "destination": "db", "action": "deny"}

    want = origin.m.me.incarnation + 1
    member_at: dict[str, float] = {}
    config_at: dict[str, float] = {}
    written = entry(origin.name, "web/db", deny("web"))
    key = written.key
    t0 = sim.now

    def check(node: SimNode) -> None:
        if node is origin:
            return
        if node.name not in member_at:
            rec = node.m.members.get(origin.name)
            if rec is not None and rec.incarnation >= want:
                member_at[node.name] = sim.now - t0
        if node.name not in config_at:
            held = cfg_nodes.stores[node.name].get(*key)
            if held is not None and held.order >= written.order:
                config_at[node.name] = sim.now - t0

    sim.after_call(check)
    sim.set_tags(origin.name, {"version": "2"})
    cfg_nodes.write(origin, written)
    others = p.nodes - 1
    sim.run_until(lambda: len(member_at) >= others and len(config_at) >= others, p.seconds)

    def quantile(times: dict[str, float], q: float) -> float | None:
        vals = sorted(times.values())
        k = max(1, math.ceil(q * others))
        return round(vals[k - 1], 3) if len(vals) >= k else None

    m100, c100 = quantile(member_at, 1.0), quantile(config_at, 1.0)
    # The partition: each half writes what the other cannot hear, on the same key too.
    names = [n.name for n in sim.nodes]
    rng.shuffle(names)
    half = names[: p.nodes // 2]
    sim.partition(half)
    left, right = sim.by_name[half[0]], sim.by_name[names[-1]]
    sim.run(5.0)
    cfg_nodes.write(left, entry(left.name, "api/db", deny("api")))
    cfg_nodes.write(right, entry(right.name, "api/db", {**deny("api"), "action": "allow"}))  # concurrent
    cfg_nodes.write(right, entry(right.name, "web/db", None))  # delete the first write
    sim.run(55.0)
    split_digests = len(cfg_nodes.digests())
    sim.heal()
    t1 = sim.now
    healed = False
    while not healed and sim.now - t1 < p.seconds:
        sim.run(1.0)  # every node's digest compared once a virtual second, not after every event
        healed = len(cfg_nodes.digests()) == 1
    out = _common(p, sim, wall0)
    out.update({
        "scenario": "config_spread",
        "member_t50_s": quantile(member_at, 0.5), "member_t100_s": m100,
        "config_t50_s": quantile(config_at, 0.5), "config_t100_s": c100,
        "config_over_member": None if not (m100 and c100) else round(c100 / m100, 2),
        "config_reached": len(config_at), "of": others,
        "digests_while_split": split_digests,
        "heal_s": round(sim.now - t1, 3) if healed else None,
        "diverging_after_heal": len(cfg_nodes.digests()) - 1,
        "config_pulls": cfg_nodes.pulls,
    })
    return out


def config_entries(n: int, writer: str = "n0") -> list[Entry]:
    """``n`` signed intention entries, as many distinct writes."""
    signer = Signer(bytes(32))
    base = hlc.make(1_700_000_000_000)
    return [Entry.write(signer, writer, "intention", f"svc{i}/db", {"source": f"svc{i}", "destination": "db",
                                                                   "action": "deny" if i % 2 else "allow"},
                        base + i)
            for i in range(n)]


def _converged_traffic(p: Params, entries: list[Entry]) -> Summary:
    """A converged mesh whose every node holds ``entries``: what it sends over ``p.seconds``."""
    sim = build(p)
    cfg_nodes = SimConfig(sim)
    cfg_nodes.preload(entries)
    sim.run(WARMUP)
    traffic = _Traffic(sim)
    pp0, pulls0, pull_bytes0 = sim.push_pulls, cfg_nodes.pulls, cfg_nodes.pull_bytes
    sim.run(p.seconds)
    per = p.nodes * p.seconds
    out = traffic.summary(p.nodes)
    out.update({
        "entries": len(entries),
        "push_pulls": sim.push_pulls - pp0,
        "config_pulls": cfg_nodes.pulls - pulls0,
        "config_pull_bytes_per_node_per_s": round((cfg_nodes.pull_bytes - pull_bytes0) / per, 1),
        "digests": len(cfg_nodes.digests()),
    })
    return out


def config_bytes(p: Params) -> Summary:
    """A converged mesh's anti-entropy bytes with ``p.entries`` config entries beside none, same seed.

    Anti-entropy is everything sent over TCP (push-pulls, which carry the
    config digest, and config pulls); gossip datagrams are shown apart.  A
    converged mesh should send a constant-size digest, so the ratio should be
    1; ``summary_bytes`` is what one pull's summary of that many entries
    weighs, what every push-pull would cost without the digest.
    """
    wall0 = time.perf_counter()
    entries = config_entries(p.entries)
    without = _converged_traffic(p, [])
    with_entries = _converged_traffic(p, entries)
    store = ConfigStore()
    for e in entries:
        store.apply(e)
    summary_bytes = len(encode_stream([ConfigPull("n0", summary_to_wire(store.summary()))]))
    ae0 = without["stream_bytes_per_node_per_s"]
    ae1 = with_entries["stream_bytes_per_node_per_s"]
    out: Summary = {"scenario": "config_bytes", "nodes": p.nodes, "seed": p.seed, "profile": p.profile,
                    "window_s": p.seconds, "entries": p.entries}
    out.update({f"none_{k}": v for k, v in without.items() if k != "entries"})
    out.update({f"with_{k}": v for k, v in with_entries.items() if k != "entries"})
    out.update({
        "anti_entropy_ratio": None if not ae0 else round(ae1 / ae0, 4),
        "summary_bytes": summary_bytes,
        "wall_s": round(time.perf_counter() - wall0, 2),
    })
    return out


SCENARIOS: dict[str, Callable[[Params], Summary]] = {
    "detection": detection,
    "dissemination": dissemination,
    "load": load,
    "false_positives": false_positives,
    "partition": partition,
    "churn": churn,
    "config_spread": config_spread,
    "config_bytes": config_bytes,
}
