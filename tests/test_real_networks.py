"""Membership on real networks, with real agents on loopback: IPv6, strangers' keys, NAT hints, UDP blocked."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from gossip.keyring import Keyring, decode_key, generate_key
from gossip.wire import Ping, encode_packet
from simulations.harness import ROOT, Cluster, free_port, wait_for

pytestmark = pytest.mark.slow


def v6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_three_agents_converge_on_ipv6_loopback(cluster: Cluster) -> None:
    if not v6_available():
        pytest.skip("no IPv6 loopback on this machine")
    ports = {n: free_port() for n in ("six1", "six2", "six3")}

    def start(name: str, join: list[str]) -> None:
        cluster.start(name, gossip_port=ports[name], join=join,
                      extra=["--bind", f"[::1]:{ports[name]}", "--tunnel", "[::1]:0"])

    start("six1", [])
    start("six2", [f"[::1]:{ports['six1']}"])
    start("six3", [f"[::1]:{ports['six1']}"])
    cluster.wait_converged(["six1", "six2", "six3"])
    members = cluster.agents["six3"].members()
    assert members["six1"]["address"] == f"[::1]:{ports['six1']}"
    # The data plane rides the same addresses.
    assert members["six1"]["tunnel"].startswith("[::1]:")


def test_a_host_name_seed_is_resolved(cluster: Cluster) -> None:
    a = cluster.start("h1")
    cluster.start("h2", join=[f"localhost:{a.gossip_port}"])
    cluster.wait_converged(["h1", "h2"])


def test_packets_no_key_opens_are_counted_per_source_and_named_in_info(cluster: Cluster) -> None:
    a = cluster.start("n1")
    stranger = Keyring(decode_key(generate_key()))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        src = s.getsockname()[1]
        for _ in range(14):
            s.sendto(stranger.seal(encode_packet([Ping(1, "n1", "x")])), ("127.0.0.1", a.gossip_port))
    wait_for(lambda: bool(a.info()["undecryptable"]), 10, "stranger counted")
    [row] = a.info()["undecryptable"]
    assert row["source"] == f"127.0.0.1:{src}" and row["packets_last_minute"] == 14
    assert "is its key different?" in row["hint"]
    out = subprocess.run([sys.executable, "-m", "cli.main", "info", "--api", a.api], capture_output=True,
                         text=True, cwd=ROOT, timeout=30).stdout
    assert f"127.0.0.1:{src}: 14 packets in the last minute opened with no installed key" in out


def test_a_member_heard_from_another_address_is_reported_once(cluster: Cluster, cluster_key: str) -> None:
    a = cluster.start("t1")
    b = cluster.start("t2", join=[a.addr])
    cluster.wait_converged(["t1", "t2"])
    ring = Keyring(decode_key(cluster_key))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        other = s.getsockname()[1]
        for seq in range(3):  # as if t2 sat behind a NAT that rewrote its source port
            s.sendto(ring.seal(encode_packet([Ping(seq, "t1", "t2")])), ("127.0.0.1", a.gossip_port))
    wait_for(lambda: "address_mismatch" in a.log(), 10, "mismatch logged")
    lines = [json.loads(x) for x in a.log().splitlines() if '"address_mismatch"' in x]
    assert len(lines) == 1
    assert lines[0]["advertised"] == b.addr and lines[0]["seen"] == f"127.0.0.1:{other}"


def test_a_member_restarted_at_a_new_port_keeps_its_name_and_a_new_key_cannot_take_it(
        cluster: Cluster, tmp_path: object) -> None:
    from pathlib import Path

    data = Path(str(tmp_path)) / "data-m3"
    a = cluster.start("m1")
    cluster.start("m2", join=[a.addr])
    old = cluster.start("m3", join=[a.addr], extra=["--data-dir", str(data)])
    cluster.wait_converged(["m1", "m2", "m3"])
    old.signal(9)
    old.popen.wait(5)
    # Back at once on another port, same data dir (so the same identity key): it is not
    # refused as a name conflict, and everyone moves it before its old self could be declared dead.
    moved = cluster.start("m3", join=[a.addr], extra=["--data-dir", str(data)])
    assert moved.gossip_port != old.gossip_port
    wait_for(lambda: all(x.members()["m3"]["address"] == moved.addr and x.members()["m3"]["status"] == "alive"
                         for x in (cluster.agents["m1"], cluster.agents["m2"])), 15, "m3 moved everywhere")
    assert "member_moved" in cluster.agents["m1"].log()
    # An agent with another key claiming the live name is refused; both sides say why.
    impostor = Cluster(Path(str(tmp_path)) / "imp", cluster.key)
    (Path(str(tmp_path)) / "imp").mkdir()
    try:
        bad = impostor.start("m3", join=[a.addr])
        wait_for(lambda: "join_refused_by_peer" in bad.log(), 15, "the impostor told why")
        assert "m3" in a.log() and "join_refused" in a.log()
        assert a.members()["m3"]["address"] == moved.addr
        assert bad.info()["join_error"]
    finally:
        impostor.close()
