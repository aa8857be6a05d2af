"""An agent restarted with a new identity (a rebuilt node, or one whose keys could not be kept) takes its
name back at every moment of its old self's life -- alive, suspect, dead -- at the same address or a new
one; a live impostor is refused; and a plain restart without --data-dir keeps its identity."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_proxy import echo_server

from simulations.harness import AgentProc, Cluster, free_port, wait_for

pytestmark = pytest.mark.slow



def through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(payload)
        got = b""
        while len(got) < len(payload):
            d = c.recv(65536)
            if not d:
                break
            got += d
        return got


def calls_work(port: int) -> bool:
    try:
        return through(port, b"ping-through-the-mesh") == b"ping-through-the-mesh"
    except OSError:
        return False


def own_key(agent: AgentProc) -> str:
    return str(agent.members()[agent.name]["tunnel_key"])


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    p = echo_server(port)
    conf = tmp_path / "s2.toml"
    conf.write_text(f'[[service]]\nname = "echo"\nport = {port}\naddress = "127.0.0.1"\n')
    yield port, conf
    p.kill()
    p.wait(timeout=5)


@pytest.mark.parametrize("moment,same_address", [
    ("unprobed", True), ("push-pulling", True), ("alive", True), ("suspect", True), ("dead", True),
    ("alive", False), ("dead", False),
])
def test_a_restart_with_a_new_identity_converges_and_carries_traffic(
        cluster: Cluster, echo: tuple[int, Path], moment: str, same_address: bool, tmp_path: Path) -> None:
    """"unprobed": the peers probe so rarely that nobody notices the old process go before the new one
    answers at its address, which then acks every probe meant for the old one -- the race that left
    peers on the old identity for good.  "push-pulling": the peers push-pull with someone every 50 ms,
    so that exchanges with the old process are in flight when it is killed and the new one starts."""
    _, conf = echo
    peer_extra: list[str] = []
    if moment in ("unprobed", "push-pulling"):
        timing = tmp_path / "timing.toml"
        timing.write_text("[timing]\nprobe_interval = 60.0\n" if moment == "unprobed"
                          else "[timing]\npush_pull_interval = 0.05\n")
        peer_extra = ["--config", str(timing)]
    a = cluster.start("ra", extra=peer_extra)
    b = cluster.start("rb", join=[a.addr], extra=peer_extra)
    # Each run of s2 its own data dir: a rebuilt node, with a new identity.
    s2 = cluster.start("s2", join=[a.addr], extra=["--config", str(conf), "--data-dir", str(tmp_path / "s2-old")])
    cluster.wait_converged(["ra", "rb", "s2"])
    listen = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "echo", "listen": f"127.0.0.1:{listen}"})
    wait_for(lambda: calls_work(listen), 15, "calls reach echo on s2")
    old_key = own_key(s2)

    s2.signal(signal.SIGKILL)
    s2.popen.wait(timeout=5)
    if moment in ("suspect", "dead"):
        cluster.wait_status("s2", moment, 30, observers=[a, b])
    started = time.monotonic()
    again = cluster.start("s2", join=[a.addr], gossip_port=s2.gossip_port if same_address else None,
                          extra=["--config", str(conf), "--data-dir", str(tmp_path / "s2-new")])
    new_key = own_key(again)
    assert new_key != old_key  # no --data-dir: a new identity

    def converged() -> bool:
        views = [o.try_members() or {} for o in (a, b)]
        return all(v.get("s2", {}).get("status") == "alive" and v["s2"]["tunnel_key"] == new_key
                   and v["s2"]["address"] == again.addr for v in views)

    wait_for(converged, 30, f"ra and rb hold s2's new identity (restart while {moment})",
             lambda: repr([(o.name, (o.try_members() or {}).get("s2")) for o in (a, b)]))
    took = time.monotonic() - started
    wait_for(lambda: calls_work(listen), 15, "calls reach echo on the restarted s2")
    print(f"restart while {moment}, {'same' if same_address else 'new'} address: converged in {took:.1f}s")
    assert '"name_conflict"' not in again.log()  # its former self is not reported as an impostor


def test_a_live_impostor_elsewhere_is_refused(cluster: Cluster, echo: tuple[int, Path]) -> None:
    _, conf = echo
    a = cluster.start("ia")
    b = cluster.start("ib", join=[a.addr])
    s2 = cluster.start("s2", join=[a.addr], extra=["--config", str(conf)])
    cluster.wait_converged(["ia", "ib", "s2"])
    real = own_key(s2)
    impostor = cluster.start("s2", join=[a.addr, b.addr])
    wait_for(lambda: any(f'"{e}"' in o.log() for o in (a, b) for e in ("name_conflict", "join_refused")), 15,
             "the claim is noticed and refused")
    time.sleep(3)  # longer than a verification and a gossip round or two
    for o in (a, b):
        held = o.members()["s2"]
        assert held["tunnel_key"] == real and held["address"] == s2.addr and held["status"] == "alive", held
    assert impostor.running() and s2.running()


def test_without_data_dir_a_restart_keeps_its_identity_and_two_agents_never_share_it(
        cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.start("ka")
    k = cluster.start("kk", join=[a.addr])
    cluster.wait_converged(["ka", "kk"])
    before = own_key(k)
    place = tmp_path / "state" / "mesh-agent" / "identity" / f"kk@127.0.0.1_{k.gossip_port}"
    assert f'"identity": "{place}"' in k.log()
    assert oct((place / "identity.key").stat().st_mode & 0o777) == "0o600"
    k.signal(signal.SIGKILL)
    k.popen.wait(timeout=5)
    again = cluster.start("kk", join=[a.addr], gossip_port=k.gossip_port)
    assert own_key(again) == before  # the same identity: peers need to learn nothing
    wait_for(lambda: a.members()["kk"]["status"] == "alive" and a.members()["kk"]["tunnel_key"] == before, 15,
             "ka holds kk, same key")
    # An explicit --data-dir in use by a running agent is refused at start, in one line.
    data = tmp_path / "shared"
    cluster.start("sh1", extra=["--data-dir", str(data)])
    p = subprocess.run([sys.executable, "-m", "cli.main", "agent", "--name", "sh2", "--insecure",
                        "--bind", f"127.0.0.1:{free_port()}", "--api", f"127.0.0.1:{free_port()}",
                        "--data-dir", str(data)], capture_output=True, text=True, timeout=30,
                       cwd=str(Path(__file__).resolve().parent.parent))
    assert p.returncode == 1 and "in use by another agent" in p.stderr and len(p.stderr.strip().splitlines()) == 1
