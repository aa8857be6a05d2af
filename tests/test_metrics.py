"""GET /metrics: Prometheus text format, checked by promtool, with figures that follow what the agents did."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest
from test_proxy import echo_server

from simulations.harness import ROOT, Cluster, free_port, wait_for

pytestmark = pytest.mark.slow


def scrape(api: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://{api}/metrics", timeout=10) as resp:
        return resp.headers["content-type"], resp.read().decode()


def value(text: str, sample: str) -> float:
    """The value of one sample line, given as ``name{labels}`` exactly as exposed."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {sample!r} in:\n{text}")


def test_metrics_pass_promtool_and_count_what_happened(cluster: Cluster) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    a = cluster.start("m1")
    b = cluster.start("m2", join=[a.addr])
    cluster.wait_converged(["m1", "m2"])
    port = free_port()
    echo = echo_server(port)
    try:
        b.call("PUT", "/v1/services", {"name": "echo", "id": "echo-m2", "port": port, "address": "127.0.0.1"})
        wait_for(lambda: len(a.call("GET", "/v1/services/echo?passing")) == 1, 15, "echo on m1")
        listen = free_port()
        a.call("PUT", "/v1/upstreams", {"service": "echo", "listen": f"127.0.0.1:{listen}"})
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", listen), timeout=10) as c:
                c.sendall(b"x" * 1000)
                c.shutdown(socket.SHUT_WR)
                got = b""
                while d := c.recv(65536):
                    got += d
                assert got == b"x" * 1000
        wait_for(lambda: "mesh_gossip_probe_rtt_seconds_count" in scrape(a.api)[1]
                 and value(scrape(a.api)[1], "mesh_gossip_probe_rtt_seconds_count") > 0, 15, "a probe measured")
        ctype, text = scrape(a.api)
    finally:
        echo.kill()
        echo.wait(5)
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    assert value(text, 'mesh_members{status="alive"}') == 2
    # The standard process metrics, of the agent's own process.
    assert 10 * 2**20 < value(text, "process_resident_memory_bytes") < 2**30
    assert value(text, "process_cpu_seconds_total") > 0
    assert value(text, "process_open_fds") > 5
    assert value(text, "process_max_fds") >= value(text, "process_open_fds")
    assert value(text, 'mesh_gossip_packets_total{direction="in"}') > 0
    assert value(text, 'mesh_gossip_messages_total{direction="out",type="ping"}') > 0
    assert value(text, 'mesh_gossip_messages_total{direction="in",type="ack"}') > 0
    assert value(text, 'mesh_upstream_connections_total{outcome="connected",upstream="echo"}') == 5
    assert value(text, 'mesh_proxy_bytes_total{direction="out",upstream="echo"}') == 5000
    assert value(text, 'mesh_proxy_bytes_total{direction="in",upstream="echo"}') == 5000
    assert value(text, 'mesh_lb_picks_total{state="active",upstream="echo"}') == 5
    assert value(text, 'mesh_upstream_instances{state="active",upstream="echo"}') == 1
    assert value(text, 'mesh_tunnel_handshakes_total{reason="",result="ok"}') >= 1
    assert value(text, 'mesh_tunnel_sessions{path="direct"}') == 1
    # The agents run on trio's own clock: the data plane waits in trio's place.
    assert value(text, 'mesh_dataplane_reactor_mode{mode="idle_hook"}') == 1
    assert value(text, 'mesh_dataplane_reactor_mode{mode="task"}') == 0
    assert value(text, "mesh_dataplane_reactor_callbacks_total") > 0
    assert value(text, 'mesh_registry_instances{health="passing"}') == 1
    assert value(text, "mesh_registry_version_lag") == 0
    assert value(text, 'mesh_gossip_probe_rtt_seconds_bucket{le="+Inf"}') == value(
        text, "mesh_gossip_probe_rtt_seconds_count")
    # The other side counts its end of the same traffic.
    _, other = scrape(b.api)
    assert value(other, "mesh_tunnel_streams_accepted_total") >= 5
    assert value(other, 'mesh_gossip_push_pull_total{result="ok",role="initiator"}') >= 1  # its join
    assert value(text, 'mesh_gossip_push_pull_total{result="ok",role="responder"}') >= 1


_METRICS_IMPORT = r"""
import sys
from agent import lean
lean.import_trio()  # as the agent imports trio: without idna (agent/lean.py)
import agent.metrics
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("dns", "idna", "httptools", "h11"))))
"""


def test_a_scrape_loads_no_dns_or_http_parser() -> None:
    """An agent that is scraped but never asked a name, nor carries HTTP, keeps dnspython and the parsers out:
    /metrics names their series from constants of their own (agent/dns_codes.py)."""
    r = subprocess.run([sys.executable, "-c", _METRICS_IMPORT], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [], r.stdout
