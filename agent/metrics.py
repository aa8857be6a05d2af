"""Prometheus exposition of the agent's counters, written with prometheus-client.

The agent already counts everything it does (gossip, registry, tunnels,
proxy, routing) in plain Counters that the API shows; a custom collector reads
them at scrape time, so the hot paths pay nothing for metrics and nothing is
counted twice.  Names follow Prometheus conventions: ``mesh_`` prefix,
``_total`` counters, base units (seconds, bytes).

prometheus-client is imported only when /metrics is first scraped (this
module is imported lazily by the API): an agent nobody scrapes keeps the
memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import dns_metrics
from dataplane.reactor import ReactorMode
from dataplane.tunnel_stats import REFUSAL_REASONS
from gossip import hlc
from gossip.swim import RTT_BUCKETS

if TYPE_CHECKING:
    from agent.runner import Agent

#: Text format 0.0.4, what every Prometheus server reads (newer prometheus-client
#: versions call the same bytes "1.0.0" when all names are classic, as ours are).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Gossip counters (gossip.swim) exported one to one: (stat, metric, help).
_GOSSIP_COUNTERS = (
    ("probes", "mesh_gossip_probes_total", "SWIM probes started."),
    ("probe_failures", "mesh_gossip_probe_failures_total", "Probes that got no ack, direct or indirect."),
    ("ping_reqs", "mesh_gossip_ping_reqs_total", "Indirect probe requests sent."),
    ("suspicions", "mesh_gossip_suspicions_total", "Members this agent started suspecting."),
    ("suspicion_confirmations", "mesh_gossip_suspicion_confirmations_total",
     "Independent confirmations of suspicions (Lifeguard)."),
    ("suspicion_timeouts", "mesh_gossip_suspicion_timeouts_total", "Suspicions that expired into dead."),
    ("refutations", "mesh_gossip_refutations_total", "Times this agent refuted a suspicion of itself."),
    ("probes_abandoned_late", "mesh_gossip_probes_abandoned_late_total",
     "Probes dropped because this process overslept (paused or starved)."),
    ("reconnect_attempts", "mesh_gossip_reconnect_attempts_total", "Push-pulls tried with members marked dead."),
    ("state_fetched", "mesh_registry_fetches_total", "Node catalogs fetched after a changed digest."),
)


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    # prometheus-client appends _total to counter samples itself.
    return CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))


class AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        yield from self._gossip()
        yield from self._registry()
        yield from self._tunnels()
        yield from self._upstreams()
        yield from self._api()
        yield from self._store()
        yield from self._config_entries()
        yield from self._http()
        yield from dns_metrics.collect(self.agent)

    def _http(self) -> Iterator[Metric]:
        """Golden metrics of HTTP requests (agent.traffic): no paths, no node names, capped names."""
        from agent.traffic import CLASSES, PROM_BUCKETS

        traffic = self.agent.traffic
        labels = ["direction", "service", "instance", "source"]
        requests = _counter("mesh_http_requests_total",
                            "HTTP requests finished, by status class (none: no response reached the client).",
                            [*labels, "status_class"])
        errors = _counter("mesh_http_mesh_errors_total",
                          "Requests the mesh answered itself (502, 503, 504), by reason (x-mesh-error).",
                          [*labels, "reason"])
        retries = _counter("mesh_http_retries_total", "Attempts beyond the first that requests took.", labels)
        latency = HistogramMetricFamily("mesh_http_request_duration_seconds",
                                        "From a request's head arriving to its response's end.", labels=labels)
        for key, s in sorted(traffic.tracked().items()):
            names = list(key)
            for cls, n in zip(CLASSES, s.counts, strict=True):
                if n:
                    requests.add_metric([*names, cls], n)
            for reason, n in sorted(s.errors.items()):
                errors.add_metric([*names, reason], n)
            retries.add_metric(names, s.retries)
            buckets, running = [], 0
            for bound, n in zip((*PROM_BUCKETS, float("inf")), s.prom, strict=True):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric(names, buckets, s.sum)
        yield from (requests, errors, retries, latency)
        c = _counter("mesh_http_series_overflow_total",
                     "New service, instance or source names met past the tracking caps (counted under _other).")
        c.add_metric([], traffic.overflowed)
        yield c
        c = _counter("mesh_http_tap_dropped_total", "Requests a tap subscriber read too slowly to be shown.")
        c.add_metric([], traffic.tap_dropped)
        yield c
        g = GaugeMetricFamily("mesh_http_taps", "Tap subscribers attached now.")
        g.add_metric([], len(traffic.taps))
        yield g

    def _config_entries(self) -> Iterator[Metric]:
        view = self.agent.config_entries.summary_view()
        entries = GaugeMetricFamily("mesh_config_entries", "Mesh-wide config entries this node holds, by kind.",
                                    labels=["kind"])
        for kind, n in view["entries"].items():
            entries.add_metric([kind], n)
        yield entries
        g = GaugeMetricFamily("mesh_config_tombstones", "Deletes remembered, so they cannot be undone by a "
                              "node that missed them.")
        g.add_metric([], view["tombstones"])
        yield g
        g = GaugeMetricFamily("mesh_config_clock_seconds",
                              "This node's config version clock, its wall-clock part (Unix time).")
        g.add_metric([], hlc.wall_ms(view["clock"]) / 1000)
        yield g
        stats = view["counters"]
        c = _counter("mesh_config_writes_total", "Config entries written or deleted through this node.", ["op"])
        c.add_metric(["write"], stats.get("written", 0))
        c.add_metric(["delete"], stats.get("deleted", 0))
        yield c
        c = _counter("mesh_config_conflicts_resolved_total",
                     "Received entries that replaced another writer's version of the same entry.")
        c.add_metric([], stats.get("conflicts_resolved", 0))
        yield c
        c = _counter("mesh_config_refused_total", "Config entries from peers refused, by reason.", ["reason"])
        for reason in ("signature", "clock", "malformed"):
            c.add_metric([reason], stats.get(f"refused_{reason}", 0))
        yield c

    def _store(self) -> Iterator[Metric]:
        failures = _counter("mesh_store_write_failures_total",
                            "Failed writes of files under --data-dir (the change was refused), by file.", ["file"])
        failing = GaugeMetricFamily("mesh_store_write_failing",
                                    "1 while the last write of a file under --data-dir failed.", labels=["file"])
        for name, saver in self.agent.savers().items():
            failures.add_metric([name], saver.failures)
            failing.add_metric([name], 1 if saver.error else 0)
        yield failures
        yield failing

    def _api(self) -> Iterator[Metric]:
        refused = _counter("mesh_api_refused_total",
                           "Local API requests refused by its access rules (agent.access), by reason.", ["reason"])
        for reason, value in sorted(self.agent.access.refused.items()):
            refused.add_metric([reason], value)
        yield refused

    # -- gossip ------------------------------------------------------------------------

    def _gossip(self) -> Iterator[Metric]:
        ag = self.agent
        ms = ag.membership
        stats, io = ms.counters.stats, ag.io
        packets = _counter("mesh_gossip_packets_total", "Gossip datagrams by direction.", ["direction"])
        packets.add_metric(["in"], io["udp_packets_in"])
        packets.add_metric(["out"], io["udp_packets_out"])
        yield packets
        sent = _counter("mesh_gossip_bytes_total", "Gossip bytes on the wire (sealed) by transport and direction.",
                        ["transport", "direction"])
        for transport in ("udp", "tcp"):
            for direction in ("in", "out"):
                sent.add_metric([transport, direction], io[f"{transport}_bytes_{direction}"])
        yield sent
        msgs = _counter("mesh_gossip_messages_total",
                        "Gossip messages by type and direction (a datagram carries several).", ["type", "direction"])
        for key, value in sorted(stats.items()):
            for direction in ("in", "out"):
                prefix = f"msg_{direction}."
                if key.startswith(prefix):
                    msgs.add_metric([key[len(prefix):], direction], value)
        yield msgs
        drops = _counter("mesh_gossip_dropped_total", "Packets and streams dropped, by reason.", ["reason"])
        for reason, value in sorted(ms.counters.drops.items()):
            drops.add_metric([reason], value)
        yield drops
        members = GaugeMetricFamily("mesh_members", "Members in this agent's view, by status.", labels=["status"])
        for status, count in ms.count_by_status().items():
            members.add_metric([status], count)
        yield members
        for stat, name, doc in _GOSSIP_COUNTERS:
            c = _counter(name, doc)
            c.add_metric([], stats[stat])
            yield c
        pp = _counter("mesh_gossip_push_pull_total", "Full-state push-pull syncs, by role and result.",
                      ["role", "result"])
        pp.add_metric(["initiator", "ok"], stats["push_pull_out"])
        pp.add_metric(["responder", "ok"], stats["push_pull_in"])
        pp.add_metric(["responder", "refused"], stats["push_pull_refused"])
        yield pp
        health = GaugeMetricFamily("mesh_gossip_health_score",
                                   "Lifeguard local health multiplier minus one (0 is healthy).")
        health.add_metric([], ms.awareness.score)
        yield health
        buckets, running = [], 0
        for bound, count in zip((*RTT_BUCKETS, float("inf")), ms.counters.rtt_buckets, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        rtt = HistogramMetricFamily("mesh_gossip_probe_rtt_seconds", "Round trip of direct SWIM probes.",
                                    buckets=buckets, sum_value=ms.counters.rtt_sum)
        yield rtt

    # -- registry ----------------------------------------------------------------------

    def _registry(self) -> Iterator[Metric]:
        ag = self.agent
        reg = ag.registry
        instances = GaugeMetricFamily("mesh_registry_instances", "Service instances in the catalog, by health.",
                                      labels=["health"])
        by_health = {"passing": 0, "warning": 0, "critical": 0}
        nodes = set()
        for node, inst in reg.all_instances():
            by_health[inst.health] = by_health.get(inst.health, 0) + 1
            nodes.add(node)
        for health, count in by_health.items():
            instances.add_metric([health], count)
        yield instances
        n = GaugeMetricFamily("mesh_registry_nodes", "Nodes with at least one instance in the catalog.")
        n.add_metric([], len(nodes))
        yield n
        # Version lag: how far the catalogs we hold trail what their owners advertise.
        behind, lag = 0, 0
        for m in ag.membership.members.values():
            if m.state is None or not m.status.up or m.name == ag.membership.name:
                continue
            held = reg.held(m.name)
            gap = m.state[0] - (held.version if held is not None else 0)
            if gap > 0:
                behind += 1
                lag = max(lag, gap)
        g = GaugeMetricFamily("mesh_registry_version_lag",
                              "Largest gap between a node's advertised catalog version and the one held here.")
        g.add_metric([], lag)
        yield g
        g = GaugeMetricFamily("mesh_registry_nodes_behind", "Nodes whose held catalog is older than advertised.")
        g.add_metric([], behind)
        yield g
        updates = _counter("mesh_registry_updates_total", "Catalog updates received, by result.", ["result"])
        for result, value in sorted(reg.stats.items()):
            updates.add_metric([result], value)
        yield updates

    # -- data plane --------------------------------------------------------------------

    def _tunnels(self) -> Iterator[Metric]:
        ag = self.agent
        dp = ag.dp_stats
        plane = ag.plane
        sessions = [] if plane is None else plane.tunnels.sessions_view()
        g = GaugeMetricFamily("mesh_tunnel_sessions", "Encrypted sessions to other agents, by path.", labels=["path"])
        g.add_metric(["direct"], sum(1 for s in sessions if s["via"] is None))
        g.add_metric(["relayed"], sum(1 for s in sessions if s["via"] is not None))
        yield g
        g = GaugeMetricFamily("mesh_tunnel_streams_open", "Streams open on all sessions.")
        g.add_metric([], sum(s["streams"] for s in sessions))
        yield g
        c = _counter("mesh_tunnel_sessions_opened_total", "Sessions opened (dialled or accepted).")
        c.add_metric([], dp["sessions_opened"])
        yield c
        hs = _counter("mesh_tunnel_handshakes_total", "Noise handshakes, by result and failure reason.",
                      ["result", "reason"])
        hs.add_metric(["ok", ""], dp["handshakes_ok"])
        for reason in REFUSAL_REASONS:
            hs.add_metric(["failed", reason], dp[f"handshakes_failed_{reason}"])
        hs.add_metric(["failed", "dial"], dp["dials_failed"])
        yield hs
        b = _counter("mesh_tunnel_bytes_total", "Encrypted tunnel bytes on the wire, by direction.", ["direction"])
        b.add_metric(["in"], dp["bytes_in"])
        b.add_metric(["out"], dp["bytes_out"])
        yield b
        for stat, name, doc in (
            ("streams_opened", "mesh_tunnel_streams_opened_total", "Streams this agent opened."),
            ("streams_accepted", "mesh_tunnel_streams_accepted_total", "Streams peers opened to this agent."),
            ("rekeys", "mesh_tunnel_rekeys_total", "Session key renewals."),
            ("decrypt_failures", "mesh_tunnel_decrypt_failures_total", "Records that failed to decrypt."),
            ("direct_dials_failed", "mesh_tunnel_direct_dials_failed_total",
             "Direct dials that failed, so a relay was tried."),
            ("relayed_dials", "mesh_tunnel_relayed_dials_total", "Sessions set up through a relay member."),
            ("relayed_streams", "mesh_relay_streams_total", "Sessions this agent carried for others as a relay."),
        ):
            c = _counter(name, doc)
            c.add_metric([], dp[stat])
            yield c
        # Which way the data plane waits (dataplane/reactor.py): "idle_hook" is
        # the fast one; "task" means trio's internals were not as the hook
        # expects, which costs latency at low concurrency, not correctness.
        reactor = None if plane is None else plane.tunnels.reactor
        mode = reactor.mode if reactor is not None and reactor.running else ReactorMode.OFF
        g = GaugeMetricFamily("mesh_dataplane_reactor_mode", "1 for the way the data plane's reactor waits.",
                              labels=["mode"])
        for m in ReactorMode:
            g.add_metric([m.value], 1 if m is mode else 0)
        yield g
        c = _counter("mesh_dataplane_reactor_callbacks_total", "Socket readiness served without waking a task.")
        c.add_metric([], 0 if reactor is None else reactor.dispatched)
        yield c
        c = _counter("mesh_dataplane_reactor_wakeups_total", "Tasks the reactor woke to do what needs waiting.")
        c.add_metric([], 0 if reactor is None else reactor.woken)
        yield c

    def _upstreams(self) -> Iterator[Metric]:
        ag = self.agent
        ups = sorted(ag.upstream_listeners().items())
        outcomes = _counter("mesh_upstream_connections_total", "Client connections to an upstream, by outcome.",
                            ["upstream", "outcome"])
        proxied = _counter("mesh_proxy_bytes_total", "Bytes proxied for an upstream's clients, by direction.",
                           ["upstream", "direction"])
        retries = _counter("mesh_upstream_retries_total",
                           "Client connections that needed another instance after a failed attempt.", ["upstream"])
        attempts = _counter("mesh_upstream_attempts_failed_total", "Connect attempts that reached no instance.",
                            ["upstream"])
        picks = _counter("mesh_lb_picks_total", "Load-balancer choices, by the chosen instance's state.",
                         ["upstream", "state"])
        ejections = _counter("mesh_outlier_ejections_total", "Instances ejected by outlier detection.",
                             ["upstream"])
        slow = _counter("mesh_outlier_slow_starts_total", "Instances that entered slow start.", ["upstream"])
        refused = _counter("mesh_outlier_ejections_refused_total",
                           "Ejections refused by max_ejection_percent.", ["upstream"])
        open_ = GaugeMetricFamily("mesh_upstream_connections_open", "Open proxied connections.", labels=["upstream"])
        states = GaugeMetricFamily("mesh_upstream_instances", "Passing instances by routing state.",
                                   labels=["upstream", "state"])
        for name, up in ups:
            st = up.stats
            connected = st["connected"]
            outcomes.add_metric([name, "connected"], connected)
            outcomes.add_metric([name, "failed"], st["connect_failures"])
            outcomes.add_metric([name, "no_instance"], st["no_instance"])
            outcomes.add_metric([name, "denied"], st["denied"])
            outcomes.add_metric([name, "client_gone"], st["client_gone"])
            outcomes.add_metric([name, "overflow"], st["overflow_max_connections"] + st["overflow_max_pending"])
            proxied.add_metric([name, "out"], st["bytes_out"])
            proxied.add_metric([name, "in"], st["bytes_in"])
            retries.add_metric([name], st["retried"])
            attempts.add_metric([name], st["attempts_failed"])
            for state in ("active", "slow-start", "half-open", "ejected"):
                picks.add_metric([name, state], up.router.stats[f"picked.{state}"])
            ejections.add_metric([name], up.router.outlier.stats["ejections"])
            slow.add_metric([name], up.router.outlier.stats["slow_starts"])
            refused.add_metric([name], up.router.outlier.stats["ejections_refused_max_percent"])
            open_.add_metric([name], up.router.open)
            rows = ag.routes_view(name)
            for state in ("active", "slow-start", "ejected"):
                states.add_metric([name, state], sum(1 for r in rows if r["state"] == state))
        yield from (outcomes, proxied, retries, attempts, picks, ejections, slow, refused, open_, states)


def exposition(agent: Agent) -> bytes:
    """The whole exposition, in Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    # The standard process metrics (resident memory, CPU seconds, open and maximum file
    # descriptors, start time), as every Prometheus client exports them, read from /proc.
    ProcessCollector(registry=registry)
    return generate_latest(registry)
