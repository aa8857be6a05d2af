"""A mesh upgraded one node at a time, from the release before config entries to this code.

The old release is main at f7efd70, the release issue 27 names: the last main
before any of the config entries' work (its wire change, the config digest in
push-pulls and the cfg-pull/cfg stream messages, came later, in e0b3ff6).  It
is installed with pip into a scratch venv of its own, as an operator would
install it, and that venv is kept under the user's cache directory so that
later runs (and CI on the same machine) do not build it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_proxy import ECHO, roundtrip

from simulations.harness import ROOT, AgentProc, Cluster, Processes, free_port, wait_for

OLD_RELEASE = "f7efd70"

pytestmark = pytest.mark.slow


def release_venv(commit: str) -> Path:
    """The python of a venv with ``commit``'s mesh-agent pip-installed, built once and cached."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"],
                         capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mesh-agent-tests"
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / f"release-{sha[:12]}-py{sys.version_info.major}.{sys.version_info.minor}"
    python, done = venv / "bin" / "python", venv / ".installed"
    with open(cache / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if done.exists():
            return python
        subprocess.run(["rm", "-rf", str(venv)], check=True)
        with tempfile.TemporaryDirectory() as src:
            tar = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha],
                                 capture_output=True, check=True, timeout=60).stdout
            subprocess.run(["tar", "-x", "-C", src], input=tar, check=True, timeout=60)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
            pip = subprocess.run([str(python), "-m", "pip", "install", "--quiet", src],
                                 capture_output=True, text=True, timeout=600)
            if pip.returncode != 0:
                raise AssertionError(f"pip could not install {commit} into {venv}:\n{pip.stdout}{pip.stderr}")
        done.touch()
    return python


@pytest.fixture(scope="module")
def old_python() -> Path:
    return release_venv(OLD_RELEASE)


def test_the_old_release_is_the_one_before_the_wire_change() -> None:
    def is_ancestor(a: str, b: str) -> bool:
        return subprocess.run(["git", "-C", str(ROOT), "merge-base", "--is-ancestor", a, b],
                              timeout=30).returncode == 0

    wire_change = subprocess.run(["git", "-C", str(ROOT), "log", "--format=%h", "--reverse", "-S", '"cfg-pull"',
                                  "--", "gossip/wire.py"], capture_output=True, text=True, check=True,
                                 timeout=60).stdout.split()[0]
    assert is_ancestor(OLD_RELEASE, wire_change) and not is_ancestor(wire_change, OLD_RELEASE)


def test_a_mesh_upgraded_one_node_at_a_time_keeps_membership_registry_and_traffic(
        cluster: Cluster, procs: Processes, old_python: Path, tmp_path: Path) -> None:
    names = ["n1", "n2", "n3"]
    retired = "n4"  # an old agent that is never upgraded: it leaves at the end
    gossip = {n: free_port() for n in [*names, retired]}
    api = {n: free_port() for n in [*names, retired]}
    echo = {n: free_port() for n in names}
    listen = {n: free_port() for n in names}
    # Each node calls the service the next one hosts, through its upstream.
    calls = {n: names[(i + 1) % len(names)] for i, n in enumerate(names)}
    agents: dict[str, AgentProc] = {}
    old: set[str] = set()

    def start(name: str, release: Path | None) -> AgentProc:
        data = tmp_path / f"data-{name}"
        data.mkdir(exist_ok=True)
        joins = [f"127.0.0.1:{gossip[n]}" for n in agents if n != name and agents[n].running()]
        root = tmp_path if release is not None else ROOT  # the old release's code is in its venv only
        a = cluster.start(name, join=joins, gossip_port=gossip[name], api_port=api[name],
                          extra=["--data-dir", str(data)], root=root, python=release)
        agents[name] = a
        (old.add if release is not None else old.discard)(name)
        return a

    def running() -> list[AgentProc]:
        return [a for a in agents.values() if a.running()]

    def everywhere(pred: Callable[[AgentProc], bool], what: str, state: Callable[[AgentProc], Any]) -> None:
        wait_for(lambda: all(pred(a) for a in running()), 30, what,
                 lambda: json.dumps({a.name: state(a) for a in running()}, indent=1, default=str))

    def passing(a: AgentProc) -> dict[str, int]:
        return {f"echo-{n}": len(a.try_call("GET", f"/v1/services/echo-{n}?passing") or []) for n in names}

    def works() -> None:
        """Membership, the catalog and traffic, across whatever mix of releases runs now."""
        cluster.wait_converged([a.name for a in running()], timeout=30)
        everywhere(lambda a: set(passing(a).values()) == {1}, "every echo service passing on every node", passing)
        for n in names:
            assert roundtrip(listen[n], f"{n} calls {calls[n]}".encode()) == f"{n} calls {calls[n]}".encode()
        for n in old:
            counters = agents[n].info()["counters"]
            assert counters["dropped_total"] == 0, counters["dropped"]  # nothing new agents send upsets it

    def unaware(a: AgentProc) -> Any:
        return a.info()["config_entries"]["peers_without_config"]

    for n in names:
        procs.python(ECHO, echo[n])
    for n in names:
        a = start(n, old_python)
        a.call("PUT", "/v1/services", {"name": f"echo-{n}", "port": echo[n], "address": "127.0.0.1"})
        a.call("PUT", "/v1/upstreams", {"service": f"echo-{calls[n]}", "listen": f"127.0.0.1:{listen[n]}"})
    start(retired, old_python)
    with pytest.raises(urllib.error.HTTPError) as info:
        agents["n1"].call("GET", "/v1/config")
    assert info.value.code == 404  # truly the release before config entries
    works()

    def holds(a: AgentProc, version: int) -> bool:
        return any(e["version"] == version for e in a.call("GET", "/v1/config"))

    version = 0
    for n in names:
        # Upgrade: stop the old agent as an operator does (it leaves), start the new code on its data
        # dir, which must bring back its identity, its service and its upstream.
        agents[n].signal(signal.SIGTERM)
        agents[n].popen.wait(timeout=20)
        new = start(n, None)
        works()
        # The new agents name exactly the old ones as unable to take config entries.
        news, olds = [agents[m] for m in names if m not in old], sorted(old)
        wait_for(lambda news=news, olds=olds: all(unaware(a) == olds for a in news), 30,
                 f"new agents name {olds} as unable to take config entries",
                 lambda news=news: json.dumps({a.name: unaware(a) for a in news}))
        if not version:
            version = new.call("PUT", "/v1/config", {"kind": "service-defaults", "name": "echo-n1",
                                                     "protocol": "tcp"})["version"]
        # Written on the first new agent, the entry reaches every new one (the last by anti-entropy).
        wait_for(lambda news=news, v=version: all(holds(a, v) for a in news), 30,
                 "the config entry on every new agent")
    assert old == {retired}
    # The last old agent leaves for good: no new agent names it any more.
    agents[retired].signal(signal.SIGTERM)
    agents[retired].popen.wait(timeout=20)
    old.clear()
    wait_for(lambda: all(unaware(agents[n]) == [] for n in names), 30, "no agent names a peer without config",
             lambda: json.dumps({n: unaware(agents[n]) for n in names}))
    works()
