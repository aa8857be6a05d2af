"""Real agent processes on loopback: join, failure detection, leave, restart, pause.

These are the membership core's acceptance tests.  Bounds come from the
protocol (the `local` profile's timings), with slack for a noisy 2-core box;
speed goals live in simulations/bench_cluster.py, not here.
"""

from __future__ import annotations

import signal
import time

import pytest

from gossip.config import LOCAL
from simulations.harness import Cluster

pytestmark = pytest.mark.slow

N = 5
# SWIM: every member is probed at least once per round of N-1 periods; then the
# suspicion runs at most its max timeout, and gossip needs a few rounds.
DETECTION_BOUND = (N - 1) * LOCAL.probe_interval + LOCAL.probe_timeout + LOCAL.suspicion_max(N)
SLACK = 10.0


def start_five(cluster: Cluster) -> list[str]:
    names = [f"n{i}" for i in range(1, N + 1)]
    seed = cluster.start(names[0])
    for n in names[1:]:
        cluster.start(n, join=[seed.addr])
    cluster.wait_converged(names)
    return names


def test_five_agents_join_through_one_seed(cluster: Cluster) -> None:
    names = start_five(cluster)
    for a in cluster.up():
        ms = a.members()
        assert sorted(ms) == names
        assert all(m["status"] == "alive" for m in ms.values())
        info = a.info()
        assert info["members"]["alive"] == N
        assert info["encrypted"] is True


def test_kill_9_is_seen_dead_everywhere_within_the_suspicion_bound(cluster: Cluster) -> None:
    start_five(cluster)
    victim = cluster.agents["n4"]
    victim.signal(signal.SIGKILL)
    victim.popen.wait(5)
    took = cluster.wait_status("n4", "dead", DETECTION_BOUND + SLACK)
    print(f"kill -9 seen dead by all in {took:.2f}s (bound {DETECTION_BOUND:.1f}s)")
    # Nobody else was harmed.
    for obs, view in cluster.statuses().items():
        assert all(view[n] == "alive" for n in view if n != "n4"), (obs, view)
    # Its host answered the pings with ICMP port unreachable, and refused the TCP
    # fallback pings that followed at once: probes failed without waiting out the period.
    counters = [a.info()["counters"] for a in cluster.up() if a.name != "n4"]
    assert sum(c.get("probes_unreachable", 0) for c in counters) >= 1
    assert sum(c.get("probes_refused", 0) for c in counters) >= 1


def test_graceful_leave_shows_left_never_dead(cluster: Cluster) -> None:
    start_five(cluster)
    leaver = cluster.agents["n3"]
    leaver.signal(signal.SIGTERM)
    assert leaver.popen.wait(15) == 0
    cluster.wait_status("n3", "left", 10)
    # It stays "left": wait past the suspicion bound and check again.
    time.sleep(LOCAL.suspicion_max(N) / 2)
    for view in cluster.statuses().values():
        assert view["n3"] == "left"


def test_leave_through_the_cli_command(cluster: Cluster) -> None:
    start_five(cluster)
    leaver = cluster.agents["n2"]
    out = leaver.call("POST", "/v1/leave")
    assert out["ok"] is True
    assert leaver.popen.wait(15) == 0
    cluster.wait_status("n2", "left", 10)


def test_restarted_agent_rejoins_with_higher_incarnation(cluster: Cluster) -> None:
    start_five(cluster)
    old = cluster.agents["n5"]
    before = old.members()["n5"]["incarnation"]
    old.signal(signal.SIGKILL)
    old.popen.wait(5)
    cluster.wait_status("n5", "dead", DETECTION_BOUND + SLACK)
    new = cluster.start("n5", join=[cluster.agents["n1"].addr], gossip_port=old.gossip_port, api_port=old.api_port)
    cluster.wait_status("n5", "alive", 20)
    cluster.wait_converged([f"n{i}" for i in range(1, N + 1)])
    inc_everywhere = {a.name: a.members()["n5"]["incarnation"] for a in cluster.up()}
    assert all(i > before for i in inc_everywhere.values()), inc_everywhere
    assert new.members()["n5"]["incarnation"] == max(inc_everywhere.values())


def test_paused_agent_is_marked_dead_then_refutes_after_sigcont(cluster: Cluster) -> None:
    names = start_five(cluster)
    sleeper = cluster.agents["n2"]
    sleeper.signal(signal.SIGSTOP)
    try:
        others = [a for a in cluster.up() if a.name != "n2"]
        cluster.wait_status("n2", "dead", DETECTION_BOUND + SLACK, observers=others)
    finally:
        sleeper.signal(signal.SIGCONT)
    cluster.wait_converged(names, timeout=LOCAL.push_pull_interval + 15)
    incs = {a.name: a.members()["n2"]["incarnation"] for a in cluster.up()}
    assert all(i >= 1 for i in incs.values()), incs
    assert "refute" in sleeper.log()


def test_second_agent_with_a_live_name_is_refused(cluster: Cluster) -> None:
    names = start_five(cluster)
    original = cluster.agents["n2"]
    impostor = cluster.start("n2", join=[cluster.agents["n1"].addr])
    # Both sides say why, and nobody's view of n2 moves.
    from simulations.harness import wait_for

    wait_for(lambda: "join_refused_by_peer" in impostor.log(), 15, "impostor logs the refusal",
             lambda: impostor.log()[-2000:])
    assert "join_refused" in cluster.agents["n1"].log()
    assert "already alive at" in impostor.log()
    for name in names:
        if name == "n2":
            continue
        m = cluster.agents[name].members()["n2"]
        assert m["address"] == original.addr and m["status"] == "alive"
    assert impostor.running(), "a refused agent keeps running and retrying"
    assert impostor.info()["joined"] is False
