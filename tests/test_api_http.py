"""GET /v1/members: the body built from per-member pieces is exactly ``json.dumps`` of the view."""

from __future__ import annotations

import http.client
import json
import socket

from simulations.harness import Cluster


def _h11_get(port: int, path: str) -> bytes:
    """One request on a fresh connection that asks to be closed."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(5)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    return body


def test_members_body_is_the_json_of_the_member_view(cluster: Cluster) -> None:
    a = cluster.start("m1")
    cluster.start("m2", join=[a.addr])
    cluster.wait_converged(["m1", "m2"])
    conn = http.client.HTTPConnection("127.0.0.1", a.api_port, timeout=5)
    bodies = []
    for _ in range(2):  # kept alive
        conn.request("GET", "/v1/members")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "application/json"
        bodies.append(resp.read())
    conn.close()
    bodies.append(_h11_get(a.api_port, "/v1/members"))
    for body in bodies:
        members = json.loads(body)
        assert body == (json.dumps(members) + "\n").encode()  # per-member pieces join like json.dumps
        assert [m["name"] for m in members] == ["m1", "m2"]
        assert members[0]["tags"] == {} and members[0]["status"] == "alive"
    assert bodies[0] == bodies[2] or json.loads(bodies[0])[1]["rtt_ms"] != json.loads(bodies[2])[1]["rtt_ms"]
    alive = json.loads(_h11_get(a.api_port, "/v1/members?status=alive"))
    assert [m["name"] for m in alive] == ["m1", "m2"]
