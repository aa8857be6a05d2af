"""GET /v1/stat, GET /v1/tap, `mesh-agent stat` and `mesh-agent tap`, and the HTTP metrics, on real agents."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_monitor import Monitor

from simulations.harness import (
    ROOT,
    AgentProc,
    Cluster,
    Processes,
    free_port,
    mesh_agent_cmd,
    wait_for,
    wait_port,
)

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mesh_agent_cmd(), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def http_error(agent: AgentProc, path: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{agent.api}{path}", timeout=10)
    body = json.loads(info.value.read())
    return info.value.code, body


class Tap(Monitor):
    """A `mesh-agent tap` process (test_monitor.Monitor's machinery)."""

    COMMAND = "tap"
    ATTACHED = "tapping"

    def __init__(self, tmp_path: Path, *args: str) -> None:
        super().__init__(tmp_path, args[0], *args)


@pytest.fixture
def taps() -> Iterator[list[Tap]]:
    started: list[Tap] = []
    try:
        yield started
    finally:
        for t in started:
            t.kill()


def test_stat_and_tap_with_no_traffic_yet(cluster: Cluster, tmp_path: Path, taps: list[Tap]) -> None:
    a = cluster.start("t1")
    view = a.call("GET", "/v1/stat")
    assert view["outbound"] == [] and view["inbound"] == [] and view["window_seconds"] == 60
    assert view["span_seconds"] > 0
    assert a.call("GET", "/v1/stat?service=web")["outbound"] == []

    for path, word in (("/v1/stat?service=Not_A_Name", "service must be"),
                       ("/v1/stat?services=web", "unknown parameter"),
                       ("/v1/tap", "give ?service"),
                       ("/v1/tap?service=web&path=nope", "path must be"),
                       ("/v1/tap?service=web&method=G%20T", "method must be")):
        code, body = http_error(a, path)
        assert code == 400 and word in body["error"], (path, body)

    # The tap answers at once (the head, then one line per request as they come).
    conn = http.client.HTTPConnection("127.0.0.1", a.api_port, timeout=10)
    conn.request("GET", "/v1/tap?service=web&method=get&path=/api")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["content-type"] == "application/x-ndjson"
    assert resp.headers["transfer-encoding"] == "chunked"
    wait_for(lambda: 'mesh_http_taps 1.0' in a.call_text("/metrics"), 10, "the tap counted while open")
    resp.close()  # (the response holds the socket of a "connection: close" answer)
    conn.close()
    wait_for(lambda: 'mesh_http_taps 0.0' in a.call_text("/metrics"), 10, "the tap gone once its client left")

    p = run("stat", "--json", "--api", a.api)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["outbound"] == []
    p = run("stat", "--api", a.api)
    assert p.returncode == 0, p.stderr
    assert "OUTBOUND" in p.stdout and "INBOUND" in p.stdout and "no HTTP requests yet" in p.stdout
    p = run("stat", "Bad_Name", "--api", a.api)
    assert p.returncode == 1 and p.stderr.startswith("mesh-agent: agent refused: service must be"), p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1

    p = run("tap", "web", "--path", "nope", "--api", a.api)
    assert p.returncode == 1 and "path must be" in p.stderr and "Traceback" not in p.stderr
    p = run("tap", "web", "--api", f"127.0.0.1:{free_port()}")
    assert p.returncode == 1 and "no agent answering" in p.stderr and "Traceback" not in p.stderr

    tap = Tap(tmp_path, "web", "--api", a.api)
    taps.append(tap)
    tap.wait_attached()
    assert tap.interrupt() == 0
    assert "Traceback" not in tap.err() and tap.out() == ""


def test_taps_are_limited_and_freed(cluster: Cluster) -> None:
    from agent.traffic import MAX_TAPS

    a = cluster.start("t3")
    opened: list[tuple[http.client.HTTPConnection, http.client.HTTPResponse]] = []
    try:
        for _ in range(MAX_TAPS):
            conn = http.client.HTTPConnection("127.0.0.1", a.api_port, timeout=10)
            conn.request("GET", "/v1/tap?service=web")
            resp = conn.getresponse()
            assert resp.status == 200
            opened.append((conn, resp))
        code, body = http_error(a, "/v1/tap?service=web")
        assert code == 429 and "taps are open" in body["error"], body
    finally:
        for conn, resp in opened:
            resp.close()
            conn.close()
    wait_for(lambda: "mesh_http_taps 0.0" in a.call_text("/metrics"), 10, "every tap gone with its client")
    conn = http.client.HTTPConnection("127.0.0.1", a.api_port, timeout=10)
    conn.request("GET", "/v1/tap?service=web")
    resp = conn.getresponse()
    assert resp.status == 200  # a place is free again
    resp.close()
    conn.close()


def test_http_metrics_pass_promtool(cluster: Cluster) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    a = cluster.start("t2")
    text = a.call_text("/metrics")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    for family in ("mesh_http_requests_total counter", "mesh_http_request_duration_seconds histogram",
                   "mesh_http_mesh_errors_total counter", "mesh_http_retries_total counter",
                   "mesh_http_tap_dropped_total counter", "mesh_http_taps gauge",
                   "mesh_http_series_overflow_total counter"):
        assert f"# TYPE {family}" in text, family
    assert "mesh_http_tap_dropped_total 0.0" in text
    # The process metrics (issue 30), beside ours.
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert any(line.startswith(name + " ") for line in text.splitlines()), name


# -- end to end, through the HTTP data plane ----------------------------------------------------------

HTTP_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
iid = sys.argv[2]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        status = 500 if self.path.startswith("/fail") else 200
        body = iid.encode()
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def metric(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of the sample ``name`` whose labels include ``labels``; 0 when none."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_http_requests_show_in_stat_tap_and_metrics(cluster: Cluster, procs: Processes, tmp_path: Path,
                                                    taps: list[Tap]) -> None:
    a = cluster.start("e1")
    b = cluster.start("e2", join=[a.addr])
    c = cluster.start("e3", join=[a.addr])
    cluster.wait_converged(["e1", "e2", "e3"])
    for agent in (b, c):
        port = free_port()
        procs.python(HTTP_SERVER, port, f"web-{agent.name}")
        wait_port(port, f"http server of {agent.name}")
        agent.call("PUT", "/v1/services", {"name": "web", "id": f"web-{agent.name}", "port": port,
                                           "address": "127.0.0.1", "protocol": "http"})
    # The calling service, registered on e1 so the instances' agents can verify the source it claims.
    a.call("PUT", "/v1/services", {"name": "front", "port": free_port(), "address": "127.0.0.1"})
    wait_for(lambda: len(a.call("GET", "/v1/services/web?passing")) == 2, 20, "both web instances on e1")
    for agent in (b, c):
        wait_for(lambda agent=agent: len(agent.call("GET", "/v1/services/front")) == 1, 20,  # type: ignore[misc]
                 f"front known to {agent.name}")
    listen = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{listen}", "source": "front",
                                    "lb": "round_robin"})
    wait_port(listen, "the upstream")

    tap = Tap(tmp_path, "web", "--json", "--api", a.api)
    taps.append(tap)
    tap.wait_attached()

    conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=20)  # one kept-alive connection
    answered: dict[str, int] = {}
    for i in range(40):
        conn.request("GET", "/fail" if i % 5 == 4 else f"/ok/{i}")  # failures on both instances
        resp = conn.getresponse()
        who = resp.read().decode()
        answered[who] = answered.get(who, 0) + 1
        assert resp.status == (500 if i % 5 == 4 else 200)
    conn.close()
    assert set(answered) == {"web-e2", "web-e3"}, answered

    def outbound() -> dict[str, Any] | None:
        rows = [r for r in a.call("GET", "/v1/stat?service=web")["outbound"] if r["service"] == "web"]
        return rows[0] if rows and rows[0]["requests"] == 40 else None

    wait_for(lambda: outbound() is not None, 10, "40 requests in e1's stat", lambda: json.dumps(a.call(
        "GET", "/v1/stat")))
    web = outbound()
    assert web is not None
    assert web["success_rate"] == pytest.approx(0.8) and web["counts"] == {"2xx": 32, "5xx": 8}
    per = {i["instance"]: i for i in web["instances"]}
    assert set(per) == {"web-e2", "web-e3"}
    assert {k: per[k]["requests"] for k in per} == answered and per["web-e2"]["node"] == "e2"
    assert web["p50_ms"] is not None and web["p50_ms"] > 0

    # Each instance's agent saw its own share inbound, from the calling service.
    def inbound(agent: AgentProc) -> list[dict[str, Any]]:
        return [r for r in agent.call("GET", "/v1/stat")["inbound"] if r["service"] == "web"]

    for agent in (b, c):
        want = answered[f"web-{agent.name}"]
        wait_for(lambda agent=agent, want=want: bool(inbound(agent)) and  # type: ignore[misc]
                 inbound(agent)[0]["requests"] == want, 10, f"{agent.name}'s inbound stat")
        row = inbound(agent)[0]
        assert [i["instance"] for i in row["instances"]] == [f"web-{agent.name}"]
        assert [s["source"] for s in row["sources"]] == ["front"]

    wait_for(lambda: tap.out().count("\n") >= 40, 10, "40 tap lines", tap.out)
    lines = [json.loads(ln) for ln in tap.out().splitlines()]
    assert {ln["instance"] for ln in lines} == {"web-e2", "web-e3"}
    assert sum(1 for ln in lines if ln["status"] == 500 and ln["path"] == "/fail") == 8
    assert all(ln["direction"] == "outbound" and ln["method"] == "GET" and ln["latency_ms"] > 0 for ln in lines)
    assert tap.interrupt() == 0

    text = a.call_text("/metrics")
    assert metric(text, "mesh_http_requests_total", {"direction": "outbound", "service": "web",
                                                     "status_class": "2xx"}) == 32
    assert metric(text, "mesh_http_requests_total", {"direction": "outbound", "instance": "web-e2"}) == answered[
        "web-e2"]
    assert metric(text, "mesh_http_request_duration_seconds_count", {"direction": "outbound", "service": "web"}) == 40
    assert "/ok/" not in text  # paths never become labels
    if shutil.which("promtool") is not None:
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    p = run("stat", "web", "--api", a.api)
    assert p.returncode == 0 and "web-e2" in p.stdout and "80.00%" in p.stdout, p.stdout + p.stderr
