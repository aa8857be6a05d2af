"""agent/plane.py: an agent builds its data plane with the first need of it, and not before.

Real agents on loopback.  Whether an agent has built it shows in /metrics: the
data plane's reactor is "off" until its tunnel manager runs.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from simulations.harness import AgentProc, Cluster, free_port, listening, wait_for

pytestmark = pytest.mark.slow


def reactor_mode(a: AgentProc) -> str:
    """The mode whose mesh_dataplane_reactor_mode sample is 1."""
    for line in a.call_text("/metrics").splitlines():
        if line.startswith("mesh_dataplane_reactor_mode{") and line.endswith(" 1.0"):
            return line.split('"')[1]
    raise AssertionError("no reactor mode is 1 in /metrics")


def stop(a: AgentProc) -> None:
    a.signal(signal.SIGTERM)
    wait_for(lambda: not a.running(), 15, f"{a.name} stopped", lambda: a.log()[-2000:])


def test_an_idle_agent_has_no_data_plane_and_its_tunnel_port_loads_it(cluster: Cluster) -> None:
    a = cluster.start("lz-a")
    assert reactor_mode(a) == "off"
    assert a.call("GET", "/v1/tunnels") == [] and a.call("GET", "/v1/upstreams") == []
    # The tunnel counters show at zero before it exists, as they do after.
    assert a.info()["counters"]["dataplane.handshakes_failed_bad_magic"] == 0
    host, port = a.info()["tunnel"].rsplit(":", 1)
    # A peer may dial us before we carry traffic: the port accepts, and the first connection builds it.
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /")  # as long as the tunnel's preamble, which it is not
        s.settimeout(10)
        assert s.recv(100) == b""  # closed by the handshake, having read it all
    wait_for(lambda: a.info()["counters"]["dataplane.handshakes_failed_bad_magic"] == 1, 10,
             "the bad handshake counted", lambda: str(a.info()["counters"]))
    assert reactor_mode(a) != "off"


def test_saved_upstreams_reopen_at_restart_and_none_left_means_no_data_plane(cluster: Cluster,
                                                                             tmp_path: Path) -> None:
    data_dir = tmp_path / "lz-b"
    data_dir.mkdir()
    b = cluster.start("lz-b", extra=["--data-dir", str(data_dir)])
    assert reactor_mode(b) == "off"
    listen = free_port()
    b.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{listen}"})
    assert reactor_mode(b) != "off" and listening(listen)
    stop(b)

    b = cluster.start("lz-b", extra=["--data-dir", str(data_dir)])
    assert [u["service"] for u in b.call("GET", "/v1/upstreams")] == ["web"]
    assert listening(listen) and reactor_mode(b) != "off"
    b.call("DELETE", "/v1/upstreams/web")
    stop(b)

    b = cluster.start("lz-b", extra=["--data-dir", str(data_dir)])
    assert b.call("GET", "/v1/upstreams") == [] and not listening(listen)
    assert reactor_mode(b) == "off"
