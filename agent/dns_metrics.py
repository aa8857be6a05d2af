"""The DNS server's metrics, read from its counters at scrape time (agent/metrics.py calls ``collect``).

Kept beside the DNS server rather than in agent/metrics.py so the two change
together; every series exists from the first scrape (zeros included), so a
dashboard's rate() has a baseline before the first query.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.dns_codes import COUNTED_TYPES, RCODE_NAMES

if TYPE_CHECKING:
    from agent.runner import Agent

#: Why a query went unanswered (agent.dns and agent.dns_answers.Malformed), each shown from the start.
DROP_REASONS = ("rate_limited", "malformed", "truncated", "oversized", "not_a_query", "bad_edns", "recv_error",
                "send_error", "tcp_busy", "virtual_busy")


def collect(agent: Agent) -> Iterator[Metric]:
    server = agent.dns
    if server is None:
        return
    queries = CounterMetricFamily("mesh_dns_queries", "DNS queries answered, by query type and response code.",
                                  labels=["type", "rcode"])
    seen = dict(server.queries)
    for qtype in (*COUNTED_TYPES, "other"):
        for rcode in ("NOERROR", "NXDOMAIN"):
            seen.setdefault((qtype, rcode), 0)
    for rcode in RCODE_NAMES.values():
        seen.setdefault(("A", rcode), 0)
    for (qtype, rcode), n in sorted(seen.items()):
        queries.add_metric([qtype, rcode], n)
    yield queries
    drops = CounterMetricFamily("mesh_dns_dropped", "DNS queries dropped unanswered, by reason.", labels=["reason"])
    for reason in sorted({*DROP_REASONS, *server.drops}):
        drops.add_metric([reason], server.drops[reason])
    yield drops
    c = CounterMetricFamily("mesh_dns_truncated", "UDP answers sent truncated (TC): the client asks again over TCP.")
    c.add_metric([], server.truncated)
    yield c
    c = CounterMetricFamily("mesh_dns_answers_built", "Answers built from the registry (the rest were reused).")
    c.add_metric([], server.built)
    yield c
    # Before the first query there are no virtual upstreams yet (agent.dns builds them with the answers).
    virtual = server.virtual
    g = GaugeMetricFamily("mesh_dns_virtual_upstreams", "Upstreams open for NAME.virtual lookups.")
    g.add_metric([], 0 if virtual is None else len(virtual.opened))
    yield g
    c = CounterMetricFamily("mesh_dns_virtual_upstream_events", "Virtual upstreams opened, reaped when idle, "
                            "or that failed to open.", labels=["event"])
    for event in ("opened", "reaped", "failed"):
        c.add_metric([event], 0 if virtual is None else virtual.stats[event])
    yield c
