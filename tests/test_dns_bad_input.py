"""Bad input to the DNS server: dropped and counted, never answered, never a crash; a flood does not starve others."""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import dns.message
import dns.query
import dns.rcode
import pytest

from gossip.keyring import generate_key
from simulations.harness import AgentProc, Cluster, Processes, free_port, wait_for

pytestmark = pytest.mark.slow


@dataclass
class Target:
    agent: AgentProc
    peer: AgentProc
    port: int


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    cluster = Cluster(tmp_path_factory.mktemp("dnsbad"), generate_key())
    try:
        port = free_port()
        a = cluster.start("b1", extra=["--dns", f"127.0.0.1:{port}"])
        b = cluster.start("b2", join=[a.addr])
        cluster.wait_converged(["b1", "b2"])
        a.call("PUT", "/v1/services", {"name": "web", "port": 80, "address": "127.0.0.1"})
        yield Target(a, b, port)
    finally:
        cluster.close()


def dropped(t: Target) -> dict[str, int]:
    result: dict[str, int] = t.agent.info()["dns"]["dropped"]
    return result


def still_answers(t: Target, source: str = "127.0.0.1") -> None:
    q = dns.message.make_query("web.service.mesh", "A")
    r = dns.query.udp(q, "127.0.0.1", port=t.port, timeout=3, source=source)
    assert r.rcode() == dns.rcode.NOERROR and [rr.address for rr in r.answer[0]] == ["127.0.0.1"]


def send_udp(t: Target, payloads: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in payloads:
            s.sendto(p, ("127.0.0.1", t.port))
            time.sleep(0.0005)


def header(qid: int = 0x1234, flags: int = 0x0100, qd: int = 1) -> bytes:
    return struct.pack("!HHHHHH", qid, flags, qd, 0, 0, 0)


def expect_drops(t: Target, reason: str, n: int, before: dict[str, int]) -> None:
    wait_for(lambda: dropped(t).get(reason, 0) - before.get(reason, 0) >= n, 10,
             f"{n} more drops counted as {reason}", lambda: str(dropped(t)))


def test_random_bytes_are_dropped(target: Target) -> None:
    rnd = random.Random(29)
    before = dropped(target)
    junk = [rnd.randbytes(rnd.randrange(1, 600)) for _ in range(500)]
    # Never valid queries: too short for a header, or a response's QR bit, or a question that is garbage.
    junk = [j if len(j) < 12 else j[:2] + bytes([j[2] | 0x80]) + j[3:] if rnd.random() < 0.3 else
            header(flags=0, qd=1) + b"\xff" + j for j in junk]
    send_udp(target, junk)
    wait_for(lambda: sum(dropped(target).values()) - sum(before.values()) >= len(junk), 10,
             "every junk datagram counted as dropped", lambda: str(dropped(target)))
    still_answers(target)


def test_truncated_oversized_loops_and_responses(target: Target) -> None:
    q = dns.message.make_query("web.service.mesh", "A").to_wire()
    cases = {
        "truncated": [q[:7], q[:11]],                          # cut inside the header
        "malformed": [
            q[:-3], q[:12],                                    # cut inside the question, or before it
            header() + b"\xc0\x0c" + b"\x00\x01\x00\x01",      # the question's name points at itself
            header() + b"\x03web\xc0\x0c\x00\x01\x00\x01",     # a label, then a loop back to the start
            header() + b"\xc0\x20" + b"\x00\x01\x00\x01",      # a pointer forward, past the message
            header(qd=3) + b"\x03web\x00\x00\x01\x00\x01",     # counts that promise more than is there
        ],
        "oversized": [header() + b"\x00" * 5000],
        "not_a_query": [q[:2] + bytes([q[2] | 0x80]) + q[3:]],  # a response: never answered (no reflection)
    }
    for reason, payloads in cases.items():
        before = dropped(target)
        send_udp(target, payloads)
        expect_drops(target, reason, len(payloads), before)
        still_answers(target)


def test_bad_tcp_streams_are_closed_and_counted(target: Target) -> None:
    before = dropped(target)
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as s:
        s.sendall(struct.pack("!H", 60000) + b"\x00" * 100)     # a length past any query
        assert s.recv(100) == b""                               # closed, not answered
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as s:
        s.sendall(struct.pack("!H", 40) + b"\x12\x34\x01")     # promises 40 bytes, sends 3, then ends
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
    expect_drops(target, "oversized", 1, before)
    expect_drops(target, "truncated", 1, before)
    # A good query over TCP still works, twice on one connection.
    q = dns.message.make_query("web.service.mesh", "A")
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as s:
        for _ in range(2):
            dns.query.send_tcp(s, q)
            r, _ = dns.query.receive_tcp(s, time.time() + 5)
            assert r.id == q.id and [rr.address for rr in r.answer[0]] == ["127.0.0.1"]


FLOOD = r"""
import socket, sys, time
port, rate, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
q = bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.setblocking(False)
start = time.monotonic(); sent = 0
while (now := time.monotonic()) - start < seconds:
    due = int((now - start) * rate)
    while sent < due:
        try:
            s.sendto(q, ("127.0.0.1", port))
        except BlockingIOError:
            pass
        sent += 1
    try:
        while s.recv(4096):  # read the answers, so they cost the agent what they would
            pass
    except BlockingIOError:
        pass
    time.sleep(0.001)
print("sent", sent)
"""


def test_a_flood_from_one_source_does_not_starve_another(target: Target, procs: Processes) -> None:
    before = dropped(target)
    packets_before = target.agent.info()["counters"]["udp_packets_in"]
    q = dns.message.make_query("web.service.mesh", "A").to_wire()
    seconds = 6.0
    flood = procs.python(FLOOD, target.port, 10_000, seconds, q.hex())
    time.sleep(1.0)  # the flood is on
    answered = 0
    t_end = time.monotonic() + seconds - 2.0
    while time.monotonic() < t_end:
        # Another client, from another address: answered every time (a resolver's retry allowed).
        for attempt in range(3):
            try:
                still_answers(target, source="127.0.0.2")
                break
            except dns.exception.Timeout:
                if attempt == 2:
                    raise
        answered += 1
        # Gossip goes on: the peer stays alive in the flooded agent's view.
        assert target.agent.members()["b2"]["status"] == "alive"
        time.sleep(0.05)
    assert flood.wait(timeout=30) == 0
    assert answered > 10
    expect_drops(target, "rate_limited", 1000, before)
    assert target.agent.info()["counters"]["udp_packets_in"] > packets_before
    assert target.peer.members()["b1"]["status"] == "alive"
    still_answers(target)


def test_random_bytes_over_tcp(target: Target) -> None:
    before = dropped(target)
    for i in range(20):
        body = os.urandom(30 + i)
        body = body[:2] + bytes([body[2] & 0x7F]) + b"\x00" + b"\x00\x01" + body[6:]
        with socket.create_connection(("127.0.0.1", target.port), timeout=5) as s:
            s.sendall(struct.pack("!H", len(body)) + body)
            got = s.recv(4096)
        if got:  # random bytes that dnspython reads as a query get a real DNS answer, nothing else
            r = dns.message.from_wire(got[2:])
            assert r.id == int.from_bytes(body[:2], "big")
    assert sum(dropped(target).values()) > sum(before.values())
    still_answers(target)
