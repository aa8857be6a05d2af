"""agent/traffic.py: the golden metrics folded from request records, and tap (no processes here)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
import trio

from agent import traffic as tr
from agent.traffic import OTHER, TapFilter, Traffic, stat_query, tap_query
from dataplane.observed import INBOUND, OUTBOUND, RequestRecord


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rec(service: str = "web", instance: str = "web-1", status: int = 200, latency: float = 0.01,
        started: float = 1_000_000.0, direction: str = OUTBOUND, source: str | None = None, method: str = "GET",
        path: str = "/", mesh_error: str | None = None, retries: int = 0, node: str = "n1") -> RequestRecord:
    return RequestRecord(direction, service, instance, node, source, method, path, status, latency, started,
                         mesh_error, retries)


def only(view: dict[str, Any], direction: str, service: str) -> dict[str, Any]:
    rows = [r for r in view[direction] if r["service"] == service]
    assert len(rows) == 1, view
    row: dict[str, Any] = rows[0]
    return row


def close_to(got: float | None, want: float, rel: float = 0.03) -> bool:
    """Percentiles come from log buckets 2**(1/16) wide: within half of one, about 2.2%."""
    return got is not None and abs(got - want) <= rel * want


def test_percentiles_success_rate_and_classes() -> None:
    clock = Clock()
    t = Traffic(clock)
    # 1..100 ms, one request each; every tenth a 500, one 404 and one that got no response.
    for i in range(1, 101):
        status = 500 if i % 10 == 0 else 404 if i == 7 else 0 if i == 13 else 200
        t.record(rec(latency=i / 1000, status=status, started=clock.t - 5))
    clock.t += 1
    view = t.stat_view()
    web = only(view, OUTBOUND, "web")
    assert web["requests"] == 100
    assert web["counts"] == {"2xx": 88, "4xx": 1, "5xx": 10, "none": 1}
    # Linkerd's success: neither a 5xx nor no response at all; a 404 is a success.
    assert web["success_rate"] == pytest.approx(0.89)
    assert close_to(web["p50_ms"], 50), web
    assert close_to(web["p95_ms"], 95), web
    assert close_to(web["p99_ms"], 99), web
    assert web["total_requests"] == 100 and web["total_counts"]["5xx"] == 10
    assert [i["instance"] for i in web["instances"]] == ["web-1"]
    assert web["instances"][0]["node"] == "n1"
    assert view[INBOUND] == []


def test_tail_latency_is_seen_by_p99_not_p50() -> None:
    clock = Clock()
    t = Traffic(clock)
    for _ in range(980):
        t.record(rec(latency=0.002, started=clock.t - 1))
    for _ in range(20):
        t.record(rec(latency=1.5, started=clock.t - 1))
    web = only(t.stat_view(), OUTBOUND, "web")
    assert close_to(web["p50_ms"], 2) and close_to(web["p95_ms"], 2)
    assert close_to(web["p99_ms"], 1500)


def test_per_instance_and_per_source_inbound() -> None:
    clock = Clock()
    t = Traffic(clock)
    for _ in range(30):
        t.record(rec(instance="web-1", status=200, started=clock.t - 1))
    for _ in range(10):
        t.record(rec(instance="web-2", status=503, mesh_error="no-passing-instances", retries=1,
                     started=clock.t - 1))
    for src in ("front", "front", "batch"):
        t.record(rec(direction=INBOUND, instance="web-1", source=src, latency=0.004, started=clock.t - 1))
    view = t.stat_view()
    web = only(view, OUTBOUND, "web")
    per = {i["instance"]: i for i in web["instances"]}
    assert per["web-1"]["success_rate"] == 1.0 and per["web-2"]["success_rate"] == 0.0
    assert web["success_rate"] == pytest.approx(0.75)
    assert web["mesh_errors"] == {"no-passing-instances": 10}
    inbound = only(view, INBOUND, "web")
    assert inbound["requests"] == 3
    assert {s["source"]: s["requests"] for s in inbound["sources"]} == {"front": 2, "batch": 1}
    assert [i["instance"] for i in inbound["instances"]] == ["web-1"]
    # Outbound records name no source series even when the upstream has one.
    t.record(rec(source="front", started=clock.t - 1))
    assert "sources" not in only(t.stat_view(), OUTBOUND, "web")


def test_window_slides_and_totals_stay() -> None:
    clock = Clock(1_000_000.0)
    t = Traffic(clock)
    for _ in range(60):
        t.record(rec(status=500, started=clock.t - 0.5))
    clock.t += 30
    for _ in range(60):
        t.record(rec(status=200, started=clock.t - 0.5))
    web = only(t.stat_view(), OUTBOUND, "web")
    assert web["requests"] == 120 and web["success_rate"] == pytest.approx(0.5)
    assert web["rps"] == pytest.approx(120 / 30.0, rel=0.05)  # since start: the window is not full yet
    clock.t += 35  # the 500s are now over a minute old
    web = only(t.stat_view(), OUTBOUND, "web")
    assert web["requests"] == 60 and web["success_rate"] == 1.0
    assert web["rps"] == pytest.approx(1.0, rel=0.2)  # 60 over the last minute
    clock.t += 61
    web = only(t.stat_view(), OUTBOUND, "web")
    assert web["requests"] == 0 and web["success_rate"] is None and web["p50_ms"] is None and web["rps"] == 0
    assert web["total_requests"] == 120 and web["total_counts"] == {"2xx": 60, "5xx": 60}
    assert web["instances"][0]["requests"] == 0 and web["instances"][0]["total_requests"] == 120


def test_records_folded_late_land_in_their_own_slot() -> None:
    """Records wait in a list until someone reads: their own end time decides their slot."""
    clock = Clock(1_000_000.0)
    t = Traffic(clock)
    t.record(rec(started=clock.t - 100))  # ended 100 s ago: counted since start, not in the minute
    t.record(rec(started=clock.t - 2))
    assert t.series == {}  # nothing folded yet
    web = only(t.stat_view(), OUTBOUND, "web")
    assert web["requests"] == 1 and web["total_requests"] == 2


def test_fold_happens_without_readers() -> None:
    t = Traffic(Clock())
    for _ in range(tr.FOLD_AT):
        t.record(rec())
    assert sum(sum(s.counts) for s in t.series.values()) == tr.FOLD_AT
    assert t._pending == []


def test_prometheus_buckets_and_sum() -> None:
    clock = Clock()
    t = Traffic(clock)
    for latency in (0.00005, 0.0001, 0.0003, 0.02, 12.0, 40.0):
        t.record(rec(latency=latency, started=clock.t - 50))
    (s,) = t.tracked().values()
    cumulative = dict(zip((*tr.PROM_BUCKETS, float("inf")), [sum(s.prom[:i + 1]) for i in range(len(s.prom))],
                          strict=True))
    assert cumulative[0.0001] == 2  # le is inclusive
    assert cumulative[0.0005] == 3
    assert cumulative[0.025] == 4
    assert cumulative[30.0] == 5
    assert cumulative[float("inf")] == 6
    assert s.sum == pytest.approx(52.0204)


def test_memory_stays_bounded_with_100000_instances_and_paths() -> None:
    clock = Clock()
    t = Traffic(clock)
    for i in range(2000):  # warm up, so the measurement sees steady state
        t.record(rec(service=f"s{i % 50}", instance=f"i{i}", path=f"/p/{i}", started=clock.t - 1))
    t.fold()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(100_000):
        t.record(rec(service=f"s{i % 3000}", instance=f"x{i}", path=f"/q/{i}?id={i}", started=clock.t - 1,
                     direction=INBOUND if i % 2 else OUTBOUND, source=f"src{i}"))
    t.fold()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    series = t.tracked()
    # Series are capped (services, instances per service, sources per instance, all of them together).
    assert len(series) <= 3 * tr.MAX_SERIES + 2, len(series)
    assert len(t._alias) <= tr.MAX_SERIES
    per_service: dict[tuple[str, str], int] = {}
    for direction, service, instance, _ in series:
        per_service[direction, service] = per_service.get((direction, service), 0) + (instance != OTHER)
    assert max(per_service.values()) <= tr.MAX_INSTANCES_PER_SERVICE
    assert (OUTBOUND, OTHER, OTHER, "") in series and (INBOUND, OTHER, OTHER, "") in series
    assert t.overflowed > 0
    # Nothing was lost: every request is counted somewhere.
    assert sum(sum(s.counts) for s in series.values()) == 102_000
    # No path is kept anywhere: the memory is that of the capped series, not of what was fed.
    assert grown < 40 * 2**20, grown
    assert not any("/q/" in k for key in series for k in key)


def test_idle_series_are_dropped_when_the_cap_is_reached() -> None:
    clock = Clock()
    t = Traffic(clock, max_series=10)
    for i in range(10):
        t.record(rec(instance=f"old-{i}", started=clock.t - 1))
    t.fold()
    t.record(rec(instance="new-0", started=clock.t - 1))
    assert ("outbound", "web", OTHER, "") in t.tracked()  # full: counted under _other
    clock.t += tr.IDLE_DROP_SECONDS + 10
    t.record(rec(instance="new-1", started=clock.t - 1))
    series = t.tracked()
    assert ("outbound", "web", "new-1", "") in series
    assert not any(k[2].startswith("old-") for k in series)


def test_query_parsing_gives_clear_errors() -> None:
    assert stat_query({}) is None
    assert stat_query({"service": ["web"]}) == "web"
    for bad, word in (({"service": ["Not A Name"]}, "service must be"), ({"svc": ["web"]}, "unknown parameter"),
                      ({"service": [""]}, "service must be")):
        with pytest.raises(ValueError, match=word):
            stat_query(bad)
    assert tap_query({"service": ["web"], "method": ["post"], "path": ["/api"]}) == TapFilter(
        "web", None, "POST", "/api")
    for bad, word in (({}, "give \\?service"), ({"service": ["web"], "path": ["api"]}, "path must be"),
                      ({"service": ["web"], "method": ["G E T"]}, "method must be"),
                      ({"service": ["web"], "instance": ["../x"]}, "instance must be"),
                      ({"service": ["web"], "port": ["1"]}, "unknown parameter")):
        with pytest.raises(ValueError, match=word):
            tap_query(bad)


async def test_tap_filters_live_records() -> None:
    t = Traffic(Clock())
    with t.tap(TapFilter("web", method="POST", path="/api")) as sub, t.tap(TapFilter("web", instance="web-2")) as s2:
        t.record(rec(method="POST", path="/api/v1/items?x=1", status=201, latency=0.0123))
        t.record(rec(method="GET", path="/api/v1/items"))  # wrong method
        t.record(rec(method="POST", path="/other"))  # wrong path
        t.record(rec(service="db", method="POST", path="/api"))  # wrong service
        t.record(rec(instance="web-2", direction=INBOUND, source="front", mesh_error="timeout", status=504,
                     retries=2))
        with trio.fail_after(5):
            line = await sub.__anext__()
            other = await s2.__anext__()
        with trio.move_on_after(0.05):
            extra = await sub.__anext__()
            raise AssertionError(f"unexpected {extra}")
    assert line == {"time": line["time"], "direction": "outbound", "source": None, "service": "web",
                    "instance": "web-1", "node": "n1", "method": "POST", "path": "/api/v1/items?x=1",
                    "status": 201, "latency_ms": 12.3, "mesh_error": None, "retries": 0}
    assert line["time"].endswith("Z") and line["time"].startswith("1970-01-12T")
    assert other["direction"] == "inbound" and other["source"] == "front" and other["mesh_error"] == "timeout"
    assert other["retries"] == 2 and other["status"] == 504
    assert t.taps == ()


async def test_slow_tap_loses_records_and_is_told_how_many() -> None:
    t = Traffic(Clock())
    with t.tap(TapFilter("web"), buffer=10) as sub:
        for i in range(25):
            t.record(rec(path=f"/{i}"))
        got = []
        with trio.fail_after(5):
            for _ in range(10):
                got.append(await sub.__anext__())
        assert [g["path"] for g in got] == [f"/{i}" for i in range(10)]
        assert sub.dropped == 15 and t.tap_dropped == 15
        t.record(rec(path="/after"))
        with trio.fail_after(5):
            gap = await sub.__anext__()
            after = await sub.__anext__()
        assert gap["event"] == "tap_dropped" and gap["dropped"] == 15
        assert after["path"] == "/after"
    assert t.tap_dropped == 15  # still counted once the tap is gone


def test_record_without_taps_touches_only_a_list() -> None:
    """The hot path: with no tap and a batch not yet full, record() only appends."""
    t = Traffic(Clock())
    r = rec()
    t.record(r)
    assert t._pending == [r] and t.series == {}


def test_http_metric_families_with_traffic_pass_promtool() -> None:
    """The mesh_http_* families as /metrics renders them, filled, checked by promtool."""
    import shutil
    import subprocess
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest

    from agent.metrics import AgentCollector

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    clock = Clock()
    t = Traffic(clock)
    for i, latency in enumerate((0.00005, 0.0002, 0.003, 0.003, 0.2, 45.0)):
        t.record(rec(latency=latency, status=(200, 301, 404, 0, 503, 504)[i], started=clock.t - 50,
                     mesh_error="timeout" if i == 5 else None, retries=i % 2))
    t.record(rec(direction=INBOUND, source="front", instance="web-2", latency=0.001, started=clock.t - 1))

    class Only:
        def collect(self) -> Any:
            return AgentCollector(SimpleNamespace(traffic=t))._http()  # type: ignore[arg-type]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Only())
    text = generate_latest(registry).decode()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr + text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
               for fam in text_string_to_metric_families(text) for smp in fam.samples}

    def value(name: str, **labels: str) -> float:
        return samples[name, tuple(sorted(labels.items()))]

    out = {"direction": "outbound", "service": "web", "instance": "web-1", "source": ""}
    assert value("mesh_http_requests_total", **out, status_class="2xx") == 1
    assert value("mesh_http_requests_total", **out, status_class="3xx") == 1
    assert value("mesh_http_requests_total", **out, status_class="none") == 1
    assert value("mesh_http_requests_total", **out, status_class="5xx") == 2
    assert value("mesh_http_mesh_errors_total", **out, reason="timeout") == 1
    assert value("mesh_http_retries_total", **out) == 3
    assert value("mesh_http_request_duration_seconds_bucket", **out, le="0.0001") == 1
    assert value("mesh_http_request_duration_seconds_bucket", **out, le="0.005") == 4
    assert value("mesh_http_request_duration_seconds_bucket", **out, le="30.0") == 5
    assert value("mesh_http_request_duration_seconds_bucket", **out, le="+Inf") == 6
    assert value("mesh_http_request_duration_seconds_count", **out) == 6
    assert value("mesh_http_request_duration_seconds_sum", **out) == pytest.approx(45.20625)
    inbound = {"direction": "inbound", "service": "web", "instance": "web-2", "source": "front"}
    assert value("mesh_http_requests_total", **inbound, status_class="2xx") == 1


def test_absurd_times_are_clamped_not_raised() -> None:
    """A broken clock in the data plane must not make record() raise on the proxy's path."""
    clock = Clock()
    t = Traffic(clock)
    nan, inf = float("nan"), float("inf")
    for latency, started in ((inf, clock.t), (nan, clock.t), (-1.0, clock.t), (0.01, -inf), (0.01, inf),
                             (0.01, nan), (1e300, clock.t)):
        t.record(rec(latency=latency, started=started))
    web = only(t.stat_view(), OUTBOUND, "web")
    assert web["total_requests"] == 7
    (s,) = t.series.values()
    assert s.sum < 10 * tr.MAX_LATENCY


def test_cli_renders_stat_and_tap_lines() -> None:
    from cli.traffic import stat_table, tap_text

    clock = Clock()
    t = Traffic(clock)
    for _ in range(3):
        t.record(rec(latency=0.00008, started=clock.t - 1))
    t.record(rec(instance="", node="", status=503, mesh_error="no-passing-instances", latency=0.0004,
                 started=clock.t - 1))
    t.record(rec(direction=INBOUND, source="front", latency=0.25, started=clock.t - 1))
    lines = stat_table(t.stat_view())
    assert lines[0].startswith("OUTBOUND") and lines[1].split()[:3] == ["SERVICE", "INSTANCE", "SUCCESS"]
    assert lines[2].split()[:3] == ["web", "*", "75.00%"]
    assert lines[3].split()[:2] == ["(none", "reached)"]
    assert lines[4].split()[:3] == ["web-1", "100.00%", "3.0"] and "78us" in lines[4]
    inbound = lines.index(next(ln for ln in lines if ln.startswith("INBOUND")))
    assert any(ln.split()[:2] == ["from", "front"] for ln in lines[inbound:])
    assert any("247ms" in ln for ln in lines[inbound:])  # 250 ms, to within half a bucket
    assert stat_table({"outbound": [], "inbound": []}) == [
        "OUTBOUND (calls this agent's clients made, last 60s)", "  no HTTP requests yet",
        "INBOUND (calls that reached this agent's instances, last 60s)", "  no HTTP requests yet"]
    line = tap_text(tr.tap_line(rec(status=504, mesh_error="timeout", retries=2, path="/a?b=1", latency=1.5)))
    assert line.endswith("outbound -> web/web-1@n1 GET /a?b=1 504 1500.0ms mesh_error=timeout retries=2"), line
    assert tap_text({"event": "tap_dropped", "dropped": 7}).startswith("... 7 requests skipped")
    assert " no-response " in tap_text(tr.tap_line(rec(status=0)))
