"""Side-by-side data-plane benchmark on loopback: direct, through the mesh, and through stunnel.

Three paths to one echo/sink server, measured in the same invocation, interleaved run by run:

* ``direct``  -- client -> server: the ceiling of the load generator and server themselves;
* ``relay``   -- client -> trio relay -> trio relay -> server (``simulations/trio_relay.py``): two
  plain relays on the agents' own socket layer, with no cipher, no multiplexing and no policy.
  It is what trio costs a proxy written the plain way (a task per direction, one trip through
  the scheduler per readable socket), so its ratio to stunnel says how much of a gap is the
  stack and how much the design; the mesh's own reactor (``dataplane/reactor.py``) avoids
  that trip, and passes the relay at 16 connections;
* ``mesh``    -- client -> agent A's upstream port -> Noise tunnel -> agent B -> server
  (two real ``mesh-agent`` processes, encrypted gossip, ``--profile local``);
* ``stunnel`` -- client -> stunnel client -> TLS 1.3 -> stunnel server -> server (Debian's
  ``stunnel4``, the classic encrypted two-hop; the yardstick).  The client verifies the server's
  throwaway self-signed certificate and resumes sessions (stunnel's default).  Its per-connection
  log lines are off (``debug = warning``), as the agents log no line per connection either: at
  stunnel's default level, notice, it makes several times fewer connections per second here.

Measurements (each the median of ``--runs`` runs):

1. bulk: one connection streams ``--bulk-mib`` MiB *one way* into a sink, which answers with
   the byte count once it has seen EOF; MB/s (10^6 bytes) from connect() to that answer;
2. request/response: 1 KiB request, 1 KiB echoed response, in a closed loop on 1 and on 16
   connections for ``--seconds`` (after ``--warmup`` unrecorded); p50/p99 latency and req/s;
3. connection rate: connect, a 64-byte request/response, close, on 1 and on 16 concurrent
   slots; new connections per second.

The load generator and the server are a small C program (epoll, non-blocking sockets), compiled
here at run time with ``cc -O2``: Python threads would measure the GIL, not the proxies.  The
``direct`` column is that check -- its figures must sit far above the proxies'.  Alongside the
speed it reports the CPU the proxy processes burned per unit of work (from /proc), which does not
depend on how two cores are shared between the client, the proxies and the server.

It prints one Markdown table with the mesh's ratio to stunnel and the issue's goals.  It is a
benchmark, not a test: it exits 0 whatever the numbers say.

    .venv/bin/python simulations/bench_proxy.py --runs 3          # make bench-proxy
    .venv/bin/python simulations/bench_proxy.py --quick           # smoke run, about a minute
    .venv/bin/python simulations/bench_proxy.py --runs 0 --pyspy /tmp/prof   # profile the agents only

Needs ``cc``, ``openssl`` and Debian's ``stunnel4`` (without it the stunnel column is skipped);
``--pyspy`` needs py-spy (in the venv with the test extras) and ptrace rights (root).  Standard
library only; it imports nothing from the project (the agents run from a snapshot of the code).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations.bench_cluster import proc_cpu_seconds
from simulations.bench_cluster import snapshot_source as _snapshot_source
from simulations.harness import Processes
from simulations.harness import free_port as _free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MESH_AGENT = Path(sys.executable).parent / "mesh-agent"
PY_SPY = Path(sys.executable).parent / "py-spy"
HOST = "127.0.0.1"
SERVICE = "bench-echo"
PATHS = ("direct", "relay", "mesh", "stunnel")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class SetupError(Exception):
    """A path could not be set up; worded for the user."""


# -- the C load generator and server ---------------------------------------------------------

#: The load generator and echo/sink server, compiled at run time (see its header).
C_SOURCE_FILE = Path(__file__).with_name("meshbench.c")


def build_tool(workdir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SetupError("no C compiler (cc/gcc) found: apt-get install gcc")
    out = workdir / "meshbench"
    res = subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(C_SOURCE_FILE)], capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise SetupError(f"compiling the load generator failed:\n{res.stderr.strip()}")
    return out


# -- processes, ports, /proc --------------------------------------------------------------


_taken: set[int] = set()


def free_port(udp_too: bool = False) -> int:
    try:
        return _free_port(_taken, udp_too)
    except RuntimeError as exc:
        raise SetupError(str(exc)) from None


def cpu_seconds(pid: int) -> float:
    return proc_cpu_seconds(pid) or 0.0


def wait_for(pred: Callable[[], bool], timeout: float, what: str,
             last_state: Callable[[], str] | None = None, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            state = last_state() if last_state else ""
            raise SetupError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"; {state}" if state else ""))
        time.sleep(interval)


def probe(port: int) -> bool:
    """One tiny echo exchange: True if the bytes came back."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as c:
            c.settimeout(2)
            c.sendall(b"Eping")
            got = b""
            while len(got) < 4:
                d = c.recv(4 - len(got))
                if not d:
                    return False
                got += d
            return got == b"ping"
    except OSError:
        return False


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc.strerror})"


def _run(argv: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise SetupError(f"{' '.join(argv[:3])}... failed: {(res.stderr or res.stdout).strip()[-300:]}")
    return res.stdout


# -- which code the agents run ---------------------------------------------------------------


def snapshot_source(dest: Path, ref: str | None, src_root: Path | None) -> tuple[Path, str]:
    """Copy our packages to ``dest`` (both agents then import the same code even while the tree
    is being edited; the venv's install is editable) and say what was copied: bench_cluster's."""
    try:
        return _snapshot_source(dest, ref, src_root)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        raise SetupError(f"{exc} (try --ref HEAD)") from None


# -- the three paths -------------------------------------------------------------------------


@dataclass
class Target:
    label: str
    port: int  # where the client connects
    pids: list[int] = field(default_factory=list)  # the proxy processes, for CPU accounting
    names: list[str] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)


def start_server(tool: Path, procs: Processes, workdir: Path) -> tuple[int, int]:
    port = free_port()
    p = procs.start([str(tool), "server", str(port)], workdir / "server.log")
    wait_for(lambda: probe(port) or p.poll() is not None, 10, "the echo server")
    if p.poll() is not None:
        raise SetupError(f"the echo server exited: {_tail(workdir / 'server.log')}")
    return port, p.pid


def _api(port: int, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise SetupError(f"{method} {path}: HTTP {exc.code} {exc.read()[:200]!r}") from None


def _api_or_none(port: int, method: str, path: str) -> Any:
    try:
        return _api(port, method, path, timeout=2.0)
    except (OSError, SetupError, ValueError):
        return None


def start_mesh(server_port: int, procs: Processes, workdir: Path, env: dict[str, str],
               log_level: str) -> Target:
    key = _run([str(MESH_AGENT), "keygen"], env=env).strip()
    agents: list[dict[str, Any]] = []
    for name in ("bench-a", "bench-b"):
        gossip, api, tunnel = free_port(udp_too=True), free_port(), free_port()
        data_dir = workdir / name
        data_dir.mkdir()
        argv = [str(MESH_AGENT), "agent", "--name", name, "--bind", f"{HOST}:{gossip}", "--api", f"{HOST}:{api}",
                "--tunnel", f"{HOST}:{tunnel}", "--key", key, "--profile", "local", "--data-dir", str(data_dir),
                "--log-level", log_level]
        if agents:
            argv += ["--join", f"{HOST}:{agents[0]['gossip']}"]
        log_path = workdir / f"{name}.log"
        p = procs.start(argv, log_path, env=env, cwd=workdir)
        agents.append({"name": name, "gossip": gossip, "api": api, "proc": p, "log": log_path})
    a, b = agents
    for ag in agents:
        def api_up(ag: dict[str, Any] = ag) -> bool:
            return _api_or_none(ag["api"], "GET", "/v1/health") is not None or ag["proc"].poll() is not None

        wait_for(api_up, 30, f"agent {ag['name']}'s API")
        if ag["proc"].poll() is not None:
            raise SetupError(f"agent {ag['name']} exited at start: {_tail(ag['log'])}")

    def converged() -> bool:
        for ag in agents:
            ms = _api_or_none(ag["api"], "GET", "/v1/members") or []
            if sorted(m["name"] for m in ms if m.get("status") == "alive") != ["bench-a", "bench-b"]:
                return False
        return True

    wait_for(converged, 30, "the two agents to see each other alive",
             lambda: str([_api_or_none(ag["api"], "GET", "/v1/members") for ag in agents]))
    _api(b["api"], "PUT", "/v1/services", {"name": SERVICE, "port": server_port, "address": HOST})
    wait_for(lambda: len(_api_or_none(a["api"], "GET", f"/v1/services/{SERVICE}?passing") or []) == 1, 30,
             f"agent A to see {SERVICE} passing on agent B")
    listen = free_port()
    _api(a["api"], "PUT", "/v1/upstreams", {"service": SERVICE, "listen": f"{HOST}:{listen}"})
    wait_for(lambda: probe(listen), 30, "the upstream on agent A to reach the echo server",
             lambda: f"A: {_tail(a['log'], 3)} B: {_tail(b['log'], 3)}")
    return Target("mesh", listen, [a["proc"].pid, b["proc"].pid], ["agent A", "agent B"], [a["log"], b["log"]])


def start_relays(server_port: int, procs: Processes, workdir: Path, env: dict[str, str]) -> Target:
    """Two trio_relay.py processes in a chain in front of the server: hop 1 takes the client,
    hop 2 reaches the server.  Hop 2 starts first, so hop 1 has somewhere to connect."""
    first, second = free_port(), free_port()
    relays = Target("relay", first)
    for hop, listen, target in ((2, second, server_port), (1, first, second)):
        log_path = workdir / f"relay{hop}.log"
        p = procs.start([sys.executable, str(HERE / "trio_relay.py"), str(listen), str(target)], log_path,
                        env=env, cwd=workdir)
        wait_for(lambda port=listen, proc=p: probe(port) or proc.poll() is not None, 30, f"relay {hop}")
        if p.poll() is not None:
            raise SetupError(f"relay {hop} exited at start: {_tail(log_path)}")
        relays.pids.append(p.pid)
        relays.names.append(f"relay {hop}")
        relays.logs.append(log_path)
    return relays


def stunnel_binary() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


def start_stunnel(binary: str, server_port: int, procs: Processes, workdir: Path, cert_kind: str,
                  debug: str) -> Target:
    d = workdir / "stunnel"
    d.mkdir()
    cert, key = d / "cert.pem", d / "key.pem"
    newkey = ["-newkey", "rsa:2048"] if cert_kind == "rsa" else ["-newkey", "ec", "-pkeyopt",
                                                                 "ec_paramgen_curve:prime256v1"]
    _run(["openssl", "req", "-x509", *newkey, "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
          "-subj", "/CN=bench-stunnel", "-addext", "subjectAltName=DNS:bench-stunnel"])
    tls_port, entry = free_port(), free_port()
    common = f"foreground = yes\npid =\ndebug = {debug}\n"
    (d / "server.conf").write_text(
        common + f"[bench]\naccept = {HOST}:{tls_port}\nconnect = {HOST}:{server_port}\ncert = {cert}\n"
        f"key = {key}\nsslVersionMin = TLSv1.3\n")
    (d / "client.conf").write_text(
        common + f"[bench]\nclient = yes\naccept = {HOST}:{entry}\nconnect = {HOST}:{tls_port}\n"
        f"sslVersionMin = TLSv1.3\nverifyPeer = yes\nCAfile = {cert}\n")
    srv = procs.start([binary, str(d / "server.conf")], d / "server.log")
    cli = procs.start([binary, str(d / "client.conf")], d / "client.log")
    wait_for(lambda: probe(entry) or srv.poll() is not None or cli.poll() is not None, 20,
             "stunnel client -> server -> echo", lambda: _tail(d / "client.log", 3))
    for p, name in ((srv, "server"), (cli, "client")):
        if p.poll() is not None:
            raise SetupError(f"stunnel {name} exited: {_tail(d / f'{name}.log')}")
    return Target("stunnel", entry, [cli.pid, srv.pid], ["stunnel client", "stunnel server"],
                  [d / "client.log", d / "server.log"])


# -- measurements ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Test:
    key: str
    mode: str  # bulk | rr | conn
    conc: int = 1


TESTS = (Test("bulk", "bulk"), Test("rr1", "rr", 1), Test("rr16", "rr", 16),
         Test("conn1", "conn", 1), Test("conn16", "conn", 16))


def measure(tool: Path, target: Target, test: Test, args: argparse.Namespace) -> dict[str, Any]:
    """One run of one test on one path: the generator's numbers plus the proxies' CPU."""
    if test.mode == "bulk":
        argv = [str(tool), "bulk", str(target.port), str(args.bulk_mib * 1024 * 1024)]
        timeout = 600.0
    else:
        size = 1024 if test.mode == "rr" else 64
        argv = [str(tool), test.mode, str(target.port), str(test.conc), str(args.seconds), str(size),
                str(args.warmup)]
        timeout = args.seconds + args.warmup + 60
    cpu0 = [cpu_seconds(p) for p in target.pids]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no answer in {timeout:.0f} s"}
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = [cpu_seconds(p) for p in target.pids]
    try:
        out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "error": f"generator exit {res.returncode}: {res.stderr.strip()[-200:]}"}
    out["wall_s"] = wall
    out["proxy_cpu_s"] = sum(cpu1) - sum(cpu0)
    out["proxy_cpu_each_s"] = [round(b - a, 3) for a, b in zip(cpu0, cpu1, strict=True)]
    out["client_cpu_s"] = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    if test.mode == "bulk":
        if not out.get("ok"):
            return out
        out["mb_s"] = out["bytes"] / out["seconds"] / 1e6
        # CPU-seconds per GB through both proxies together.
        if target.pids:
            out["cpu_per_gb"] = out["proxy_cpu_s"] / (out["bytes"] / 1e9)
    else:
        # Whole-run CPU (warm-up and set-up included) per operation at the recorded rate: approximate.
        ops_total = out["rate"] * wall
        if target.pids and ops_total:
            out["cpu_us_per_op"] = out["proxy_cpu_s"] / ops_total * 1e6
        if out.get("errors"):
            out["note"] = f"{out['errors']} error(s), first: {out.get('first_error')}"
    return out


def metric_values(test_key: str, r: dict[str, Any]) -> dict[str, float | None]:
    """The table's metrics from one measurement."""
    ok = bool(r.get("ok"))

    def g(k: str) -> float | None:
        v = r.get(k)
        return float(v) if ok and isinstance(v, (int, float)) and v >= 0 else None

    if test_key == "bulk":
        return {"bulk_mb_s": g("mb_s"), "bulk_cpu_per_gb": g("cpu_per_gb")}
    prefix = test_key
    out = {f"{prefix}_rate": g("rate"), f"{prefix}_p50": g("p50_us"), f"{prefix}_p99": g("p99_us"),
           f"{prefix}_cpu_us": g("cpu_us_per_op")}
    if ok and r.get("errors"):
        out[f"{prefix}_errors"] = float(r["errors"])
    return out


# -- profiling the agents ----------------------------------------------------------------------


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py)`` with the path cut to the package part."""
    m = re.match(r"(.*) \((.*)\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    path = re.sub(r"^.*/(site-packages|src)/", "", path)
    return f"{func} ({path})"


def summarize_raw(path: Path, seconds: float, rate: int, top: int) -> str:
    """Top frames by self and inclusive samples, and self samples by file, from py-spy's raw output."""
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        m = re.search(r"\(([^()]*)\)$", frames[-1])
        by_file[m.group(1) if m else frames[-1]] += n
    if not total:
        return "  (no samples)"
    busy = total / (seconds * rate)
    lines = [f"  {total} samples of {seconds * rate:.0f} possible: the agent's Python thread was busy "
             f"{100 * busy:.0f}% of the time"]
    for title, counter in (("self", self_c), ("inclusive", incl), ("self, by file", by_file)):
        lines.append(f"  top by {title}:")
        for name, n in counter.most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {name}")
    return "\n".join(lines)


def pyspy_profile(tool: Path, mesh: Target, args: argparse.Namespace, outdir: Path) -> str:
    """py-spy on both agents while the mesh carries bulk and then c=16 request/response load."""
    outdir.mkdir(parents=True, exist_ok=True)
    secs, rate = args.pyspy_seconds, 100
    report: list[str] = []
    for workload in args.pyspy_loads.split(","):
        if workload == "bulk":
            # Back-to-back bulk transfers, from a shell loop, for as long as py-spy records.
            load = subprocess.Popen(["/bin/sh", "-c", f'while :; do "{tool}" bulk {mesh.port} '
                                     f'{args.bulk_mib * 1024 * 1024} || exit 1; done'],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        else:
            load = subprocess.Popen([str(tool), "rr", str(mesh.port), workload.removeprefix("rr"), str(secs + 3),
                                     "1024", "0.5"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        spies: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        try:
            time.sleep(1.0)
            for pid, name in zip(mesh.pids, ("a", "b"), strict=True):
                out = outdir / f"{workload}-agent-{name}.raw"
                spies.append((name, out, subprocess.Popen(
                    [str(PY_SPY), "record", "-p", str(pid), "-d", str(secs), "-r", str(rate), "--format", "raw",
                     "--nolineno", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
            for name, out, spy in spies:
                _, err = spy.communicate(timeout=secs + 60)
                if spy.returncode != 0 or not out.exists():
                    report.append(f"### py-spy, {workload}, agent {name.upper()}: failed: "
                                  f"{err.decode(errors='replace').strip()[-300:]}")
                    continue
                report.append(f"### py-spy, {workload} load, agent {name.upper()} ({out})")
                report.append(summarize_raw(out, secs, rate, args.pyspy_top))
        finally:
            for _, _, spy in spies:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait(timeout=10)
            if load.poll() is None:
                os.killpg(load.pid, signal.SIGKILL)
            load.wait(timeout=10)
    return "\n".join(report)


# -- report -------------------------------------------------------------------------------

METRICS: list[tuple[str, str, int, tuple[str, float] | None]] = [
    # key, label, digits, goal as (">=" or "<=", ratio of mesh to stunnel)
    ("bulk_mb_s", "bulk throughput, 1 connection one way into a sink (MB/s)", 0, (">=", 1.0)),
    ("rr1_p50", "1 KiB req/resp, c=1: p50 latency (us)", 0, ("<=", 2.0)),
    ("rr1_p99", "1 KiB req/resp, c=1: p99 latency (us)", 0, None),
    ("rr1_rate", "1 KiB req/resp, c=1: requests/s", 0, None),
    ("rr16_rate", "1 KiB req/resp, c=16: requests/s", 0, (">=", 0.5)),
    ("rr16_p50", "1 KiB req/resp, c=16: p50 latency (us)", 0, None),
    ("rr16_p99", "1 KiB req/resp, c=16: p99 latency (us)", 0, None),
    ("conn1_rate", "new connections/s, c=1 (connect, 64 B req/resp, close)", 0, (">=", 1.0)),
    ("conn16_rate", "new connections/s, c=16", 0, (">=", 1.0)),
    ("conn1_p50", "(info) c=1: connect to answer, p50 (us)", 0, None),
    ("bulk_cpu_per_gb", "(info) both proxies' CPU per GB of bulk (CPU-s)", 2, None),
    ("rr1_cpu_us", "(info) both proxies' CPU per request, c=1 (us)", 0, None),
    ("rr16_cpu_us", "(info) both proxies' CPU per request, c=16 (us)", 0, None),
    ("conn16_cpu_us", "(info) both proxies' CPU per connection, c=16 (us)", 0, None),
]


def median_of(runs: list[dict[str, float | None]], key: str) -> float | None:
    vals = [v for r in runs if (v := r.get(key)) is not None]
    return float(statistics.median(vals)) if vals else None


def _cell(v: float | None, digits: int, present: bool) -> str:
    if not present:
        return "-"
    return "n/a" if v is None else f"{v:,.{digits}f}"


def report(per_path: dict[str, list[dict[str, float | None]]]) -> tuple[str, dict[str, Any]]:
    runs = max((len(v) for v in per_path.values()), default=0)
    lines = [f"### Data plane on loopback: median of {runs} run(s)", "",
             "| metric | direct | trio relay x2 | mesh | stunnel | relay/stunnel | mesh/stunnel | goal | result |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    summary: dict[str, Any] = {}
    for key, label, digits, goal in METRICS:
        med = {p: median_of(per_path[p], key) if per_path.get(p) else None for p in PATHS}
        m, s, r = med["mesh"], med["stunnel"], med["relay"]
        ratio = m / s if m is not None and s else None
        floor = r / s if r is not None and s else None
        if goal is None:
            goal_txt, verdict = "-", "-"
        else:
            op, g = goal
            goal_txt = f"{op} {g:g}x stunnel"
            if ratio is None:
                verdict = "n/a"
            else:
                verdict = "PASS" if (ratio >= g if op == ">=" else ratio <= g) else "MISS"
        lines.append(f"| {label} | " + " | ".join(_cell(med[p], digits, bool(per_path.get(p))) for p in PATHS)
                     + f" | {'-' if floor is None else f'{floor:.2f}x'}"
                     + f" | {'-' if ratio is None else f'{ratio:.2f}x'} | {goal_txt} | {verdict} |")
        summary[key] = {**med, "ratio": ratio, "relay_ratio": floor, "goal": goal_txt, "result": verdict}
    return "\n".join(lines), summary


def machine_info(stunnel: str | None) -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{os.cpu_count()} CPU(s) {model}", f"Linux {platform.release()}",
             f"Python {platform.python_version()}"]
    if stunnel:
        res = subprocess.run([stunnel, "-version"], capture_output=True, text=True, timeout=10)
        m = re.search(r"stunnel (\S+) on", res.stdout + res.stderr)
        o = re.search(r"Running\s+with (OpenSSL \S+)", res.stdout + res.stderr)
        parts.append(f"stunnel {m.group(1) if m else '?'} ({o.group(1) if o else 'OpenSSL ?'})")
    return ", ".join(parts)


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", type=int, help="runs per test and path; the table shows medians (default 3; "
                                             "0: set up and profile only)")
    ap.add_argument("--seconds", type=float, help="recorded seconds per req/resp and conn test (default 5)")
    ap.add_argument("--warmup", type=float, help="unrecorded seconds before each of those (default 0.5)")
    ap.add_argument("--bulk-mib", type=int, help="MiB per bulk transfer (default 512)")
    ap.add_argument("--quick", action="store_true", help="smoke run: defaults become 1 run, 1 s tests, "
                                                         "0.3 s warm-up, 32 MiB bulk")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of direct,relay,mesh,stunnel")
    ap.add_argument("--stunnel-cert", choices=("rsa", "ec"), default="rsa",
                    help="stunnel server certificate: RSA 2048 (default) or ECDSA P-256")
    ap.add_argument("--stunnel-debug", default="warning",
                    help="stunnel's log level (default warning; stunnel's own default, notice, logs every "
                         "connection, which here costs it ~6x in connections/s, and our agents do not)")
    ap.add_argument("--agent-log-level", default="info", help="the agents' --log-level (default info)")
    ap.add_argument("--ref", help="run the agents from this git revision (e.g. HEAD) instead of a snapshot "
                                  "of the working tree taken at start")
    ap.add_argument("--src", help="run the agents from the packages in this directory instead")
    ap.add_argument("--pyspy", metavar="DIR", help="afterwards, profile both agents with py-spy under bulk "
                                                   "and c=16 req/resp load; raw profiles go to DIR")
    ap.add_argument("--pyspy-seconds", type=int, default=5, help="py-spy recording per load (default 5)")
    ap.add_argument("--pyspy-loads", default="bulk,rr16",
                    help="loads to profile under: bulk and/or rrN (N concurrent 1 KiB req/resp; default bulk,rr16)")
    ap.add_argument("--pyspy-top", type=int, default=15, help="frames listed per ranking (default 15)")
    ap.add_argument("--save", metavar="FILE", help="also write every run's numbers as JSON to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    args = ap.parse_args(argv)
    for name, normal, quick in (("runs", 3, 1), ("seconds", 5.0, 1.0), ("warmup", 0.5, 0.3), ("bulk_mib", 512, 32)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    paths = [p for p in PATHS if p in {x.strip() for x in args.paths.split(",")}]

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="bench_proxy_"))
    procs = Processes()
    started = time.monotonic()
    stunnel = stunnel_binary()
    notes: list[str] = []
    try:
        tool = build_tool(workdir)
        server_port, _ = start_server(tool, procs, workdir)
        targets: dict[str, Target] = {}
        if "direct" in paths:
            targets["direct"] = Target("direct", server_port)
        measured = "-"
        if "mesh" in paths or "relay" in paths or args.pyspy:
            if not MESH_AGENT.exists():
                raise SetupError(f"{MESH_AGENT} not found: run `make` / pip install -e . first")
            src, measured = snapshot_source(workdir / "src", args.ref, Path(args.src).resolve() if args.src else None)
            env = dict(os.environ, PYTHONPATH=str(src))
            if "relay" in paths:
                targets["relay"] = start_relays(server_port, procs, workdir, env)
        if "mesh" in paths or args.pyspy:
            log(f"mesh: two agents running {measured}")
            targets["mesh"] = start_mesh(server_port, procs, workdir, env, args.agent_log_level)
        if "stunnel" in paths:
            if stunnel is None:
                msg = ("stunnel4 not found (Debian: apt-get install stunnel4): the stunnel column and the "
                       "ratios are skipped")
                log(msg)
                notes.append(msg)
            else:
                targets["stunnel"] = start_stunnel(stunnel, server_port, procs, workdir, args.stunnel_cert,
                                                   args.stunnel_debug)
        order = [p for p in PATHS if p in targets and p in paths]
        log(f"paths {order}, {args.runs} run(s), {args.seconds:g} s per test (+{args.warmup:g} s warm-up), "
            f"bulk {args.bulk_mib} MiB; work dir {workdir}")
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {p: {t.key: [] for t in TESTS} for p in order}
        per_path: dict[str, list[dict[str, float | None]]] = {p: [] for p in order}
        for run in range(args.runs):
            values: dict[str, dict[str, float | None]] = {p: {} for p in order}
            for test in TESTS:
                rot = order[run % len(order):] + order[:run % len(order)] if order else []
                for p in rot:  # interleaved, and the order rotates, so drift hits every path alike
                    r = measure(tool, targets[p], test, args)
                    raw[p][test.key].append(r)
                    values[p].update(metric_values(test.key, r))
                    if not r.get("ok") or r.get("note"):
                        notes.append(f"run {run + 1} {p} {test.key}: {r.get('error') or r.get('note')}")
                    log(f"run {run + 1}/{args.runs} {test.key:6} {p:8} " + _brief(test, r))
            for p in order:
                per_path[p].append(values[p])
        for t in targets.values():
            for pid, name in zip(t.pids, t.names, strict=True):
                if not Path(f"/proc/{pid}").exists():
                    notes.append(f"{t.label}: {name} (pid {pid}) is no longer running")
        text = ""
        if args.runs:
            table, summary = report(per_path)
            text = "\n".join([
                table, "",
                "Goals (issue 4), as ratios to stunnel in the same run: bulk >= 1.0x; req/s at c=16 >= 0.5x; "
                "p50 at c=1 <= 2x; new connections/s >= 1.0x.",
                f"Machine: {machine_info(stunnel)}.",
                f"mesh: 2 mesh-agent processes ({measured}), --profile local, encrypted gossip, Noise IK tunnel; "
                "trio relay x2: simulations/trio_relay.py twice (same code snapshot), plain TCP, no cipher; "
                f"stunnel: TLS 1.3 ({args.stunnel_cert.upper()} certificate, client verifies it), "
                f"debug = {args.stunnel_debug}; load generator and echo/sink server: C, epoll, compiled with cc -O2. "
                f"Bulk {args.bulk_mib} MiB; req/resp and conn tests {args.seconds:g} s each after "
                f"{args.warmup:g} s warm-up. CPU rows: /proc utime+stime of the two proxy processes. "
                f"Total {time.monotonic() - started:.0f} s.",
            ])
            if notes:
                text += "\n\n" + "\n".join(f"- {n}" for n in notes)
            print(text, flush=True)
            if args.save:
                Path(args.save).write_text(json.dumps({"summary": summary, "runs": raw, "notes": notes,
                                                       "machine": machine_info(stunnel), "mesh_code": measured,
                                                       "args": vars(args)}, indent=2) + "\n")
        elif notes:
            print("\n".join(f"- {n}" for n in notes))
        if args.pyspy:
            if not PY_SPY.exists():
                print(f"--pyspy: {PY_SPY} not found (pip install py-spy)", file=sys.stderr)
            else:
                log(f"profiling the agents with py-spy, {args.pyspy_seconds} s per load")
                prof = pyspy_profile(tool, targets["mesh"], args, Path(args.pyspy))
                print("\n" + prof, flush=True)
        return 0
    except SetupError as exc:
        print(f"bench_proxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench_proxy: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        procs.close()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _brief(test: Test, r: dict[str, Any]) -> str:
    if not r.get("ok"):
        return f"FAILED: {r.get('error')}"
    cpu = f"proxies' CPU {r['proxy_cpu_s']:.2f} s" if r.get("proxy_cpu_each_s") else "no proxy"
    if test.mode == "bulk":
        return f"{r['mb_s']:.0f} MB/s ({cpu})"
    extra = f", {r['errors']} errors" if r.get("errors") else ""
    return f"{r['rate']:.0f}/s p50 {r['p50_us']:.0f} us p99 {r['p99_us']:.0f} us ({cpu}{extra})"


if __name__ == "__main__":
    sys.exit(main())
