"""A data dir that cannot be written (read-only remount, full disk): every change is refused, not applied,
the agent stays up and says why, and what it accepted survives a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gossip.keyring import generate_key
from simulations.harness import ROOT, AgentProc, Cluster, free_port, listening

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only or full data dir needs root")]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextmanager
def unwritable(data: Path, how: str) -> Iterator[None]:
    """Make ``data`` refuse writes (root ignores mode bits): a read-only bind mount, or a full tmpfs."""
    if how == "read-only":
        sh("mount", "--bind", str(data), str(data))
        sh("mount", "-o", "remount,ro,bind", str(data))
        try:
            yield
        finally:
            sh("umount", str(data))
    else:
        filler = data / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        try:
            yield
        finally:
            filler.unlink()


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A data dir on a small tmpfs of its own, so that it can be filled without filling the host."""
    data = tmp_path / "data"
    data.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(data))
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], capture_output=True)


def cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args, "--api", api], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def view(a: AgentProc) -> dict[str, Any]:
    return {
        "services": sorted(i["id"] for i in a.call("GET", "/v1/services/web")),
        "intentions": sorted((r["source"], r["destination"], r["action"]) for r in a.call("GET", "/v1/intentions")),
        "upstreams": sorted(u["service"] for u in a.call("GET", "/v1/upstreams")),
    }


@pytest.mark.parametrize("how", ["read-only", "full"])
def test_changes_that_cannot_be_saved_are_refused_and_the_agent_stays_up(
        cluster: Cluster, data_dir: Path, how: str, cluster_key: str) -> None:
    a = cluster.start("st-a", extra=["--data-dir", str(data_dir)])
    b = cluster.start("st-b", join=[a.addr])
    cluster.wait_converged(["st-a", "st-b"])
    up_port, new_port = free_port(), free_port()
    assert cli(a.api, "services", "register", "--name", "web", "--port", "80", "--id", "web-1").returncode == 0
    assert cli(a.api, "intentions", "deny", "x", "web").returncode == 0
    assert cli(a.api, "upstreams", "add", "--service", "web", "--listen", f"127.0.0.1:{up_port}").returncode == 0
    before = view(a)
    new_key = generate_key()

    with unwritable(data_dir, how):
        attempts = [
            ("services", "register", "--name", "web", "--port", "81", "--id", "web-2"),
            ("services", "deregister", "web-1"),
            ("intentions", "deny", "y", "web"),
            ("intentions", "remove", "x", "web"),
            ("upstreams", "add", "--service", "api", "--listen", f"127.0.0.1:{new_port}"),
            ("upstreams", "remove", "web"),
        ]
        for args in attempts:
            p = cli(a.api, *args)
            lines = p.stderr.strip().splitlines()
            assert p.returncode == 1 and len(lines) == 1, (args, p.stdout, p.stderr)
            assert "cannot save" in p.stderr and "nothing was changed" in p.stderr and "HTTP 507" in p.stderr
        assert view(a) == before
        assert listening(up_port) and not listening(new_port)
        # A key rotation reaches a member whose disk refuses: it answers with its failure and stays up.
        p = cli(b.api, "keys", "install", new_key)
        assert p.returncode == 1 and "st-a: cannot save" in p.stdout, p.stdout + p.stderr
        listed = json.loads(cli(b.api, "keys", "list", "--json").stdout)
        assert listed["keys"] == {cluster_key: 2, new_key: 1}  # st-b took it; st-a did not
        assert a.running() and b.members()["st-a"]["status"] == "alive"
        info = a.info()
        assert info["store"]["services"]["error"] and info["store"]["keyring"]["failures"] == 1
        text = cli(a.api, "info").stdout
        assert "store:       services.json not saved" in text, text
        metrics = a.call_text("/metrics")
        assert 'mesh_store_write_failing{file="services.json"} 1.0' in metrics
        assert '"store_write_failed"' in a.log()
        # Nothing leaked to the mesh either: st-b's catalog never saw web-2.
        assert [i["id"] for i in b.call("GET", "/v1/services/web")] == ["web-1"]

    # Writable again: changes go through and the failure is no longer shown.
    assert cli(a.api, "services", "register", "--name", "web", "--port", "81", "--id", "web-2").returncode == 0
    assert a.info()["store"]["services"]["error"] is None
    assert cli(b.api, "keys", "install", new_key).returncode == 0
    after = view(a)
    a.signal(15)
    a.popen.wait(timeout=20)
    a = cluster.start("st-a", gossip_port=a.gossip_port, extra=["--data-dir", str(data_dir)])
    assert view(a) == after and after["services"] == ["web-1", "web-2"]
    assert sorted(json.loads((data_dir / "keyring.json").read_text())["keys"]) == sorted([cluster_key, new_key])
