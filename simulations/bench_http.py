"""HTTP through the mesh, side by side: http mode, tcp mode, haproxy's HTTP chain, and direct.

One invocation, one machine, the paths interleaved run by run, each figure the median of
``--runs`` runs:

* ``direct``  -- wrk -> nginx: the ceiling of the load generator and the server;
* ``tcp``     -- wrk -> agent A's upstream -> Noise tunnel -> agent B -> nginx, the service
  registered as tcp (L4: bytes, one instance per connection);
* ``http``    -- the same two agents, a second service on the same nginx registered as http
  (each request parsed, balanced and re-framed by agent A; agent B watches it go by);
* ``haproxy`` -- wrk -> haproxy -> haproxy -> nginx, both in ``mode http`` with keep-alive to
  the next hop (Debian's haproxy, one thread each): a two-hop HTTP chain, unencrypted.

wrk (Debian's) holds 1, 16 and 64 kept-alive connections for ``--seconds``; nginx answers
every request with 1 KiB.  For each path: requests/s, p50 and p99 latency, and the CPU the
proxy processes burned per request (from /proc), which does not depend on how the two cores
are shared between wrk, nginx and the proxies.  The table ends with the ratios the issue's
goals are stated in.  A benchmark, not a test: it exits 0 whatever the figures.

    .venv/bin/python simulations/bench_http.py --runs 3        # make bench-http
    .venv/bin/python simulations/bench_http.py --quick         # a smoke run
    .venv/bin/python simulations/bench_http.py --ref da71521   # and two agents of that revision
    .venv/bin/python simulations/bench_http.py --chaos 60      # errors a client sees while instances fail

Needs wrk, nginx and haproxy (apt-get install wrk nginx-light haproxy).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations.bench_footprint import compile_as_installed  # noqa: E402
from simulations.bench_proxy import (  # noqa: E402
    HOST,
    MESH_AGENT,
    SetupError,
    _api,
    _api_or_none,
    _run,
    _tail,
    cpu_seconds,
    free_port,
    log,
    snapshot_source,
    wait_for,
)
from simulations.harness import Processes  # noqa: E402

PATHS = ("direct", "tcp", "http", "haproxy")
_nginx_procs: dict[int, Any] = {}
BODY = "x" * 1023 + "\n"


def probe(port: int) -> bool:
    """One HTTP request answered (any status)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as c:
            c.settimeout(2)
            c.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            got = b""
            while len(got) < 12:
                d = c.recv(4096)
                if not d:
                    break
                got += d
            return got.startswith(b"HTTP/1.1 ")
    except OSError:
        return False


@dataclass
class Path_:
    label: str
    port: int
    pids: list[int] = field(default_factory=list)


def start_nginx(procs: Processes, workdir: Path, status: int = 200, name: str = "nginx") -> int:
    port = free_port()
    workdir = workdir / name
    workdir.mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; worker_processes 1; pid {workdir}/nginx.pid;
error_log {workdir}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off; keepalive_requests 1000000; keepalive_timeout 120s;
    client_body_temp_path {workdir}/nginx-body; proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fcgi; uwsgi_temp_path {workdir}/nginx-uwsgi; scgi_temp_path {workdir}/nginx-scgi;
    server {{ listen {HOST}:{port}; location / {{ default_type text/plain; return {status} "{BODY}"; }} }}
}}
""")
    p = procs.start(["nginx", "-c", str(conf), "-p", str(workdir)], workdir / "nginx.log")
    _nginx_procs[port] = p
    wait_for(lambda: probe(port) or p.poll() is not None, 10, "nginx")
    if p.poll() is not None:
        raise SetupError(f"nginx exited: {_tail(workdir / 'nginx.log')} {_tail(workdir / 'nginx.error.log')}")
    return port


def start_haproxy_chain(server: int, procs: Processes, workdir: Path) -> Path_:
    pids = []
    target = server
    for hop in (2, 1):
        port = free_port()
        conf = workdir / f"haproxy{hop}.cfg"
        conf.write_text(f"""
global
    nbthread 1
    maxconn 4000
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend in
    bind {HOST}:{port}
    default_backend out
backend out
    http-reuse always
    server s1 {HOST}:{target}
""")
        p = procs.start(["haproxy", "-f", str(conf), "-db"], workdir / f"haproxy{hop}.log")
        wait_for(lambda port=port, p=p: probe(port) or p.poll() is not None, 10, f"haproxy hop {hop}")
        if p.poll() is not None:
            raise SetupError(f"haproxy exited: {_tail(workdir / f'haproxy{hop}.log')}")
        pids.append(p.pid)
        target = port
    return Path_("haproxy", target, pids)


def start_mesh(server: int, procs: Processes, workdir: Path, env: dict[str, str] | None = None,
               suffix: str = "") -> tuple[Path_, Path_]:
    """Two agents, ``server`` registered on the second as a tcp and an http service, an upstream to
    each on the first; ``env`` (PYTHONPATH) runs another snapshot of our code, ``suffix`` labels it."""
    key = _run([str(MESH_AGENT), "keygen"]).strip()
    agents: list[dict[str, Any]] = []
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", suffix)
    for name in (f"bench-a{tag}", f"bench-b{tag}"):
        gossip, api, tunnel = free_port(udp_too=True), free_port(), free_port()
        argv = [str(MESH_AGENT), "agent", "--name", name, "--bind", f"{HOST}:{gossip}", "--api", f"{HOST}:{api}",
                "--tunnel", f"{HOST}:{tunnel}", "--key", key, "--profile", "local", "--log-level", "warning",
                ]
        if agents:
            argv += ["--join", f"{HOST}:{agents[0]['gossip']}"]
        p = procs.start(argv, workdir / f"{name}.log", env=env)
        agents.append({"name": name, "api": api, "gossip": gossip, "proc": p})
    a, b = agents
    for ag in agents:
        wait_for(lambda ag=ag: (_api_or_none(ag["api"], "GET", "/v1/health") is not None
                                or ag["proc"].poll() is not None), 30, f"agent {ag['name']}")
        if ag["proc"].poll() is not None:
            raise SetupError(f"agent {ag['name']} exited: {_tail(workdir / (ag['name'] + '.log'))}")
    wait_for(lambda: len([m for m in _api_or_none(a["api"], "GET", "/v1/members") or []
                          if m.get("status") == "alive"]) == 2, 30, "the agents to converge")
    out = []
    for protocol in ("tcp", "http"):
        service = f"bench-{protocol}"
        _api(b["api"], "PUT", "/v1/services", {"name": service, "port": server, "address": HOST,
                                               "protocol": protocol})
        wait_for(lambda s=service: len(_api_or_none(a["api"], "GET", f"/v1/services/{s}?passing") or []) == 1,
                 30, f"{service} on agent A")
        listen = free_port()
        _api(a["api"], "PUT", "/v1/upstreams", {"service": service, "listen": f"{HOST}:{listen}"})
        wait_for(lambda listen=listen: probe(listen), 30, f"the {protocol} upstream")
        out.append(Path_(protocol + suffix, listen, [a["proc"].pid, b["proc"].pid]))
    return out[0], out[1]


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _duration(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise SetupError(f"cannot read wrk's duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(path: Path_, conns: int, seconds: float) -> dict[str, float]:
    before = [cpu_seconds(p) for p in path.pids]
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", f"http://{HOST}:{path.port}/"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    spent = [cpu_seconds(p) - b for p, b in zip(path.pids, before, strict=True)]
    cpu = sum(spent)
    m = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (m and rps and p50 and p99):
        raise SetupError(f"wrk's output did not parse:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    if errors or sock:
        log(f"  {path.label} c={conns}: wrk saw errors: {errors.group(0) if errors else ''} "
            f"{sock.group(0) if sock else ''}")
    n = int(m.group(1))
    return {"rps": float(rps.group(1)), "p50": _duration(p50.group(1)), "p99": _duration(p99.group(1)),
            "cpu_us": (cpu / n * 1e6) if path.pids and n else float("nan"),
            # The first hop alone (agent A, the caller; the first haproxy): http mode's one thread there is
            # what bounds its requests/s, so this is the figure its changes move.
            "cpu0_us": (spent[0] / n * 1e6) if path.pids and n else float("nan")}


def chaos(procs: Processes, workdir: Path, seconds: float, scenario: str) -> str:
    """Issue 28's goal: wrk at 16 connections for ``seconds`` through http mode to three instances,
    one of which answers 500 to everything ("fail": ejected, then tried half-open now and then) or is
    killed -9 a third of the way in ("kill"); the client must see no error at all (for "fail": once
    the instance is ejected)."""
    workdir = workdir / scenario
    workdir.mkdir()
    ok1, ok2 = start_nginx(procs, workdir, 200, "ok1"), start_nginx(procs, workdir, 200, "ok2")
    third = start_nginx(procs, workdir, 500 if scenario == "fail" else 200, "third")
    _, http = start_mesh(ok1, procs, workdir)
    b_api = _agent_api(http.pids[1])
    a_api = _agent_api(http.pids[0])
    for i, port in enumerate((ok2, third)):
        _api(b_api, "PUT", "/v1/services", {"name": "bench-http", "id": f"bench-http-{i}", "port": port,
                                            "address": HOST, "protocol": "http"})
    wait_for(lambda: len(_api_or_none(a_api, "GET", "/v1/services/bench-http?passing") or []) == 3, 30,
             "three instances on agent A")
    wrk = subprocess.Popen(["wrk", "-t1", "-c16", f"-d{seconds:g}s", f"http://{HOST}:{http.port}/"],
                           stdout=subprocess.PIPE, text=True)
    what = "one answers 500 to everything"
    if scenario == "kill":
        time.sleep(seconds / 3)
        _nginx_procs[third].kill()
        what = f"one killed -9 at {seconds / 3:.0f} s"
    out, _ = wrk.communicate(timeout=seconds + 60)
    up = [u for u in _api(a_api, "GET", "/v1/upstreams") if u["service"] == "bench-http"][0]
    n = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    for p in list(procs.all):  # this scenario's agents and servers: the next one starts afresh
        procs.stop(p)
    procs.all.clear()
    return (f"| {what} | {n.group(1) if n else '?'} | {errors.group(1) if errors else 0} | "
            f"{sock.group(1) if sock else 'none'} | {up['retries']} | {up['ejections']} | {up['responses_5xx']} |")


def _agent_api(pid: int) -> int:
    cmd = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return int(cmd[cmd.index("--api") + 1].rsplit(":", 1)[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", default="1,16,64")
    ap.add_argument("--quick", action="store_true", help="one run of 2 s per cell")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"which of {','.join(PATHS)} to run (default: all)")
    ap.add_argument("--ref", metavar="REV", help="also run two agents of this git revision (tcp@REV, http@REV rows)")
    ap.add_argument("--chaos", type=float, metavar="SECONDS",
                    help="instead: wrk for SECONDS while one instance fails every request and one is killed")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.seconds = 1, 2.0
    missing = [t for t in ("wrk", "nginx", "haproxy") if shutil.which(t) is None]
    if missing:
        print(f"bench_http: missing {', '.join(missing)} (apt-get install wrk nginx-light haproxy)", file=sys.stderr)
        return 2
    conns = [int(c) for c in args.conns.split(",")]
    procs = Processes()
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        workdir = Path(tmp)
        if args.chaos:
            try:
                rows = [chaos(procs, workdir, args.chaos, scenario) for scenario in ("fail", "kill")]
                print("\n".join([
                    f"wrk -c16 for {args.chaos:g} s through http mode to 3 instances, of which:", "",
                    "| one instance | requests | client errors (non-2xx) | socket errors | retries | ejections "
                    "| 5xx seen by the mesh |", "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
                    "500 is not in retry_on, so a failing instance's answers reach clients until it is ejected "
                    "(5 in a row, the default consecutive_failures); from then on, half-open trials included, "
                    "none should."]))
            except SetupError as exc:
                print(f"bench_http: {exc}", file=sys.stderr)
                return 1
            finally:
                procs.close()
            return 0
        try:
            server = start_nginx(procs, workdir)
            tcp, http = start_mesh(server, procs, workdir)
            wanted = set(args.paths.split(","))
            paths = [Path_("direct", server), tcp, http]
            if "haproxy" in wanted:
                paths.append(start_haproxy_chain(server, procs, workdir))
            if args.ref:
                code, what = snapshot_source(workdir / "ref", args.ref, None)
                compile_as_installed(code)
                log(f"ref: {what}")
                paths += start_mesh(server, procs, workdir, dict(os.environ, PYTHONPATH=str(code)), f"@{args.ref}")
            paths = [p for p in paths if p.label.split("@")[0] in wanted]
            for path in paths:  # warm: kept connections, JIT-free but caches and pools
                run_wrk(path, 16, 1.0)
            for run in range(args.runs):
                for c in conns:
                    for path in paths:
                        r = run_wrk(path, c, args.seconds)
                        results.setdefault((path.label, c), []).append(r)
                        log(f"run {run + 1} c={c} {path.label}: {r['rps']:.0f} req/s p50 {r['p50'] * 1e6:.0f} us "
                            f"p99 {r['p99'] * 1e6:.0f} us cpu {r['cpu_us']:.1f} us/req "
                            f"(first hop {r['cpu0_us']:.1f})")
        except SetupError as exc:
            print(f"bench_http: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.close()
    print(report(results, conns, args))
    return 0


def _med(rs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def report(results: dict[tuple[str, int], list[dict[str, float]]], conns: list[int], args: argparse.Namespace) -> str:
    lines = [f"HTTP through the mesh, median of {args.runs} runs of {args.seconds:g} s, wrk -t1, 1 KiB answers "
             f"({time.strftime('%Y-%m-%d %H:%M')})", "",
             "| path | conns | req/s | p50 us | p99 us | proxy CPU us/req | of which the first hop |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    labels = [*PATHS, *sorted({label for label, _ in results if label not in PATHS})]
    for c in conns:
        for label in labels:
            rs = results.get((label, c))
            if not rs:
                continue
            cpu, first = _med(rs, "cpu_us"), _med(rs, "cpu0_us")
            lines.append(f"| {label} | {c} | {_med(rs, 'rps'):,.0f} | {_med(rs, 'p50') * 1e6:,.0f} | "
                         f"{_med(rs, 'p99') * 1e6:,.0f} | {'-' if cpu != cpu else f'{cpu:.1f}'} | "
                         f"{'-' if first != first else f'{first:.1f}'} |")
    lines += ["", "| ratio | conns | value | goal |", "|---|---:|---:|---|"]
    for c in conns:
        h, t, x = results.get(("http", c)), results.get(("tcp", c)), results.get(("haproxy", c))
        if h and t:
            lines.append(f"| http/tcp req/s | {c} | {_med(h, 'rps') / _med(t, 'rps'):.2f} | "
                         f"{'>= 0.5' if c == 16 else ''} |")
            if c == 1:
                lines.append(f"| http - tcp p50 (us) | 1 | {(_med(h, 'p50') - _med(t, 'p50')) * 1e6:+.0f} | <= +150 |")
        if args.ref:
            hr, tr = results.get((f"http@{args.ref}", c)), results.get((f"tcp@{args.ref}", c))
            if hr and tr:
                lines.append(f"| http/tcp req/s at {args.ref} | {c} | {_med(hr, 'rps') / _med(tr, 'rps'):.2f} | |")
                if c == 1:
                    lines.append(f"| http - tcp p50 (us) at {args.ref} | 1 | "
                                 f"{(_med(hr, 'p50') - _med(tr, 'p50')) * 1e6:+.0f} | |")
        if h and x:
            lines.append(f"| http/haproxy req/s | {c} | {_med(h, 'rps') / _med(x, 'rps'):.2f} | report |")
            lines.append(f"| http/haproxy CPU per req | {c} | {_med(h, 'cpu_us') / _med(x, 'cpu_us'):.2f} | report |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
