"""Service traffic through the mesh: upstream port -> Noise tunnel -> instance."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.harness import ROOT, Cluster, free_port, wait_for, wait_port

pytestmark = pytest.mark.slow

ECHO = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                c.shutdown(socket.SHUT_WR); return
            c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def echo_server(port: int) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", ECHO, str(port)], start_new_session=True)
    wait_port(port, "echo server up")
    return p


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            d = c.recv(65536)
            if not d:
                return b"".join(chunks)
            chunks.append(d)


def expect_reset(port: int, payload: bytes) -> None:
    """The proxy must fail loudly (RST), never end the stream as if all went well."""
    try:
        got = roundtrip(port, payload)
    except ConnectionResetError:
        return
    pytest.fail(f"expected a connection reset, got a clean end of stream after {len(got)} bytes")


def cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args, "--api", api], capture_output=True,
                          text=True, cwd=ROOT, timeout=30)


def test_bytes_cross_the_mesh_byte_exact(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.start("p1")
    cluster.start("p2", join=[a.addr])
    c = cluster.start("p3", join=[a.addr])
    cluster.wait_converged(["p1", "p2", "p3"])
    echo_port = free_port()
    echo = echo_server(echo_port)
    try:
        c.call("PUT", "/v1/services", {"name": "echo", "port": echo_port, "address": "127.0.0.1"})
        wait_for(lambda: len(a.call("GET", "/v1/services/echo?passing")) == 1, 10, "echo visible on p1")
        listen = free_port()
        p = cli(a.api, "upstreams", "add", "--service", "echo", "--listen", f"127.0.0.1:{listen}", "--json")
        assert p.returncode == 0, p.stderr
        payload = os.urandom(3 * 1024 * 1024 + 17)
        got = roundtrip(listen, payload)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest() and len(got) == len(payload)
        # Many small connections share one tunnel session: one handshake.
        for i in range(20):
            msg = f"hello {i}".encode()
            assert roundtrip(listen, msg) == msg
        info = a.info()["counters"]
        assert info.get("dataplane.handshakes_ok", 0) + c.info()["counters"].get("dataplane.handshakes_ok", 0) <= 2
        ups = json.loads(cli(a.api, "upstreams", "--json").stdout)
        assert ups[0]["service"] == "echo" and ups[0]["connections"] >= 21
        # A local instance is reached directly, no tunnel.
        local_listen = free_port()
        c.call("PUT", "/v1/upstreams", {"service": "echo", "listen": f"127.0.0.1:{local_listen}"})
        assert roundtrip(local_listen, b"direct") == b"direct"
    finally:
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait(5)


def test_no_instance_or_dead_instance_fails_loudly(cluster: Cluster) -> None:
    a = cluster.start("q1")
    b = cluster.start("q2", join=[a.addr])
    cluster.wait_converged(["q1", "q2"])
    listen = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "ghost", "listen": f"127.0.0.1:{listen}"})
    expect_reset(listen, b"anyone?")
    # An instance whose process is gone: the far agent cannot connect -> reset, not a clean empty answer.
    dead_port = free_port()
    b.call("PUT", "/v1/services", {"name": "gone", "port": dead_port, "address": "127.0.0.1"})
    wait_for(lambda: len(a.call("GET", "/v1/services/gone?passing")) == 1, 10, "gone visible")
    listen2 = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "gone", "listen": f"127.0.0.1:{listen2}"})
    expect_reset(listen2, b"x" * 1000)
    assert a.running() and b.running()


def test_an_upstream_that_cannot_listen_at_start_stops_the_start_in_one_line(cluster: Cluster,
                                                                            tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[[upstream]]\nservice = "web"\nlisten = "127.0.0.1:{port}"\n')
        a = cluster.start("u0", extra=["--config", str(cfg)], wait=False)
        assert a.popen.wait(30) == 1
    log = a.log()
    assert "Traceback" not in log, log
    assert log.strip().splitlines()[-1] == f"mesh-agent: upstream: cannot listen on 127.0.0.1:{port}: " \
        "Address already in use", log[-500:]


def test_upstream_errors_are_clear(cluster: Cluster) -> None:
    a = cluster.start("u1")
    port = free_port()
    assert cli(a.api, "upstreams", "add", "--service", "web", "--listen", f"127.0.0.1:{port}").returncode == 0
    p = cli(a.api, "upstreams", "add", "--service", "web", "--listen", f"127.0.0.1:{free_port()}")
    assert p.returncode == 1 and "already exists" in p.stderr and "(HTTP 409)" in p.stderr
    p = cli(a.api, "upstreams", "add", "--service", "Bad!", "--listen", "127.0.0.1:1")
    assert p.returncode == 1 and "DNS label" in p.stderr
    p = cli(a.api, "upstreams", "add", "--service", "db", "--listen", f"127.0.0.1:{port}")
    assert p.returncode == 1 and "cannot listen" in p.stderr and "(HTTP 400)" in p.stderr
    assert cli(a.api, "upstreams", "remove", "web").returncode == 0
    assert cli(a.api, "upstreams", "remove", "web").returncode == 1
    assert a.call("GET", "/v1/health")["ok"] is True


def mesh_with_echo(cluster: Cluster) -> tuple[int, subprocess.Popen[bytes], int]:
    """Two agents; an echo instance on the second; an upstream on the first."""
    a = cluster.start("m1")
    b = cluster.start("m2", join=[a.addr])
    cluster.wait_converged(["m1", "m2"])
    echo_port = free_port()
    echo = echo_server(echo_port)
    b.call("PUT", "/v1/services", {"name": "echo", "port": echo_port, "address": "127.0.0.1"})
    wait_for(lambda: len(a.call("GET", "/v1/services/echo?passing")) == 1, 10, "echo visible")
    listen = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "echo", "listen": f"127.0.0.1:{listen}"})
    return listen, echo, echo_port


def test_100_mib_and_200_concurrent_connections_arrive_byte_exact(cluster: Cluster) -> None:
    import concurrent.futures

    listen, echo, _ = mesh_with_echo(cluster)
    try:
        # 100 MiB streamed both ways at once: the request is written while the echo comes back.
        size = 100 * 1024 * 1024
        block = os.urandom(1024 * 1024)
        sent = hashlib.sha256()
        received = hashlib.sha256()
        total = 0
        with socket.create_connection(("127.0.0.1", listen), timeout=60) as c:
            import threading

            def writer() -> None:
                for i in range(size // len(block)):
                    chunk = bytes([i % 256]) + block[1:]
                    sent.update(chunk)
                    c.sendall(chunk)
                c.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=writer)
            t0 = time.monotonic()
            t.start()
            while True:
                d = c.recv(1 << 20)
                if not d:
                    break
                received.update(d)
                total += len(d)
            t.join()
        took = time.monotonic() - t0
        print(f"100 MiB echoed through the mesh in {took:.1f}s ({2 * size / took / 1e6:.0f} MB/s both ways)")
        assert total == size and received.digest() == sent.digest()

        def one(i: int) -> bool:
            payload = os.urandom(1000 + i * 37)
            return roundtrip(listen, payload) == payload

        with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
            results = list(pool.map(one, range(200)))
        assert all(results), f"{results.count(False)} of 200 connections were not byte-exact"
    finally:
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait(5)


def test_instance_dying_mid_stream_closes_the_client_promptly(cluster: Cluster) -> None:
    """Killed with nothing unread, the instance's kernel ends its side with a FIN, exactly as a close
    would: the client may see an end of stream or a reset, but promptly (the unread case is below)."""
    listen, echo, _ = mesh_with_echo(cluster)
    with socket.create_connection(("127.0.0.1", listen), timeout=30) as c:
        c.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(c.recv(65536))
        os.killpg(echo.pid, signal.SIGKILL)  # the instance's process dies mid-stream
        echo.wait(5)
        t0 = time.monotonic()
        try:
            while c.recv(65536):
                pass
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 10, "the client hung after the instance died"


def _stopped(pid: int) -> bool:
    """Every thread of ``pid`` in the stopped state (a stop signal reaches each thread in its own time)."""
    tasks = Path(f"/proc/{pid}/task")
    return all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for t in tasks.iterdir())


def _unread_at(port: int) -> int:
    """Bytes waiting unread in the receive queues of the connections accepted on ``port``."""
    out = subprocess.run(["ss", "-Htn", "state", "established", "sport", "=", f":{port}"],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines())


def test_instance_killed_with_unread_bytes_resets_the_client(cluster: Cluster) -> None:
    """The instance's kernel answers the kill with a reset (bytes were lost): the client must get one too,
    never a clean end of stream that would pass for a complete answer."""
    listen, echo, echo_port = mesh_with_echo(cluster)
    try:
        with socket.create_connection(("127.0.0.1", listen), timeout=30) as c:
            c.sendall(b"x" * 1000)
            got = 0
            while got < 1000:
                got += len(c.recv(65536))
            os.killpg(echo.pid, signal.SIGSTOP)
            wait_for(lambda: _stopped(echo.pid), 10, "every thread of the instance stopped")
            c.sendall(b"never read")
            wait_for(lambda: _unread_at(echo_port) == len(b"never read"), 10,
                     "the bytes wait at the stopped instance")
            os.killpg(echo.pid, signal.SIGKILL)
            echo.wait(5)
            with pytest.raises(ConnectionResetError):
                while c.recv(65536):
                    pass
    finally:
        if echo.poll() is None:  # a failed wait leaves it stopped: it must not outlive the test
            os.killpg(echo.pid, signal.SIGKILL)
            echo.wait(5)
