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

import ctypes
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from simulations.harness import ROOT, AgentProc, Processes, mesh_agent_cmd, wait_for

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

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


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that has entered network namespace ns: sockets it opens live there.

    A namespace's loopback (where a containerised agent keeps its API and its upstreams) is reachable
    only from inside; entering it from a short-lived thread costs nothing, where ``ip netns exec``
    would start a process per call.  Only that thread changes namespace.
    """
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def ns_connect(ns: str, host: str, port: int, timeout: float = 10) -> socket.socket:
    """A TCP connection opened from inside namespace ns (usable from any thread)."""
    return in_netns(ns, lambda: socket.create_connection((host, port), timeout=timeout))


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


class NsLocalAgent(NsAgent):
    """An agent whose API stays on its namespace's loopback, as in a container; called from inside."""

    @property
    def api(self) -> str:
        return f"127.0.0.1:{API_PORT}"

    def call(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        data = None if body is None else json.dumps(body).encode()

        def request() -> Any:
            req = urllib.request.Request(f"http://127.0.0.1:{API_PORT}{path}", data=data, method=method,
                                         headers={} if data is None else {"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())

        return in_netns(self.ns, request)


@dataclass
class Host:
    name: str
    ns: str
    ip: str


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} (enough for our compose file)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = variables.get(name)
        if got:
            return got
        if op and op.endswith("-"):
            return arg
        raise KeyError(f"{name} is not set ({arg or 'no default'})")

    return _VAR.sub(sub, value)


@dataclass
class ComposeService:
    """One service of docker-compose.yml, as far as running it without Docker goes."""

    name: str
    #: Arguments to the image's entrypoint, ``mesh-agent`` (the Dockerfile's CMD when compose gives none).
    command: list[str]
    environment: dict[str, str]
    #: The agent service whose network namespace it runs in: itself for an agent, X for network_mode service:X.
    network_of: str
    depends_on: list[str] = field(default_factory=list)

    @property
    def is_agent(self) -> bool:
        return self.network_of == self.name


def load_compose(path: Path, variables: dict[str, str]) -> dict[str, ComposeService]:
    """The services of a compose file (anchors and merge keys resolved, variables interpolated)."""
    import yaml  # a test dependency (kubernetes-validate's), imported here so netns.py works without it

    data = yaml.safe_load(path.read_text())
    out: dict[str, ComposeService] = {}
    for name, svc in data["services"].items():
        command = svc.get("command", ["agent"])
        if isinstance(command, str):
            command = shlex.split(command)
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        mode = svc.get("network_mode", "")
        network_of = mode.split(":", 1)[1] if mode.startswith("service:") else name
        depends = svc.get("depends_on", [])
        out[name] = ComposeService(
            name=name,
            command=[interpolate(str(c), variables) for c in command],
            environment={str(k): interpolate(str(v), variables) for k, v in env.items()},
            network_of=network_of,
            depends_on=list(depends),
        )
    return out


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
        self.procs = Processes()
        self._namespaces: list[str] = []
        self._root_if = f"{self.prefix}r"
        self._etc_dirs: list[Path] = []
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

    def run_in(self, host: Host, args: list[str], log_name: str,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = dict(env if env is not None else os.environ, PYTHONPATH=str(ROOT))
        return self.procs.start(["ip", "netns", "exec", host.ns, *args], self.workdir / log_name, env, ROOT)

    def start_agent(self, name: str, join: list[str] | None = None, extra: list[str] | None = None) -> NsAgent:
        host = self.hosts.get(name) or self.add_host(name)
        # The API is on the host's network address, reached from this (the root) namespace: off the
        # agent's host, so it needs the API token, as any client from another host would.
        token_file = self.workdir / "api-token"
        if not token_file.exists():
            token_file.write_text(secrets.token_urlsafe(24))
            token_file.chmod(0o600)
        args = [sys.executable, "-m", "cli.main", "agent", "--name", name, "--api-token-file", str(token_file),
                "--bind", f"{host.ip}:{GOSSIP_PORT}", "--api", f"{host.ip}:{API_PORT}",
                "--tunnel", f"{host.ip}:{TUNNEL_PORT}", "--profile", "local", "--log-format", "json",
                "--key", self.key, "--data-dir", str(self.workdir / f"data-{name}")]
        for j in join or []:
            args += ["--join", j]
        args += extra or []
        log_name = f"{name}.log"
        popen = self.run_in(host, args, log_name)
        agent = NsAgent(name, host.ip, host.ns, self.workdir / log_name, popen)
        agent.token = token_file.read_text()
        self.agents[name] = agent
        wait_for(lambda: agent.try_members() is not None or not agent.running(), 20, f"agent {name} API up",
                 lambda: agent.log()[-2000:])
        if not agent.running():
            raise AssertionError(f"agent {name} exited at start:\n{agent.log()}")
        return agent

    def write_hosts(self, names: dict[str, str] | None = None) -> None:
        """Give every host namespace an /etc/hosts, as Docker gives a container.

        ``ip netns exec`` mounts /etc/netns/NS/hosts over /etc/hosts, so names (by default every host's
        name) resolve as compose's DNS resolves service names, and this machine's own host name resolves
        to the namespace's address, as a container's host name resolves to its own address: an agent
        bound to 0.0.0.0 then advertises that address, exactly as in a container.
        """
        names = names if names is not None else {h.name: h.ip for h in self.hosts.values()}
        me = socket.gethostname()
        for host in self.hosts.values():
            directory = Path("/etc/netns") / host.ns
            directory.mkdir(parents=True, exist_ok=True)
            self._etc_dirs.append(directory)
            lines = ["127.0.0.1 localhost", f"{host.ip} {me}"]
            lines += [f"{ip} {name}" for name, ip in names.items() if name != me]
            (directory / "hosts").write_text("\n".join(lines) + "\n")

    def start_compose(self, services: dict[str, ComposeService],
                      env_for: Callable[[ComposeService], dict[str, str]]) -> dict[str, NsLocalAgent]:
        """Run compose services here: each agent service in a namespace of its own, each other service in
        the namespace of the agent it names in ``network_mode``, once that agent answers (compose's
        ``condition: service_healthy``).  ``env_for`` adds what the image would (e.g. MESH_DATA_DIR)."""
        agents: dict[str, NsLocalAgent] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        for svc in services.values():
            if svc.is_agent:
                self.hosts.get(svc.name) or self.add_host(svc.name)
        self.write_hosts()
        for svc in services.values():
            if not svc.is_agent:
                continue
            host = self.hosts[svc.name]
            env = {**base, **svc.environment, **env_for(svc)}
            log_name = f"{svc.name}.log"
            popen = self.run_in(host, mesh_agent_cmd() + svc.command, log_name, env)
            agent = NsLocalAgent(svc.name, host.ip, host.ns, self.workdir / log_name, popen)
            agents[svc.name] = self.agents[svc.name] = agent
        for agent in agents.values():
            wait_for(lambda a=agent: a.try_members() is not None or not a.running(),
                     30, f"agent {agent.name} API up", lambda a=agent: a.log()[-2000:])
            if not agent.running():
                raise AssertionError(f"agent {agent.name} exited at start:\n{agent.log()}")
        for svc in services.values():
            if not svc.is_agent:
                env = {**base, **svc.environment, **env_for(svc)}
                self.run_in(self.hosts[svc.network_of], mesh_agent_cmd() + svc.command, f"{svc.name}.log", env)
        return agents

    def cut(self, a: str, b: str) -> None:
        """Drop every packet between hosts a and b, both ways (as a firewall on a would)."""
        ha, hb = self.hosts[a], self.hosts[b]
        sh("ip", "netns", "exec", ha.ns, "iptables", "-A", "INPUT", "-s", hb.ip, "-j", "DROP")
        sh("ip", "netns", "exec", ha.ns, "iptables", "-A", "OUTPUT", "-d", hb.ip, "-j", "DROP")

    def heal(self, a: str) -> None:
        sh("ip", "netns", "exec", self.hosts[a].ns, "iptables", "-F")

    def close(self) -> None:
        self.procs.close()
        for ns in reversed(self._namespaces):
            sh("ip", "netns", "del", ns, check=False)
        for directory in self._etc_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        sh("ip", "link", "del", self._root_if, check=False)
