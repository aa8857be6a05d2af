"""`mesh-agent force-leave NODE`: a member that will never come back shows left everywhere, on real agents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from simulations.harness import ROOT, Cluster


def cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args, "--api", api], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_dead_member_forced_out_shows_left_everywhere_until_it_really_rejoins(cluster: Cluster) -> None:
    a = cluster.start("fl-a")
    b = cluster.start("fl-b", join=[a.addr])
    c = cluster.start("fl-c", join=[a.addr])
    cluster.wait_converged(["fl-a", "fl-b", "fl-c"])
    # A live member is not removed by it: it refutes and stays.
    p = cli(a.api, "force-leave", "fl-b", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["was"] == "alive"
    cluster.wait_status("fl-b", "alive", 10)
    c.signal(signal.SIGKILL)
    c.popen.wait(timeout=5)
    cluster.wait_status("fl-c", "dead", 30, observers=[a, b])
    p = cli(a.api, "force-leave", "fl-c")
    assert p.returncode == 0 and "fl-c (was dead)" in p.stdout
    cluster.wait_status("fl-c", "left", 10, observers=[a, b])
    p = cli(a.api, "force-leave", "fl-nobody")
    assert p.returncode == 1 and "no member named" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = cli(a.api, "force-leave", "fl-a")
    assert p.returncode == 1 and "use a graceful leave" in p.stderr
    # It comes back only by rejoining.
    cluster.start("fl-c", join=[a.addr], gossip_port=c.gossip_port)
    cluster.wait_status("fl-c", "alive", 20, observers=[a, b])
