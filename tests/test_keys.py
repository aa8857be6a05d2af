"""Cluster-wide key rotation with real agents: `mesh-agent keys list|install|use|remove`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gossip.keyring import generate_key
from simulations.harness import ROOT, Cluster, wait_for

pytestmark = pytest.mark.slow


def keys(api: str, *args: str) -> tuple[int, dict[str, object], str]:
    p = subprocess.run([sys.executable, "-m", "cli.main", "keys", *args, "--api", api, "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    data = json.loads(p.stdout) if p.stdout.strip() else {}
    return p.returncode, data, p.stderr


def all_alive(cluster: Cluster, names: list[str]) -> bool:
    st = cluster.statuses([cluster.agents[n] for n in names])
    return len(st) == len(names) and all(all(v.get(n) == "alive" for n in names) for v in st.values())


def test_rotate_the_cluster_key_without_losing_anyone(cluster: Cluster, tmp_path: Path, cluster_key: str) -> None:
    names = ["k1", "k2", "k3"]
    dirs = {n: tmp_path / f"data-{n}" for n in names}
    a = cluster.start("k1", extra=["--data-dir", str(dirs["k1"])])
    for n in names[1:]:
        cluster.start(n, join=[a.addr], extra=["--data-dir", str(dirs[n])])
    cluster.wait_converged(names)

    code, data, _ = keys(a.api, "list")
    assert code == 0 and data["members"] == 3 and data["acked"] == 3
    assert data["keys"] == {cluster_key: 3} and data["primary"] == {cluster_key: 3}

    new = generate_key()
    for op in ("install", "use"):
        code, data, err = keys(a.api, op, new)
        assert code == 0, (op, data, err)
        assert data["acked"] == 3 and data["failed"] == {} and data["missing"] == []
        assert all_alive(cluster, names)
    code, data, _ = keys(a.api, "list")
    assert data["keys"] == {cluster_key: 3, new: 3} and data["primary"] == {new: 3}

    # The primary cannot be removed; the old key can.
    code, _, err = keys(a.api, "remove", new)
    assert code == 1 and "refusing to remove the primary key" in err and "Traceback" not in err
    code, data, _ = keys(cluster.agents["k2"].api, "remove", cluster_key)
    assert code == 0 and data["acked"] == 3
    code, data, _ = keys(a.api, "list")
    assert data["keys"] == {new: 3}
    wait_for(lambda: all_alive(cluster, names), 10, "still converged after the rotation")

    # The keyring persists, private to the agent's user.
    ring = dirs["k3"] / "keyring.json"
    assert stat.S_IMODE(os.stat(ring).st_mode) == 0o600
    assert json.loads(ring.read_text())["keys"] == [new]
    assert new not in cluster.agents["k3"].log() and cluster_key not in cluster.agents["k3"].log()

    # An agent that holds only the removed key cannot join any more ...
    old = Cluster(tmp_path / "old", cluster_key)
    (tmp_path / "old").mkdir()
    try:
        stale = old.start("k9", join=[a.addr])
        code, data, _ = keys(a.api, "list")
        assert data["members"] == 3
        assert stale.members().keys() == {"k9"}
        assert "k9" not in a.members()
    finally:
        old.close()
    # ... one with the new key can, and a restarted member keeps the rotated keyring
    # even though its command line still names the old key.
    fresh = Cluster(tmp_path / "fresh", new)
    (tmp_path / "fresh").mkdir()
    try:
        fresh.start("k4", join=[a.addr])
        wait_for(lambda: "k4" in a.members() and a.members()["k4"]["status"] == "alive", 15, "k4 joined")
    finally:
        fresh.close()
    k3 = cluster.agents["k3"]
    k3.signal(9)
    k3.popen.wait(5)
    cluster.start("k3", join=[a.addr], extra=["--data-dir", str(dirs["k3"])])  # still --key OLD
    wait_for(lambda: all_alive(cluster, names), 20, "k3 back with the rotated keyring")
    assert json.loads(ring.read_text())["keys"] == [new]  # the removed key stays removed
    assert "configured_key_not_in_keyring" in cluster.agents["k3"].log()


def test_key_commands_reject_bad_input(cluster: Cluster) -> None:
    a = cluster.start("b1")
    code, _, err = keys(a.api, "install", "not-base64!")
    assert code == 1 and "unusable key" in err and "Traceback" not in err
    code, _, err = keys(a.api, "use", generate_key())
    assert code == 1 and "not installed" in err
    plain = Cluster(cluster.workdir / "plain", None)
    (cluster.workdir / "plain").mkdir()
    try:
        p = plain.start("b2")
        code, _, err = keys(p.api, "list")
        assert code == 1 and "without encryption" in err
    finally:
        plain.close()
