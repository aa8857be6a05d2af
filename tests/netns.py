"""Several hosts on one machine: each agent in its own network namespace on a shared bridge.

A hub namespace holds a bridge; every host namespace has one veth into it
with its own address (10.213.S.i/24), and the test process gets one too
(10.213.S.254), so it reaches every agent's API and upstreams directly while
iptables inside a host namespace cuts that host's links exactly as a
firewall on a real machine would.  Everything is deleted on close, also when
a test fails (use the ``lab`` fixture of the test module).  Needs root, ``ip``
and ``iptables``; :func:`skip_reason` says why a machine cannot.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from procs import ROOT, AgentProc, wait_for

GOSSIP_PORT = 7946
API_PORT = 7947
TUNNEL_PORT = 7948


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = f"mprobe{os.getpid() % 100000}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


class NsAgent(AgentProc):
    def __init__(self, name: str, ip: str, ns: str, log_path: Path, popen: subprocess.Popen[bytes]) -> None:
        super().__init__(name, GOSSIP_PORT, API_PORT, log_path, popen)
        self.ip = ip
        self.ns = ns

    @property
    def addr(self) -> str:
        return f"{self.ip}:{GOSSIP_PORT}"

    @property
    def api(self) -> str:
        return f"{self.ip}:{API_PORT}"


@dataclass
class Host:
    name: str
    ns: str
    ip: str


class Lab:
    def __init__(self, workdir: Path, key: str) -> None:
        self.workdir = workdir
        self.key = key
        tag = os.getpid() % 100000
        self.prefix = f"m{tag}"
        self.subnet = f"10.213.{tag % 250}"
        self.hub = f"{self.prefix}hub"
        self.hosts: dict[str, Host] = {}
        self.agents: dict[str, NsAgent] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._namespaces: list[str] = []
        self._root_if = f"{self.prefix}r"
        sh("ip", "netns", "add", self.hub)
        self._namespaces.append(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        sh("ip", "link", "add", self._root_if, "type", "veth", "peer", "name", "tohost", "netns", self.hub)
        sh("ip", "-n", self.hub, "link", "set", "tohost", "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.subnet}.254/24", "dev", self._root_if)
        sh("ip", "link", "set", self._root_if, "up")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        ns = f"{self.prefix}h{index}"
        ip = f"{self.subnet}.{index}"
        sh("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        port = f"p{index}"
        sh("ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.hub, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        host = Host(name, ns, ip)
        self.hosts[name] = host
        return host

    def run_in(self, host: Host, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.workdir / log_name, "wb") as log:
            p = subprocess.Popen(["ip", "netns", "exec", host.ns, *args], stdout=log, stderr=subprocess.STDOUT,
                                 cwd=ROOT, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def start_agent(self, name: str, join: list[str] | None = None, extra: list[str] | None = None) -> NsAgent:
        host = self.hosts.get(name) or self.add_host(name)
        args = [sys.executable, "-m", "cli.main", "agent", "--name", name,
                "--bind", f"{host.ip}:{GOSSIP_PORT}", "--api", f"{host.ip}:{API_PORT}",
                "--tunnel", f"{host.ip}:{TUNNEL_PORT}", "--profile", "local", "--log-format", "json",
                "--key", self.key, "--data-dir", str(self.workdir / f"data-{name}")]
        for j in join or []:
            args += ["--join", j]
        args += extra or []
        log_name = f"{name}.log"
        popen = self.run_in(host, args, log_name)
        agent = NsAgent(name, host.ip, host.ns, self.workdir / log_name, popen)
        self.agents[name] = agent
        wait_for(lambda: agent.try_members() is not None or not agent.running(), 20, f"agent {name} API up",
                 lambda: agent.log()[-2000:])
        if not agent.running():
            raise AssertionError(f"agent {name} exited at start:\n{agent.log()}")
        return agent

    def cut(self, a: str, b: str) -> None:
        """Drop every packet between hosts a and b, both ways (as a firewall on a would)."""
        ha, hb = self.hosts[a], self.hosts[b]
        sh("ip", "netns", "exec", ha.ns, "iptables", "-A", "INPUT", "-s", hb.ip, "-j", "DROP")
        sh("ip", "netns", "exec", ha.ns, "iptables", "-A", "OUTPUT", "-d", hb.ip, "-j", "DROP")

    def heal(self, a: str) -> None:
        sh("ip", "netns", "exec", self.hosts[a].ns, "iptables", "-F")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._namespaces):
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self._root_if, check=False)
