"""The API port under abuse, on a real agent: garbage, oversized heads and bodies, a slow client, and a
thousand idle connections at once.  Throughout, an authorized client is served and gossip goes on."""

from __future__ import annotations

import os
import random
import resource
import socket
import time
from collections.abc import Iterator

import pytest

from simulations.harness import AgentProc, Cluster, wait_for

pytestmark = pytest.mark.slow

IDLE_CONNECTIONS = 1000


@pytest.fixture
def many_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send ``data``, half-close, and read what comes back until the agent closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the agent may close first on an oversized request
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def served(a: AgentProc) -> bool:
    return set(a.members()) == {"fz-a", "fz-b"}


def test_the_api_survives_abuse_and_keeps_serving(cluster: Cluster, many_files: None) -> None:
    a = cluster.start("fz-a")
    b = cluster.start("fz-b", join=[a.addr])
    cluster.wait_converged(["fz-a", "fz-b"])
    # The agent lifted its open-files soft limit to the hard one at start.
    limits = open(f"/proc/{a.popen.pid}/limits").read()
    row = next(ln for ln in limits.splitlines() if ln.startswith("Max open files")).split()
    assert row[3] == row[4], row

    idle = []
    for _ in range(IDLE_CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", a.api_port), timeout=10)
        idle.append(s)
    try:
        assert served(a)  # with a thousand idle connections open
        rng = random.Random(24)
        host = f"Host: 127.0.0.1:{a.api_port}\r\n"
        abuse = [
            b"GET /v1/members HTTP/1.1\r\n" + host.encode() + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            b"GET /" + b"v" * 70_000 + b" HTTP/1.1\r\n" + host.encode() + b"\r\n",
            b"GET /v1/members HTTP/1.1\r\n" + host.encode() + b"".join(b"X-%d: y\r\n" % i for i in range(10_000))
            + b"\r\n",
            b"PUT /v1/services HTTP/1.1\r\n" + host.encode() + b"Content-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n" + b"{" * 2_000_000,
            b"PUT /v1/services HTTP/1.1\r\n" + host.encode() + b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
            b"POST /v1/join HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 1_500_000,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 4,
            b"GET /v1/members HTTP/1.1\r\n\r\n",  # no Host: RFC 9112 §3.2 makes it a 400
            b"\r\n" * 10_000,
        ]
        for _ in range(150):
            blob = rng.randbytes(rng.randrange(1, 4096))
            if rng.random() < 0.5:
                blob = rng.choice([b"GET ", b"PUT /v1/services HTTP/1.1\r\n", b"POST /v1/keys HTTP/1.0\r\n"]) + blob
            abuse.append(blob)
        answers = [exchange(a.api_port, blob) for blob in abuse]
        for blob, answer in zip(abuse, answers, strict=True):
            # Either a 4xx answer or a plain close: never a 2xx, never a 5xx.
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), (blob[:80], answer[:200])
        assert sum(ans.startswith(b"HTTP/1.1 4") for ans in answers) > len(abuse) // 2

        # A slow client: one byte a second.  Meanwhile the agent serves and gossips.
        slow = socket.create_connection(("127.0.0.1", a.api_port), timeout=30)
        request = f"GET /v1/members HTTP/1.1\r\nHost: 127.0.0.1:{a.api_port}\r\n\r\n".encode()
        started = time.monotonic()
        answer = b""
        for i in range(len(request)):
            try:
                slow.sendall(request[i:i + 1])
            except OSError:
                break
            slow.settimeout(1.0)
            try:
                answer = slow.recv(65536)
            except TimeoutError:
                continue
            break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.monotonic() - started < 20
        slow.close()
        assert served(a) and a.running()
        assert b.members()["fz-a"]["status"] == "alive"
    finally:
        for s in idle:
            s.close()
    # Idle connections are closed by the agent after their request timeout; gossip went on all along.
    wait_for(lambda: served(a), 10, "the agent still serving")
    before = a.info()["counters"]
    time.sleep(2)
    after = a.info()["counters"]
    assert after.get("udp_packets_in", 0) > before.get("udp_packets_in", 0), (before, after)
    assert b.members()["fz-a"]["status"] == "alive" and a.members()["fz-b"]["status"] == "alive"
    assert os.path.exists(f"/proc/{a.popen.pid}")
