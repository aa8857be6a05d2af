"""Real agent processes on loopback: the one harness of the tests and the benchmarks.

Each agent runs as its own process group; the harness keeps every Popen and
kills them all on close, so a failed test or an interrupted benchmark never
leaks ports into the next.  Callers wait on conditions, not sleeps, and report
the last state seen.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: Where free_port draws from: below the kernel's ephemeral range, so that neither a bind to port 0
#: (an agent's `--tunnel HOST:0`) nor an outgoing connection's source port can take a port between
#: its choice here and its owner's bind ("port already in use" at an agent's start, seen in CI once
#: the tests made many more connections).
_PORTS = (10000, max(10001, min(_ephemeral_low(), 65536) - 1))
_pick = random.Random(os.getpid() ^ time.time_ns())


def free_port(taken: set[int] | None = None, udp_too: bool = True) -> int:
    """A free loopback port, for UDP as well unless told otherwise (gossip uses both on one port).

    ``taken`` (which the port joins) keeps a caller that picks many ports
    before starting anything from being handed one twice.
    """
    for _ in range(2000):
        port = _pick.randint(*_PORTS)
        if taken is not None and port in taken:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                t.bind(("127.0.0.1", port))
            if udp_too:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
        except OSError:
            continue
        if taken is not None:
            taken.add(port)
        return port
    raise RuntimeError("no free port")


def default_sigint() -> None:
    """preexec_fn: Ctrl-C as a terminal delivers it, even when this test run was started in the
    background by a non-interactive shell (which makes the children inherit SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Processes:
    """Background processes, each in its own process group (its children go with it), all killed by close.

    Tests and benchmarks start servers, relays and agents that must never
    outlive them, whatever failed.
    """

    def __init__(self) -> None:
        self.all: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log_path: Path | None = None, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Run ``argv``, its output appended to ``log_path`` (or inherited)."""
        if log_path is None:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        else:
            with open(log_path, "ab") as out:
                p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd, start_new_session=True)
        self.all.append(p)
        return p

    def python(self, script: str, *args: object, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        """Run a Python program given as text, with ``args`` as its argv."""
        return self.start([sys.executable, "-c", script, *map(str, args)], log_path)

    @staticmethod
    def stop(p: subprocess.Popen[bytes]) -> None:
        """Kill ``p``'s whole process group and reap it."""
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        for p in self.all:
            self.stop(p)
        self.all.clear()


def mesh_agent_cmd(python: Path | None = None) -> list[str]:
    return [str(python or sys.executable), "-m", "cli.main"]


class AgentProc:
    def __init__(
        self, name: str, gossip_port: int, api_port: int, log_path: Path, popen: subprocess.Popen[bytes]
    ) -> None:
        self.name = name
        self.gossip_port = gossip_port
        self.api_port = api_port
        self.log_path = log_path
        self.popen = popen
        #: The API token to send, for an agent whose API is reached from off its host (tests/netns.py).
        self.token: str | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.gossip_port}"

    @property
    def api(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    def call(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(f"http://{self.api}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def call_text(self, path: str, timeout: float = 5.0) -> str:
        """A GET whose answer is not JSON (``/metrics``, the dashboard)."""
        with urllib.request.urlopen(f"http://{self.api}{path}", timeout=timeout) as resp:
            return str(resp.read().decode())

    def members(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.call("GET", "/v1/members")}

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/v1/agent/self")
        return result

    def try_call(self, method: str, path: str, timeout: float = 5.0) -> Any:
        """``call``, or None when the agent does not answer, or answers an error or no JSON."""
        try:
            return self.call(method, path, timeout=timeout)
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def try_members(self) -> dict[str, dict[str, Any]] | None:
        ms = self.try_call("GET", "/v1/members")
        return None if ms is None else {m["name"]: m for m in ms}

    def signal(self, sig: int) -> None:
        os.killpg(self.popen.pid, sig)

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Cluster:
    def __init__(self, workdir: Path, key: str | None, profile: str = "local") -> None:
        self.workdir = workdir
        self.key = key
        self.profile = profile
        self.agents: dict[str, AgentProc] = {}
        self._all: list[AgentProc] = []
        self._procs = Processes()

    def start(
        self,
        name: str,
        join: list[str] | None = None,
        gossip_port: int | None = None,
        api_port: int | None = None,
        extra: list[str] | None = None,
        wait: bool = True,
        timeout: float = 15,
        root: Path = ROOT,
        python: Path | None = None,
        pythonpath: list[Path] | None = None,
    ) -> AgentProc:
        """Start an agent (from the code under ``root``: another copy is another release; or, with
        ``python``, from what that interpreter has installed, with ``root`` holding no code).

        ``pythonpath`` comes first on the agent's import path, before ``root`` and the
        installed packages: what it holds stands in for them (a dependency broken on purpose)."""
        gossip_port = gossip_port or free_port()
        api_port = api_port or free_port()
        args = mesh_agent_cmd(python) + [
            "agent", "--name", name,
            "--bind", f"127.0.0.1:{gossip_port}",
            "--api", f"127.0.0.1:{api_port}",
            "--profile", self.profile,
            "--log-format", "json",
        ]
        args += ["--key", self.key] if self.key else ["--insecure"]
        for j in join or []:
            args += ["--join", j]
        extra = list(extra or [])
        if "--tunnel" not in extra:
            extra += ["--tunnel", "127.0.0.1:0"]  # many agents share loopback
        args += extra
        log_path = self.workdir / f"{name}-{len(self._all)}.log"
        # Agents without --data-dir keep their identity in a default place under the state home
        # (agent/identity.py): this run's own, so that no run leaves anything behind.
        path = os.pathsep.join(str(p) for p in [*(pythonpath or []), root])
        env = dict(os.environ, PYTHONPATH=path, XDG_STATE_HOME=str(self.workdir / "state"))
        popen = self._procs.start(args, log_path, env, root)
        proc = AgentProc(name, gossip_port, api_port, log_path, popen)
        self.agents[name] = proc
        self._all.append(proc)
        if wait:
            wait_for(lambda: proc.try_members() is not None or not proc.running(),
                     timeout, f"agent {name} API up", lambda: proc.log()[-2000:])
            if not proc.running():
                raise AssertionError(f"agent {name} exited at start:\n{proc.log()}")
        return proc

    def up(self) -> list[AgentProc]:
        return [a for a in self.agents.values() if a.running()]

    def statuses(self, observers: list[AgentProc] | None = None) -> dict[str, dict[str, str]]:
        """observer name -> {member name: status}, for every observer that answers."""
        out = {}
        for a in observers or self.up():
            ms = a.try_members()
            if ms is not None:
                out[a.name] = {n: m["status"] for n, m in ms.items()}
        return out

    def wait_status(self, member: str, status: str, timeout: float, observers: list[AgentProc] | None = None) -> float:
        """Wait until every observer shows ``member`` with ``status``; return seconds taken."""
        obs = observers or [a for a in self.up() if a.name != member]
        t0 = time.monotonic()

        def ok() -> bool:
            st = self.statuses(obs)
            return len(st) == len(obs) and all(v.get(member) == status for v in st.values())

        wait_for(ok, timeout, f"all of {[o.name for o in obs]} see {member} {status}",
                 lambda: json.dumps(self.statuses(obs), indent=1))
        return time.monotonic() - t0

    def wait_converged(self, names: list[str], timeout: float = 20) -> None:
        obs = [self.agents[n] for n in names]

        def ok() -> bool:
            st = self.statuses(obs)
            return len(st) == len(obs) and all(
                all(v.get(n) == "alive" for n in names) for v in st.values()
            )

        wait_for(ok, timeout, f"{names} all alive everywhere", lambda: json.dumps(self.statuses(obs), indent=1))

    def close(self) -> None:
        self._procs.close()


def listening(port: int, tries: int = 5) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port, asked now.

    A refusal is "no".  A reset is "yes": an upstream with no instance resets a connection as soon
    as it accepts it, and on loopback that reset can reach connect() itself (ECONNRESET).  Anything
    else (a timeout on a small, busy box) is asked again, up to ``tries`` times.
    """
    for _ in range(tries):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                return True
        except ConnectionRefusedError:
            return False
        except ConnectionResetError:
            return True
        except OSError:
            continue
    return False


def wait_port(port: int, what: str, timeout: float = 10) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(up, timeout, what)


def wait_for(pred: Callable[[], bool], timeout: float, what: str, last_state: Callable[[], str] | None = None,
             interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            state = last_state() if last_state else ""
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}\nlast state:\n{state}")
        time.sleep(interval)
