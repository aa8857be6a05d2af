"""Agents on separate hosts (network namespaces on one bridge); see tests/netns.py."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys

import pytest
from netns import Lab
from test_proxy import ECHO

from simulations.harness import wait_for

pytestmark = pytest.mark.slow


def roundtrip(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=30) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        chunks = []
        while d := c.recv(65536):
            chunks.append(d)
        return b"".join(chunks)


def test_a_client_reaches_a_service_on_an_unreachable_host_through_a_relay(lab: Lab) -> None:
    a = lab.start_agent("a")
    b = lab.start_agent("b", join=[a.addr])
    c = lab.start_agent("c", join=[a.addr])
    agents = [a, b, c]

    def converged() -> bool:
        views = [x.try_members() for x in agents]
        return all(v is not None and all(v.get(n, {}).get("status") == "alive" for n in "abc") for v in views)

    wait_for(converged, 30, "a, b, c alive everywhere")
    # A and C cannot reach each other at all; both still reach B.
    lab.cut("a", "c")
    lab.cut("c", "a")
    lab.run_in(lab.hosts["c"], [sys.executable, "-c", ECHO, "9100"], "echo.log")
    c.call("PUT", "/v1/services", {"name": "echo", "id": "echo-c", "port": 9100, "address": "127.0.0.1"})
    wait_for(lambda: len(a.call("GET", "/v1/services/echo?passing")) == 1, 30, "echo-c known on a")
    a.call("PUT", "/v1/upstreams", {"service": "echo", "listen": f"{a.ip}:9000", "public": True})

    # SWIM keeps C alive on A through B's indirect probes, so its instance stays routable.
    payload = os.urandom(2 * 1024 * 1024 + 3)
    got = roundtrip(a.ip, 9000, payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest() and len(got) == len(payload)
    assert a.members()["c"]["status"] == "alive"

    # The session A-C is end to end (each side authenticated the other's key) and runs via B ...
    a_tunnels = {t["peer"]: t for t in a.call("GET", "/v1/tunnels")}
    assert a_tunnels["c"]["via"] == "b"
    assert "a" in {t["peer"] for t in c.call("GET", "/v1/tunnels")}
    # ... and B carried its bytes: ciphertext of a session whose keys it never had.
    counters = b.info()["counters"]
    assert counters["dataplane.relayed_streams"] >= 1
    assert counters["dataplane.relay_bytes_to_target"] >= len(payload)
    assert counters["dataplane.relay_bytes_from_target"] >= len(payload)
    routes = a.call("GET", "/v1/routes?service=echo")
    assert [r["path"] for r in routes] == [["a", "b", "c"]], json.dumps(routes)
    assert a.info()["counters"]["dataplane.relayed_dials"] >= 1

    # New connections reuse the relayed session: no second dial.
    for i in range(5):
        msg = f"again {i}".encode()
        assert roundtrip(a.ip, 9000, msg) == msg
    assert a.info()["counters"]["dataplane.relayed_dials"] == 1
