"""Hostile bytes on the gossip ports: dropped and counted, membership intact.

Malformed packets are sealed with the real cluster key where that matters, so
they get past authentication and reach the decoder -- the path an attacker
holding the key, or a buggy peer, would exercise.
"""

from __future__ import annotations

import os
import socket

import msgpack
import pytest

from gossip.keyring import Keyring, decode_key, generate_key
from gossip.wire import Ping, encode_packet
from simulations.harness import Cluster, wait_for

pytestmark = pytest.mark.slow


def udp(port: int, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, ("127.0.0.1", port))


def drops(agent: object) -> dict[str, int]:
    info = agent.info()  # type: ignore[attr-defined]
    result: dict[str, int] = info["counters"]["dropped"]
    return result


def test_garbage_on_udp_and_tcp_is_dropped_and_counted(cluster: Cluster, cluster_key: str) -> None:
    names = ["a1", "a2", "a3"]
    seed = cluster.start("a1")
    for n in names[1:]:
        cluster.start(n, join=[seed.addr])
    cluster.wait_converged(names)
    target = cluster.agents["a2"]
    ring = Keyring(decode_key(cluster_key))
    port = target.gossip_port

    good = encode_packet([Ping(7, "a2", "a1")])
    udp(port, os.urandom(200))                                   # decrypt
    udp(port, Keyring(decode_key(generate_key())).seal(good))     # decrypt (other key)
    udp(port, ring.seal(b"\xc1" * 300))  # malformed: 0xc1 is never used in msgpack (random bytes may read as truncated)
    udp(port, ring.seal(good[: len(good) // 2]))                  # truncated
    udp(port, ring.seal(msgpack.packb([99, []])))                 # version
    udp(port, ring.seal(msgpack.packb([1, [{"t": "bogus"}]])))    # unknown_type
    udp(port, ring.seal(msgpack.packb([1, [{"t": "alive", "name": 5}]])))  # malformed
    udp(port, b"\x00" * 65000)                                    # oversized

    # TCP: a client that connects and sends nothing, a garbage frame, a huge length.
    silent = socket.create_connection(("127.0.0.1", port))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall((100).to_bytes(4, "big") + os.urandom(100))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall((1 << 31).to_bytes(4, "big"))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"\x00\x00")  # truncated header, then close
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall((3).to_bytes(4, "big") + b"abc" + b"more")  # bytes after the one frame a push-pull sends

    expected = {"decrypt": 3, "malformed": 2, "truncated": 1, "version": 1, "unknown_type": 1,
                "oversized": 1, "tcp_oversized": 1, "tcp_timeout": 1, "tcp_truncated": 1,
                "tcp_trailing": 1}

    def all_counted() -> bool:
        d = drops(target)
        return all(d.get(k, 0) >= v for k, v in expected.items())

    try:
        wait_for(all_counted, 15, "every bad input counted", lambda: str(drops(target)))
    finally:
        silent.close()
    assert target.running()
    cluster.wait_converged(names)
    # The membership still works afterwards: a kill is still detected.
    cluster.agents["a3"].signal(9)
    cluster.wait_status("a3", "dead", 20)


def test_insecure_agent_counts_plaintext_garbage(tmp_path: object) -> None:
    c = Cluster(tmp_path, key=None)  # type: ignore[arg-type]
    try:
        a = c.start("solo")
        assert a.info()["encrypted"] is False
        assert "insecure_mode" in a.log()
        udp(a.gossip_port, b"\xc1\xc1\xc1")       # never-used msgpack byte
        udp(a.gossip_port, msgpack.packb([1, [{"t": "ping", "seq": 1}]]))
        udp(a.gossip_port, b"")
        wait_for(lambda: sum(drops(a).values()) >= 3, 10, "drops counted", lambda: str(drops(a)))
        assert a.running()
        assert list(a.members()) == ["solo"]
    finally:
        c.close()


def test_api_answers_bad_requests_with_json_errors(cluster: Cluster) -> None:
    import json
    import urllib.error
    import urllib.request

    a = cluster.start("api1")

    def status_of(method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str]]:
        req = urllib.request.Request(f"http://{a.api}{path}", data=body, method=method,
                                     headers={} if body is None else {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    assert status_of("GET", "/v1/nope")[0] == 404
    assert status_of("DELETE", "/v1/members")[0] == 405
    code, body = status_of("POST", "/v1/join", b"{not json")
    assert code == 400 and "JSON" in body["error"]
    code, body = status_of("POST", "/v1/join", b'{"addresses": ["no-port-here:x"]}')
    assert code == 400 and body["error"]
    assert status_of("GET", "/v1/members?status=zombie")[0] == 400
    assert status_of("GET", "/v1/health") == (200, {"ok": True, "name": "api1", "status": "alive"})
    # Raw garbage on the API port does not hurt the agent.
    with socket.create_connection(("127.0.0.1", a.api_port)) as s:
        s.sendall(b"\x16\x03\x01 garbage\r\n\r\n")
        s.settimeout(5)
        reply = s.recv(1000)
        assert reply.startswith(b"HTTP/1.1 400")
    assert a.call("GET", "/v1/health")["ok"] is True  # it answered the garbage, and answers still


def test_api_keeps_connections_alive_and_closes_when_asked(cluster: Cluster) -> None:
    import http.client
    import json

    a = cluster.start("api2")
    conn = http.client.HTTPConnection("127.0.0.1", a.api_port, timeout=5)
    local_ports = set()
    for _ in range(5):
        conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["name"] == "api2"
        assert resp.getheader("connection") is None
        assert conn.sock is not None
        local_ports.add(conn.sock.getsockname()[1])
    assert len(local_ports) == 1  # five requests, one TCP connection
    # A POST with a body on the same connection.
    conn.request("POST", "/v1/join", body=b"{not json", headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and resp.getheader("connection") == "close"  # errors close
    resp.read()
    conn.close()
    # Two pipelined requests, the second asking to close: both answered, then EOF.
    with socket.create_connection(("127.0.0.1", a.api_port)) as s:
        s.settimeout(5)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                  b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 2
    assert a.running()
