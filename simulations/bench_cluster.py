"""Side-by-side cluster benchmark: mesh-agent (lan profile, encrypted) against HashiCorp Serf.

For each cluster size N, and for ``--runs`` fresh clusters of each implementation, it measures

1. join convergence: N agents started unjoined, then agents 2..N told to join agent 1 at the
   same instant; time until every agent lists N alive members;
2. failure detection after ``kill -9`` of a non-seed agent: time until the first, and until
   every, other agent shows it dead (ours: ``dead``; Serf: ``failed``); ``--kills`` agents (3)
   are killed one after another per cluster and the table's median pools all kills, since one
   kill's time spreads by seconds with where the victim stood in the probe orders;
3. graceful leave of another agent (ours: SIGTERM; Serf: the ``leave`` RPC, which is what
   ``serf leave`` sends -- Serf's SIGTERM does not leave by default): time until all others
   show it ``left``;
4. whether any healthy member was ever seen dead/failed (while polling, in a final snapshot,
   and in the agents' logs);
5. idle cost after convergence: RSS per agent, CPU seconds per minute per agent, and bytes
   sent per node per second (iptables byte counters on loopback, the same method for both).

It prints one Markdown table per N with the medians, Serf's value, the ratio ours/serf and
the goal.  It is a benchmark, not a test: it exits 0 whatever the numbers say.

Serf is driven through its msgpack RPC (a persistent TCP connection per agent, the protocol
the ``serf`` CLI itself speaks) instead of spawning ``serf members`` 20 times a second per
agent, which would drown a 2-core machine.  Our agent is polled through its HTTP API.

The observer is not free, and it shares the 2 cores with the agents.  Serf's answers are
decoded by msgpack's compiled Unpacker (msgpack is one of mesh-agent's own dependencies).
A pure-Python decoder, used until stop 19, cost this process 35.5 CPU-s per 50-agent Serf
cluster against 14.5 for ours, and Serf's 50-agent joins then failed to converge in 5 of 9
clusters; the "benchmark process CPU" row shows what the observer costs now.

    .venv/bin/python simulations/bench_cluster.py --sizes 10,25,50 --runs 3

Standard library plus msgpack; run as root for the iptables counters (otherwise bytes fall back to
our agent's own API counters, and Serf's column is empty).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MESH_AGENT = Path(sys.executable).parent / "mesh-agent"
SERF = shutil.which("serf") or "/usr/bin/serf"
IPTABLES = shutil.which("iptables") or "/usr/sbin/iptables"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- msgpack for Serf's RPC ------------------------------------------------------------------


def mp_pack(obj: Any) -> bytes:
    """Old-spec msgpack, as go-msgpack in Serf speaks it: no bin and no str8 types."""
    out: bytes = msgpack.packb(obj, use_bin_type=False)
    return out


class MpReader:
    """Decodes a stream of msgpack objects from a socket (msgpack's compiled Unpacker).

    Serf's RPC speaks the old msgpack spec, where strings and bytes share one
    "raw" type (a member's Addr is raw IP bytes): raws decode as str, bytes that
    are not UTF-8 kept by surrogateescape.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=False)

    def unpack(self) -> Any:
        while True:
            try:
                return self._unpacker.unpack()
            except msgpack.OutOfData:  # (the unpacker keeps the partial object for the next try)
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("serf RPC connection closed") from None
                self._unpacker.feed(chunk)


class SerfRPC:
    """One persistent connection to a Serf agent's RPC port (the `serf` CLI protocol)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = MpReader(self.sock)
        self.seq = 0
        self.lock = threading.Lock()
        self.call("handshake", {"Version": 1}, has_body=False)

    def call(self, command: str, body: Any = None, has_body: bool = True) -> Any:
        with self.lock:
            self.seq += 1
            seq = self.seq
            data = mp_pack({"Command": command, "Seq": seq})
            if body is not None:
                data += mp_pack(body)
            self.sock.sendall(data)
            header = self.reader.unpack()
            if not isinstance(header, dict) or header.get("Seq") != seq:
                raise ConnectionError(f"serf RPC: unexpected header {header!r}")
            if header.get("Error"):
                raise RuntimeError(f"serf RPC {command}: {header['Error']}")
            return self.reader.unpack() if has_body else None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- our agent's HTTP API ----------------------------------------------------------------


_http_local = threading.local()


def http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
    """One API request on a kept-alive connection (one per thread and port), as
    Serf's RPC client keeps its connection: the poll loops then measure the
    agents, not TCP set-up."""
    conns: dict[int, http.client.HTTPConnection] = _http_local.__dict__.setdefault("conns", {})
    payload = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if payload is not None else {}
    for attempt in (1, 2):
        conn = conns.get(port)
        if conn is None:
            conn = conns[port] = http.client.HTTPConnection(HOST, port, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (http.client.HTTPException, ConnectionError) as exc:
            conn.close()
            del conns[port]
            if attempt == 2 or not isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError,
                                                    BrokenPipeError, http.client.CannotSendRequest)):
                raise
            continue  # the agent closed an idle kept-alive connection: once more on a fresh one
        except BaseException:
            conn.close()
            del conns[port]
            raise
        if resp.will_close:
            conn.close()
            del conns[port]
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status} {data[:200]!r}")
        return json.loads(data)
    raise AssertionError("unreachable")


# -- processes, ports, /proc --------------------------------------------------------------


class Ports:
    """Free ports, found by binding port 0, and kept bound until the agent that gets them
    starts: a port picked early and released at once could meanwhile become the ephemeral
    source port of some connection (the kernel does not hand out ports that are bound)."""

    def __init__(self, count: int, udp_too: int) -> None:
        """``count`` distinct free ports; the first ``udp_too`` are free for UDP as well."""
        self.held: dict[int, list[socket.socket]] = {}
        self.ports: list[int] = []
        discard: list[socket.socket] = []
        try:
            while len(self.ports) < count:
                t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                t.bind((HOST, 0))
                port = t.getsockname()[1]
                socks = [t]
                if len(self.ports) < udp_too:
                    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    try:
                        u.bind((HOST, port))
                    except OSError:
                        u.close()
                        discard.append(t)  # keep it bound for now, so bind(0) moves on
                        continue
                    socks.append(u)
                self.held[port] = socks
                self.ports.append(port)
        except BaseException:
            self.release_all()
            raise
        finally:
            for sock in discard:
                sock.close()

    def release(self, *ports: int) -> None:
        for port in ports:
            for sock in self.held.pop(port, []):
                sock.close()

    def release_all(self) -> None:
        self.release(*list(self.held))


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_cpu_seconds_fine(pid: int) -> float | None:
    """The process's CPU seconds in nanoseconds' resolution: the sum of its live threads' schedstat.

    /proc/PID/stat counts in clock ticks (10 ms here), each of user and system time
    truncated, which is too coarse for a start-up of about 0.15 s; a thread that has
    already exited is not counted here, which an agent's start does not have.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


def proc_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


@dataclass
class Node:
    name: str
    port: int  # gossip, UDP and TCP
    ctl: int  # our API port or Serf's RPC port
    log_path: Path
    tunnel: int = 0  # our data-plane tunnel port (TCP); its default, 7948, would collide on one host
    proc: subprocess.Popen[bytes] | None = None
    rpc: SerfRPC | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# -- the two implementations behind one interface ------------------------------------------


class Impl:
    label = ""
    dead_statuses: frozenset[str] = frozenset()

    def __init__(self, key: str, env: dict[str, str] | None = None) -> None:
        self.key = key
        self.env = env

    def command(self, node: Node) -> list[str]:
        raise NotImplementedError

    def ready(self, node: Node) -> bool:
        raise NotImplementedError

    def members(self, node: Node) -> dict[str, str]:
        """name -> status as this agent sees it."""
        raise NotImplementedError

    def prepare_join(self, node: Node) -> Any:
        return None

    def join(self, node: Node, seed: Node, handle: Any) -> None:
        raise NotImplementedError

    def leave(self, node: Node) -> None:
        raise NotImplementedError

    def false_deaths_in_log(self, node: Node, allowed: set[str]) -> set[str]:
        raise NotImplementedError

    def close(self, node: Node) -> None:
        pass


class Ours(Impl):
    label = "ours"
    dead_statuses = frozenset({"dead"})

    def command(self, node: Node) -> list[str]:
        return [str(MESH_AGENT), "agent", "--name", node.name, "--bind", f"{HOST}:{node.port}",
                "--api", f"{HOST}:{node.ctl}", "--tunnel", f"{HOST}:{node.tunnel}", "--key", self.key,
                "--profile", "lan"]

    def ready(self, node: Node) -> bool:
        return bool(http_json(node.ctl, "GET", "/v1/health", timeout=2.0).get("ok"))

    def members(self, node: Node) -> dict[str, str]:
        return {m["name"]: m["status"] for m in http_json(node.ctl, "GET", "/v1/members", timeout=5.0)}

    def join(self, node: Node, seed: Node, handle: Any) -> None:
        res = http_json(node.ctl, "POST", "/v1/join", {"addresses": [f"{HOST}:{seed.port}"]}, timeout=30.0)
        if not res.get("ok"):
            raise RuntimeError(f"join refused: {res}")

    def leave(self, node: Node) -> None:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)

    def io_bytes_out(self, node: Node) -> int:
        c = http_json(node.ctl, "GET", "/v1/agent/self", timeout=5.0)["counters"]
        return int(c.get("udp_bytes_out", 0)) + int(c.get("tcp_bytes_out", 0))

    def false_deaths_in_log(self, node: Node, allowed: set[str]) -> set[str]:
        found = set()
        try:
            text = node.log_path.read_text(errors="replace")
        except OSError:
            return found
        for line in text.splitlines():
            if "member_dead" in line:
                m = re.search(r"\bname=(\S+)", line)
                if m and m.group(1).strip("'\"") not in allowed:
                    found.add(m.group(1).strip("'\""))
        return found


class Serf(Impl):
    label = "serf"
    dead_statuses = frozenset({"failed"})

    def command(self, node: Node) -> list[str]:
        return [SERF, "agent", f"-node={node.name}", f"-bind={HOST}:{node.port}",
                f"-rpc-addr={HOST}:{node.ctl}", f"-encrypt={self.key}", "-profile=lan",
                "-log-level=info"]

    def ready(self, node: Node) -> bool:
        if node.rpc is None:
            node.rpc = SerfRPC(node.ctl, timeout=5.0)
        return bool(self.members(node))

    def members(self, node: Node) -> dict[str, str]:
        if node.rpc is None:
            node.rpc = SerfRPC(node.ctl, timeout=5.0)
        try:
            body = node.rpc.call("members")
        except (OSError, ConnectionError, ValueError):
            node.rpc.close()
            node.rpc = None
            raise
        return {m["Name"]: m["Status"] for m in body["Members"]}

    def prepare_join(self, node: Node) -> Any:
        return SerfRPC(node.ctl, timeout=30.0)

    def join(self, node: Node, seed: Node, handle: Any) -> None:
        try:
            res = handle.call("join", {"Existing": [f"{HOST}:{seed.port}"], "Replay": False})
        finally:
            handle.close()
        if int(res.get("Num", 0)) < 1:
            raise RuntimeError(f"join: {res}")

    def leave(self, node: Node) -> None:
        rpc = SerfRPC(node.ctl, timeout=30.0)
        with rpc.lock:  # fire and forget: the agent answers after the leave, then exits
            rpc.seq += 1
            rpc.sock.sendall(mp_pack({"Command": "leave", "Seq": rpc.seq}))
        threading.Thread(target=_drain_and_close, args=(rpc,), daemon=True).start()

    def false_deaths_in_log(self, node: Node, allowed: set[str]) -> set[str]:
        found = set()
        try:
            text = node.log_path.read_text(errors="replace")
        except OSError:
            return found
        for m in re.finditer(r"EventMemberFailed: (\S+)", text):
            if m.group(1) not in allowed:
                found.add(m.group(1))
        return found

    def close(self, node: Node) -> None:
        if node.rpc is not None:
            node.rpc.close()
            node.rpc = None


def _drain_and_close(rpc: SerfRPC) -> None:
    try:
        rpc.sock.settimeout(30.0)
        rpc.reader.unpack()
    except (OSError, ConnectionError, ValueError):
        pass
    finally:
        rpc.close()


# -- iptables byte counters ---------------------------------------------------------------


class ByteCounters:
    """Counts bytes leaving on loopback per gossip port, in a chain of our own.

    UDP: ``--sport P`` (every datagram an agent sends leaves from its gossip port).
    TCP: ``--sport P`` counts what the agent sends as push-pull responder, ``--dport P``
    what other agents send to it as initiators (their source port is ephemeral).  The
    cluster total is exact; per node we report total / N.
    """

    def __init__(self) -> None:
        self.chain = f"MESHBENCH{os.getpid() % 100000}"
        self.ok = False
        self.error = ""
        self._jump = ["OUTPUT", "-o", "lo", "-j", self.chain]

    def _ipt(self, *args: str, check: bool = True) -> str:
        res = subprocess.run([IPTABLES, "-w", "5", *args], capture_output=True, text=True, timeout=30)
        if check and res.returncode != 0:
            raise RuntimeError(f"iptables {' '.join(args)}: {res.stderr.strip() or res.returncode}")
        return res.stdout

    def setup(self) -> None:
        try:
            self._ipt("-N", self.chain)
            self._ipt("-I", *self._jump)
            self.ok = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            self.error = str(exc)
            self.teardown()

    def watch(self, ports: list[int]) -> None:
        if not self.ok:
            return
        self._ipt("-F", self.chain)
        for p in ports:
            self._ipt("-A", self.chain, "-p", "udp", "--sport", str(p))
            self._ipt("-A", self.chain, "-p", "tcp", "--sport", str(p))
            self._ipt("-A", self.chain, "-p", "tcp", "--dport", str(p))

    def read(self) -> dict[str, int]:
        """Bytes counted so far, by protocol."""
        out = self._ipt("-L", self.chain, "-v", "-x", "-n")
        totals = {"udp": 0, "tcp": 0}
        for line in out.splitlines():
            m = re.match(r"\s*(\d+)\s+(\d+)\s", line)
            proto = re.search(r"\b(udp|tcp) [sd]pt:\d+", line)  # with -n the prot column is numeric
            if m and proto:
                totals[proto.group(1)] += int(m.group(2))
        return totals

    def teardown(self) -> None:
        # Delete every jump we might have inserted, then the chain itself.
        for _ in range(10):
            if subprocess.run([IPTABLES, "-w", "5", "-D", *self._jump],
                              capture_output=True, timeout=30).returncode != 0:
                break
        subprocess.run([IPTABLES, "-w", "5", "-F", self.chain], capture_output=True, timeout=30)
        subprocess.run([IPTABLES, "-w", "5", "-X", self.chain], capture_output=True, timeout=30)
        self.ok = False


# -- one cluster --------------------------------------------------------------------------


@dataclass
class Watch:
    """Polls a set of agents until a predicate holds on each; notes healthy deaths."""

    impl: Impl
    nodes: list[Node]
    predicate: Callable[[Node, dict[str, str]], bool]
    healthy: set[str]  # members that must never be seen dead
    poll: float
    timeout: float
    t0: float = 0.0
    done_at: dict[str, float] = field(default_factory=dict)
    last: dict[str, dict[str, str]] = field(default_factory=dict)
    phase: str = ""
    false_deaths: set[tuple[str, str, str]] = field(default_factory=set)
    suspects: set[tuple[str, str]] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    polls: int = 0

    def run(self) -> None:
        threads = [threading.Thread(target=self._one, args=(n, i), daemon=True)
                   for i, n in enumerate(self.nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _one(self, node: Node, index: int) -> None:
        # Spread the polls of different agents over one interval.
        time.sleep(self.poll * index / max(1, len(self.nodes)))
        end = self.t0 + self.timeout
        while True:
            now = time.monotonic()
            try:
                view = self.impl.members(node)
            except Exception as exc:  # noqa: BLE001 - note and retry
                self.errors[node.name] = f"{type(exc).__name__}: {exc}"
                view = None
            seen = time.monotonic()
            self.polls += 1
            if view is not None:
                self.last[node.name] = view
                for name, status in view.items():
                    if name in self.healthy and status in self.impl.dead_statuses:
                        self.false_deaths.add((node.name, name, f"{status} during {self.phase}"))
                    elif name in self.healthy and status == "suspect":
                        self.suspects.add((node.name, name))
                if self.predicate(node, view):
                    # The state held by the time the answer came back; take the midpoint.
                    self.done_at[node.name] = (now + seen) / 2 - self.t0
                    return
            if seen > end:
                return
            time.sleep(max(0.0, self.poll - (time.monotonic() - now)))

    def first(self) -> float | None:
        return min(self.done_at.values()) if self.done_at else None

    def all(self) -> float | None:
        if len(self.done_at) < len(self.nodes):
            return None
        return max(self.done_at.values())

    def describe_missing(self) -> str:
        missing = [n.name for n in self.nodes if n.name not in self.done_at]
        parts = []
        for name in missing[:5]:
            view = self.last.get(name)
            summary = "no answer" if view is None else json.dumps(
                {s: sum(1 for v in view.values() if v == s) for s in sorted(set(view.values()))})
            err = self.errors.get(name, "")
            parts.append(f"{name}: {summary}{' last error ' + err if err else ''}")
        return f"{len(missing)} agent(s) not there: " + "; ".join(parts)


def _git(*args: str) -> str:
    res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout.decode(errors="replace").strip()


def snapshot_source(dest: Path, ref: str | None, src_root: Path | None = None) -> tuple[Path, str]:
    """Copy our packages to ``dest`` and return (dest, what was copied).

    Every agent of every run then imports the same code, even while the tree is being edited
    (the venv's install is editable: an agent started mid-edit would otherwise run newer code
    than its neighbours, and a cluster of mixed versions measures nothing).
    """
    dest.mkdir(parents=True)
    try:
        head = _git("rev-parse", "--short", "HEAD")
    except (OSError, RuntimeError, subprocess.SubprocessError):
        head = "unknown"
    if ref:
        commit = _git("rev-parse", "--short", ref)
        data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref],
                              capture_output=True, check=True, timeout=120).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
                tar.extractall(dest, filter="data")
            else:  # an archive git made of this repository's own commit
                tar.extractall(dest)
        what = f"git revision {ref} ({commit})"
    else:
        root = src_root or ROOT
        pkgs = [d for d in sorted(root.iterdir())
                if d.is_dir() and (d / "__init__.py").exists() and d.name not in ("tests", "simulations")]
        for d in pkgs:
            shutil.copytree(d, dest / d.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        try:
            dirty = _git("status", "--porcelain", "--", *[d.name for d in pkgs])
        except (OSError, RuntimeError, subprocess.SubprocessError):
            dirty = "?"
        what = f"working tree snapshot at start (HEAD {head}{', with uncommitted changes' if dirty else ''})"
        if src_root is not None:
            what = f"code copied from {src_root}"
    check = subprocess.run([sys.executable, "-c", "import gossip, dataplane.proxy, cli.main; print(gossip.__file__)"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(dest)),
                           cwd=dest.parent, timeout=60)
    if check.returncode != 0 or not check.stdout.strip().startswith(str(dest)):
        raise RuntimeError(f"the snapshot does not import cleanly: {check.stderr.strip()[-300:]}")
    return dest, what


def idle_seconds(args: argparse.Namespace, n: int) -> float:
    """The idle window: by default one whole push-pull period (at least 30 s), so that every
    node's periodic push-pull falls in it exactly once whatever its phase."""
    if args.idle_seconds is not None:
        return float(args.idle_seconds)
    return max(30.0, push_pull_scaled(n))


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc.strerror})"


def push_pull_scaled(n: int, interval: float = 30.0) -> float:
    """memberlist's pushPullScale: the push-pull interval grows with log2(N) beyond 32 nodes."""
    if n <= 32:
        return interval
    return interval * (math.ceil(math.log2(n) - math.log2(32)) + 1)


class StartupFailure(RuntimeError):
    """An agent would not start: a set-up problem, not a measurement."""


def run_cluster(impl: Impl, n: int, args: argparse.Namespace, counters: ByteCounters,
                workdir: Path) -> dict[str, Any]:
    reserved = Ports(3 * n, udp_too=n)
    ports = reserved.ports
    tag = f"{impl.label}-n{n}-{int(time.time() * 1000) % 10**7}"
    logdir = workdir / tag
    logdir.mkdir(parents=True)
    nodes = [Node(f"node{i:02d}", ports[i], ports[n + i], logdir / f"node{i:02d}.log", tunnel=ports[2 * n + i])
             for i in range(n)]
    res: dict[str, Any] = {"impl": impl.label, "n": n, "logs": str(logdir), "notes": []}
    by_name = {nd.name: nd for nd in nodes}
    bench_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        # -- start N unjoined agents, one after the other ------------------------------------
        t_start = time.monotonic()
        for nd in nodes:
            reserved.release(nd.port, nd.ctl, nd.tunnel)
            with open(nd.log_path, "wb") as fh:
                nd.proc = subprocess.Popen(impl.command(nd), stdout=fh, stderr=subprocess.STDOUT, env=impl.env,
                                           stdin=subprocess.DEVNULL, start_new_session=True, cwd=logdir)
            deadline = time.monotonic() + 30.0
            while True:
                if nd.proc.poll() is not None:
                    raise StartupFailure(f"{nd.name} exited with {nd.proc.returncode}: {_tail(nd.log_path)}")
                try:
                    if impl.ready(nd):
                        break
                except Exception:  # noqa: BLE001,S110 - not up yet
                    pass
                if time.monotonic() > deadline:
                    raise StartupFailure(f"{nd.name} did not answer within 30 s: {_tail(nd.log_path)}")
                time.sleep(0.05)
        t_last_start = time.monotonic()
        res["startup_s"] = t_last_start - t_start
        all_names = set(by_name)

        # -- 1. join convergence ---------------------------------------------------------
        seed = nodes[0]
        handles = {nd.name: impl.prepare_join(nd) for nd in nodes[1:]}
        barrier = threading.Barrier(n)  # n-1 joiners + this thread
        join_errors: dict[str, str] = {}

        def do_join(nd: Node) -> None:
            barrier.wait()
            try:
                impl.join(nd, seed, handles[nd.name])
            except Exception as exc:  # noqa: BLE001
                join_errors[nd.name] = f"{type(exc).__name__}: {exc}"

        joiners = [threading.Thread(target=do_join, args=(nd,), daemon=True) for nd in nodes[1:]]
        for t in joiners:
            t.start()
        time.sleep(0.2)  # let every joiner reach the barrier
        watch = Watch(impl, nodes,
                      lambda _nd, view: sum(1 for s in view.values() if s == "alive") >= n,
                      healthy=all_names, poll=args.poll_ms / 1000, timeout=args.timeout)
        watch.phase = "join"
        join_cpu0 = [proc_cpu_seconds(nd.pid) for nd in nodes]
        watch.t0 = time.monotonic()
        barrier.wait()
        watch.run()
        join_cpu1 = [proc_cpu_seconds(nd.pid) for nd in nodes]
        res["join_cpu_s"] = sum(b - a for a, b in zip(join_cpu0, join_cpu1, strict=True)
                                if a is not None and b is not None)
        for t in joiners:
            t.join(timeout=30)
        res["join_s"] = watch.all()
        res["join_first_s"] = watch.first()
        res["false_deaths"] = sorted(watch.false_deaths)
        res["false_suspects"] = len(watch.suspects)
        res["polls"] = watch.polls
        if join_errors:
            res["notes"].append(f"join errors: {dict(list(join_errors.items())[:3])}")
        if res["join_s"] is None:
            res["notes"].append(f"join did not converge in {args.timeout:.0f} s: {watch.describe_missing()}")
            log(f"  {impl.label} N={n}: {res['notes'][-1]}")
            if res["join_first_s"] is None:
                return res  # no agent ever saw the whole cluster: nothing else is worth measuring
        else:
            log(f"  {impl.label} N={n}: converged in {res['join_s']:.2f} s (first {res['join_first_s']:.2f} s)")

        # -- 5. idle cost (before anything is killed) ---------------------------------------
        # Idle in steady state: memberlist's first push-pull comes a random stagger (< 30 s) plus
        # one full, size-scaled interval after start; ours comes earlier.  Measuring right after
        # start would catch every one of ours and few of Serf's, so wait until both are periodic.
        warmup = args.warmup_seconds if args.warmup_seconds is not None else 30.0 + push_pull_scaled(n)
        idle_at = max(time.monotonic() + args.settle_seconds, t_last_start + warmup)
        res["warmup_s"] = idle_at - t_last_start
        time.sleep(max(0.0, idle_at - time.monotonic()))
        use_ipt = counters.ok
        try:
            counters.watch([nd.port for nd in nodes])
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            use_ipt = False
            res["notes"].append(f"iptables failed for this run ({exc}); bytes from our API counters")
        api_fallback = not use_ipt
        cpu0 = {nd.name: proc_cpu_seconds(nd.pid) for nd in nodes}
        bytes0 = counters.read() if use_ipt else None
        ours_bytes0 = {nd.name: impl.io_bytes_out(nd) for nd in nodes} if isinstance(impl, Ours) else {}
        t_idle = time.monotonic()
        time.sleep(idle_seconds(args, n))
        elapsed = time.monotonic() - t_idle
        bytes1 = counters.read() if use_ipt else None
        cpu1 = {nd.name: proc_cpu_seconds(nd.pid) for nd in nodes}
        ours_bytes1 = {nd.name: impl.io_bytes_out(nd) for nd in nodes} if isinstance(impl, Ours) else {}
        rss = [r for r in (proc_rss_mib(nd.pid) for nd in nodes) if r is not None]
        cpu_rates = [
            (cpu1[k] - cpu0[k]) * 60.0 / elapsed
            for k in cpu0 if cpu0[k] is not None and cpu1.get(k) is not None
        ]
        res["rss_mib"] = statistics.median(rss) if rss else None
        res["rss_max_mib"] = max(rss) if rss else None
        # The mean (cluster CPU / N): per-agent deltas are a few 10 ms clock ticks, too coarse alone.
        res["cpu_s_per_min"] = statistics.fmean(cpu_rates) if cpu_rates else None
        res["cpu_s_per_min_max"] = max(cpu_rates) if cpu_rates else None
        if bytes0 is not None and bytes1 is not None:
            for proto in ("udp", "tcp"):
                res[f"{proto}_bytes_per_node_s"] = (bytes1[proto] - bytes0[proto]) / n / elapsed
            res["bytes_per_node_s"] = res["udp_bytes_per_node_s"] + res["tcp_bytes_per_node_s"]
            res["bytes_method"] = "iptables"
        if ours_bytes0:
            res["api_bytes_per_node_s"] = (
                sum(ours_bytes1.values()) - sum(ours_bytes0.values())) / n / elapsed
            if api_fallback:
                res["bytes_per_node_s"] = res["api_bytes_per_node_s"]
                res["bytes_method"] = "api counters"
        # One snapshot after the idle window: nobody healthy should be anything but alive.
        for nd in nodes:
            try:
                view = impl.members(nd)
            except Exception:  # noqa: BLE001,S112
                continue
            for name, status in view.items():
                if status in impl.dead_statuses:
                    res["false_deaths"].append((nd.name, name, f"{status} after idle"))
        log(f"  {impl.label} N={n}: idle RSS {res['rss_mib']:.1f} MiB, CPU {res['cpu_s_per_min']:.3f} s/min, "
            f"{res.get('bytes_per_node_s', float('nan')):.0f} B/s/node")

        # -- 2. failure detection after kill -9 ---------------------------------------------
        # The first detection depends on when the victim's turn in some agent's probe
        # order comes (up to a protocol period) plus the suspicion timeout, so one kill
        # per cluster spreads by seconds: kill --kills agents in turn, each once the
        # previous one is seen dead everywhere, and take this cluster's median.
        leaver_index = n // 2 + 1 if n // 2 + 1 < n else 1
        order = [i for i in range(n // 2, n) if i != leaver_index] + [i for i in range(2, n // 2) if i != leaver_index]
        victims = [nodes[i] for i in order[: max(1, min(args.kills, n - 3))]]
        others = list(nodes)
        healthy = set(all_names)
        firsts: list[float] = []
        alls: list[float] = []
        for victim in victims:
            others = [nd for nd in others if nd is not victim]
            healthy.discard(victim.name)
            watch = Watch(impl, others,
                          lambda _nd, view, v=victim.name: view.get(v, "gone") in impl.dead_statuses | {"gone"},
                          healthy=set(healthy), poll=args.poll_ms / 1000, timeout=args.timeout)
            impl.close(victim)
            watch.phase = f"detection of {victim.name}"
            watch.t0 = time.monotonic()
            os.killpg(victim.pid, signal.SIGKILL)
            watch.run()
            if victim.proc is not None:
                victim.proc.wait()
            res["false_deaths"] += sorted(watch.false_deaths)
            res["false_suspects"] += len(watch.suspects)
            res["polls"] += watch.polls
            first, every = watch.first(), watch.all()
            log(f"  {impl.label} N={n}: kill -9 of {victim.name} seen first {_fmt(first)} s, all {_fmt(every)} s")
            if first is not None:
                firsts.append(first)
            if every is None:
                res["notes"].append(
                    f"failure of {victim.name} not seen by all in {args.timeout:.0f} s: {watch.describe_missing()}")
                break
            alls.append(every)
        res["detect_first_samples"] = firsts
        res["detect_all_samples"] = alls
        res["detect_first_s"] = statistics.median(firsts) if firsts else None
        res["detect_all_s"] = statistics.median(alls) if len(alls) == len(victims) else None
        log(f"  {impl.label} N={n}: {len(victims)} kill(s), median first {_fmt(res['detect_first_s'])} s, "
            f"all {_fmt(res['detect_all_s'])} s")

        # -- 3. graceful leave -------------------------------------------------------------
        leaver = nodes[leaver_index]
        rest = [nd for nd in others if nd is not leaver]
        if rest:
            watch = Watch(impl, rest, lambda _nd, view: view.get(leaver.name, "gone") in ("left", "gone"),
                          healthy=healthy, poll=args.poll_ms / 1000, timeout=args.timeout)
            watch.phase = f"leave of {leaver.name}"
            watch.t0 = time.monotonic()
            impl.leave(leaver)
            watch.run()
            res["leave_s"] = watch.all()
            res["leave_first_s"] = watch.first()
            res["false_deaths"] += sorted(watch.false_deaths)
            res["polls"] += watch.polls
            if res["leave_s"] is None:
                res["notes"].append(
                    f"leave not seen by all in {args.timeout:.0f} s: {watch.describe_missing()}")
            try:
                assert leaver.proc is not None
                leaver.proc.wait(timeout=15)
                res["leaver_exit"] = leaver.proc.returncode
            except subprocess.TimeoutExpired:
                res["notes"].append("the leaving agent had not exited 15 s after the leave")
            log(f"  {impl.label} N={n}: leave seen by all {_fmt(res['leave_s'])} s")

        # -- 4. healthy members marked dead, also in the logs (covers the idle window) ----------
        allowed = {victim.name for victim in victims}
        for nd in nodes:
            for name in impl.false_deaths_in_log(nd, allowed):
                res["false_deaths"].append((nd.name, name, "in its log"))
        res["false_deaths"] = sorted(set(map(tuple, res["false_deaths"])))
        res["false_death_members"] = sorted({fd[1] for fd in res["false_deaths"]})
        return res
    finally:
        reserved.release_all()
        for nd in nodes:
            impl.close(nd)
            if nd.proc is not None and nd.proc.poll() is None:
                try:
                    os.killpg(nd.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for nd in nodes:
            if nd.proc is not None:
                try:
                    nd.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        bench_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        res["bench_cpu_s"] = (bench_cpu1.ru_utime + bench_cpu1.ru_stime
                              - bench_cpu0.ru_utime - bench_cpu0.ru_stime)


# -- report -------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 2) -> str:
    return "timeout" if v is None else f"{v:.{digits}f}"


TIMINGS = {"join_s", "join_first_s", "detect_first_s", "detect_all_s", "leave_s", "leave_first_s"}


#: Timings measured several times per cluster (--kills): their median pools every sample.
SAMPLES = {"detect_first_s": "detect_first_samples", "detect_all_s": "detect_all_samples"}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median over runs (over all samples of all runs for SAMPLES); a timing that timed
    out counts as infinitely long (so one timed-out run of three still gives a median,
    two give "timeout")."""
    if key in SAMPLES and runs and all(SAMPLES[key] in r for r in runs):
        vals = [v for r in runs for v in r[SAMPLES[key]]] + [math.inf for r in runs if r.get(key) is None]
    elif key in TIMINGS:
        vals = [math.inf if r.get(key) is None else r[key] for r in runs]
    else:
        vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None
    return float(statistics.median(vals))


def _timeouts(runs: list[dict[str, Any]], key: str) -> int:
    return sum(1 for r in runs if r.get(key) is None) if key in TIMINGS else 0


METRICS = [
    # key, label, digits, goal kind, goal value
    ("join_s", "join convergence, all N alive everywhere (s)", 2, "ratio", 1.0),
    ("detect_first_s", "kill -9 seen dead by first agent, median of all kills (s)", 2, "ratio", 1.0),
    ("detect_all_s", "kill -9 seen dead by all agents, median of all kills (s)", 2, "ratio", 1.0),
    ("leave_s", "graceful leave seen by all (s)", 2, "ratio", 1.0),
    ("rss_mib", "idle RSS per agent, median (MiB)", 1, "abs", 40.0),
    ("cpu_s_per_min", "idle CPU per agent, mean (CPU-s/min)", 3, "ratio", 2.0),
    ("bytes_per_node_s", "bytes sent per node (B/s)", 0, "ratio", 1.0),
]


def report(n: int, ours: list[dict[str, Any]], serf: list[dict[str, Any]], idle: float) -> tuple[str, dict]:
    warm = [r["warmup_s"] for r in ours + serf if r.get("warmup_s") is not None]
    lines = [f"### N = {n}  (median of {max(len(ours), len(serf))} run(s); idle window {idle:.0f} s, "
             f"starting {min(warm, default=0):.0f} s after the last agent started)", "",
             "| metric | ours | serf | ours/serf | goal | result |",
             "|---|---:|---:|---:|---|---|"]
    summary: dict[str, Any] = {"n": n, "metrics": {}}
    for key, label, digits, kind, goal in METRICS:
        o = _median(ours, key) if ours else None
        s = _median(serf, key) if serf else None
        finite = o is not None and s is not None and math.isfinite(o) and math.isfinite(s)
        ratio = o / s if finite and s else None
        if kind == "ratio":
            goal_txt = f"<= {goal:g}x serf"
            verdict = "n/a" if ratio is None else ("PASS" if ratio <= goal else "MISS")
        else:
            goal_txt = f"<= {goal:g}"
            verdict = "n/a" if o is None else ("PASS" if o <= goal else "MISS")
        if ours and o is not None and math.isinf(o):
            verdict = "MISS"
        elif kind == "ratio" and o is not None and s is not None and math.isfinite(o) and math.isinf(s):
            verdict = "PASS"  # we finished, Serf timed out
        lab = label
        if key == "bytes_per_node_s" and ours:
            methods = {r.get("bytes_method") for r in ours + serf if r.get("bytes_method")}
            lab += f" [{', '.join(sorted(methods)) or 'unavailable'}]"
        lines.append(f"| {lab} | {_cell(o, digits, bool(ours), timeouts=_timeouts(ours, key))} | "
                     f"{_cell(s, digits, bool(serf), timeouts=_timeouts(serf, key))} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}x'} | {goal_txt} | {verdict} |")
        summary["metrics"][key] = {"ours": _jsonable(o), "serf": _jsonable(s), "ratio": ratio,
                                   "goal": goal_txt, "result": verdict}
    fd_o = [len(r.get("false_death_members", [])) for r in ours]
    fd_s = [len(r.get("false_death_members", [])) for r in serf]
    verdict = "n/a" if not ours else ("PASS" if sum(fd_o) == 0 else "MISS")
    lines.append(f"| healthy members ever marked dead (per run) | {_list(fd_o)} | {_list(fd_s)} | - | "
                 f"0 | {verdict} |")
    summary["metrics"]["false_deaths"] = {"ours": fd_o, "serf": fd_s, "result": verdict}
    sus_o = [r.get("false_suspects", 0) for r in ours]
    sus_s = [r.get("false_suspects", 0) for r in serf]
    lines.append(f"| (info) healthy members seen suspect, observer pairs (per run) | {_list(sus_o)} | "
                 f"{_list(sus_s)} | - | - | - |")
    for key, label, digits in [("join_first_s", "first agent with N alive (s)", 2),
                               ("rss_max_mib", "idle RSS per agent, max (MiB)", 1),
                               ("cpu_s_per_min_max", "idle CPU per agent, max (CPU-s/min)", 3),
                               ("udp_bytes_per_node_s", "of which UDP, per node (B/s)", 0),
                               ("tcp_bytes_per_node_s", "of which TCP (push-pull), per node (B/s)", 0),
                               ("api_bytes_per_node_s", "our API counters: bytes sent per node (B/s)", 0),
                               ("join_cpu_s", "join burst: CPU used by all agents together (CPU-s)", 2),
                               ("startup_s", f"start {n} agents one by one (s)", 1),
                               ("bench_cpu_s", "benchmark process CPU per cluster (s)", 1)]:
        o = _median(ours, key) if ours else None
        s = _median(serf, key) if serf else None
        if o is None and s is None:
            continue
        lines.append(f"| (info) {label} | {_cell(o, digits, bool(ours), 'n/a')} | "
                     f"{_cell(s, digits, bool(serf), 'n/a')} | - | - | - |")
    notes = [f"{r['impl']} run {i + 1}: {note}" for group in (ours, serf)
             for i, r in enumerate(group) for note in r.get("notes", [])]
    for group in (ours, serf):
        for i, r in enumerate(group):
            if r.get("false_deaths"):
                notes.append(f"{r['impl']} run {i + 1}: healthy marked dead (observer, member, how): "
                             f"{r['false_deaths'][:6]}")
    if notes:
        lines.append("")
        lines.extend(f"- {x}" for x in notes)
    return "\n".join(lines), summary


def _jsonable(v: float | None) -> float | str | None:
    return "timeout" if v is not None and math.isinf(v) else v


def _cell(v: float | None, digits: int, present: bool, missing: str = "n/a", timeouts: int = 0) -> str:
    if not present:
        return "-"
    if v is None:
        return missing
    text = "timeout" if math.isinf(v) else f"{v:.{digits}f}"
    return text + (f" ({timeouts} run(s) timed out)" if timeouts and math.isfinite(v) else "")


def _list(vals: list[int]) -> str:
    return ",".join(str(v) for v in vals) if vals else "-"


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,25,50", help="comma-separated cluster sizes (default 10,25,50)")
    ap.add_argument("--runs", type=int, default=3, help="fresh clusters per size and implementation")
    ap.add_argument("--only", choices=("ours", "serf"), help="benchmark one implementation only")
    ap.add_argument("--json", action="store_true", help="print JSON (all runs and medians) instead of tables")
    ap.add_argument("--idle-seconds", type=float, default=None,
                    help="idle window for CPU/RSS/bytes (default: 30 s, or one whole push-pull period "
                         "when memberlist scales it beyond 30 s, e.g. 60 s at N=50)")
    ap.add_argument("--settle-seconds", type=float, default=5.0, help="wait after convergence before idling")
    ap.add_argument("--warmup-seconds", type=float, default=None,
                    help="start the idle window no sooner than this after the last agent started "
                         "(default: 30 s + memberlist's scaled push-pull interval, so that push-pull "
                         "is periodic for both implementations)")
    ap.add_argument("--poll-ms", type=float, default=50.0, help="per-agent poll interval (default 50)")
    ap.add_argument("--kills", type=int, default=3,
                    help="agents killed one after another per cluster for failure detection; the cluster's "
                         "median counts (default 3)")
    ap.add_argument("--timeout", type=float, default=60.0, help="give up on a phase after this long (s)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the agents' logs (temp dir)")
    ap.add_argument("--save", metavar="FILE", help="also write every run's raw numbers as JSON to FILE")
    ap.add_argument("--ref", help="benchmark this git revision of our code (e.g. HEAD) instead of a "
                                  "snapshot of the working tree taken at start")
    ap.add_argument("--src", help="benchmark the packages in this directory (e.g. a patched copy) instead")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if not MESH_AGENT.exists() and args.only != "serf":
        print(f"bench_cluster: {MESH_AGENT} not found", file=sys.stderr)
        return 2
    if not Path(SERF).exists() and args.only != "ours":
        print(f"bench_cluster: serf not found at {SERF}", file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="bench_cluster_"))
    try:
        src, measured = snapshot_source(workdir / "src", args.ref,
                                        Path(args.src).resolve() if args.src else None)
    except (OSError, RuntimeError, subprocess.SubprocessError, tarfile.TarError) as exc:
        print(f"bench_cluster: cannot snapshot our code: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 2
    env = dict(os.environ, PYTHONPATH=str(src))
    key = subprocess.run([str(MESH_AGENT), "keygen"], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    impls: list[Impl] = [c(key, env if c is Ours else None)
                         for c in (Ours, Serf) if args.only in (None, c.label)]
    log(f"ours: {measured}")
    counters = ByteCounters()
    counters.setup()
    if not counters.ok:
        log(f"iptables unavailable ({counters.error}); bytes come from our API counters, Serf's are n/a")
    log(f"logs in {workdir}; sizes {sizes}, runs {args.runs}, "
        f"idle {', '.join(f'{idle_seconds(args, n):.0f}' for n in sizes)} s, "
        f"poll {args.poll_ms:.0f} ms, implementations {[i.label for i in impls]}")
    results: dict[int, dict[str, list[dict[str, Any]]]] = {}
    startup_failures: list[str] = []
    tables: list[str] = []
    summaries = []
    started = time.monotonic()
    try:
        for n in sizes:
            results[n] = {i.label: [] for i in impls}
            for run in range(args.runs):
                for impl in impls:  # interleaved, so drift on the machine hits both alike
                    for attempt in range(1, 4):
                        log(f"{impl.label} N={n} run {run + 1}/{args.runs}"
                            + (f" (attempt {attempt})" if attempt > 1 else ""))
                        try:
                            results[n][impl.label].append(run_cluster(impl, n, args, counters, workdir))
                            break
                        except StartupFailure as exc:
                            log(f"  {impl.label} N={n}: could not start the cluster: {exc}")
                            startup_failures.append(f"{impl.label} N={n} run {run + 1}: {exc}")
            table, summary = report(n, results[n].get("ours", []), results[n].get("serf", []),
                                    idle_seconds(args, n))
            tables.append(table)
            summaries.append(summary)
            if not args.json:
                print(table + "\n", flush=True)
    finally:
        counters.teardown()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    dump = json.dumps({"ours_code": measured, "sizes": sizes, "runs": args.runs,
                       "idle_seconds": {str(n): idle_seconds(args, n) for n in sizes},
                       "poll_ms": args.poll_ms, "summary": summaries, "startup_failures": startup_failures,
                       "results": {str(k): v for k, v in results.items()}}, indent=2, default=list)
    if args.save:
        Path(args.save).write_text(dump + "\n")
    if args.json:
        print(dump)
    else:
        method = ("iptables byte counters (OUTPUT on lo, per gossip port)" if not counters.error
                  else f"our API counters, Serf n/a (iptables failed: {counters.error})")
        print("Goals (from the issue): join, detection and leave <= 1.0x Serf; idle CPU <= 2x Serf; "
              "bytes sent <= 1.0x Serf; RSS <= 40 MiB per agent; no healthy member ever marked dead.")
        print(f"Ours: {measured}; mesh-agent --profile lan --key (encrypted). "
              f"Serf {SERF}: -profile=lan -encrypt. "
              f"Bytes: {method}. Total time {time.monotonic() - started:.0f} s.")
        for failure in startup_failures:
            print(f"Set-up failure (the run was retried): {failure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
