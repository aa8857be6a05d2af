"""The agent's DNS server beside dnsmasq answering the same names from a hosts file, with Debian's dnsperf.

    .venv/bin/python simulations/bench_dns.py [--runs 3] [--seconds 8] [--services 20] [--instances 3]

One agent registers ``--services`` services of ``--instances`` instances each
(distinct loopback addresses); dnsmasq gets a hosts file with the same names
and addresses.  dnsperf asks both, alternating run by run, for every
``NAME.service.mesh A`` in turn over UDP: first at full speed (peak queries per
second, 100 outstanding), then at half the agent's peak rate with every query's
latency reported (-v), from which the percentiles come.  The agent runs with
its per-source limit off (``[dns_config] source_qps = 0``): dnsperf is one
source, and the limit would measure itself.  Prints each run and the medians,
and the ratio agent / dnsmasq.  A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations.harness import ROOT, Processes, free_port  # noqa: E402


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        sys.exit(f"bench_dns: {tool} is not installed (apt-get install {package})")


def call(api: int, method: str, path: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{api}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait(pred: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():  # type: ignore[operator]
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"bench_dns: timed out waiting for {what}")
        time.sleep(0.1)


def dnsperf(port: int, queries: Path, seconds: float, qps: int | None = None) -> tuple[float, list[float], int]:
    """(queries per second, every latency in seconds when qps is given, queries lost)."""
    args = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries), "-l", str(seconds), "-t", "2"]
    if qps is not None:
        args += ["-Q", str(qps), "-v"]
    # Into a file, not a pipe: reading tens of thousands of lines a second here would compete for the CPU.
    with tempfile.TemporaryFile("w+") as sink:
        subprocess.run(args, stdout=sink, stderr=subprocess.STDOUT, timeout=seconds + 60, check=False)
        sink.seek(0)
        out = sink.read()
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    if m is None or lost is None:
        sys.exit(f"bench_dns: unexpected dnsperf output:\n{out[-2000:]}")
    latencies = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("> NOERROR")]
    return float(m.group(1)), latencies, int(lost.group(1))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--rate", type=int, default=0,
                    help="measure latency at this many queries/s instead of half the agent's peak")
    args = ap.parse_args()
    need("dnsperf", "dnsperf")
    need("dnsmasq", "dnsmasq")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        work = Path(tmp)
        try:
            gossip, api, agent_dns, dm_port = free_port(), free_port(), free_port(), free_port()
            (work / "agent.toml").write_text("[dns_config]\nsource_qps = 0\n")
            env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_STATE_HOME=str(work / "state"))
            procs.start([sys.executable, "-m", "cli.main", "agent", "--name", "bench", "--insecure",
                         "--bind", f"127.0.0.1:{gossip}", "--api", f"127.0.0.1:{api}", "--tunnel", "127.0.0.1:0",
                         "--profile", "local", "--log-level", "warning", "--dns", f"127.0.0.1:{agent_dns}",
                         "--config", str(work / "agent.toml")], work / "agent.log", env, ROOT)
            wait(lambda: call(api, "GET", "/v1/members"), "the agent's API")
            hosts, names = [], []
            for s in range(args.services):
                name = f"svc{s}"
                names.append(f"{name}.service.mesh A")
                for i in range(args.instances):
                    address = f"127.20.{s}.{i + 1}"
                    call(api, "PUT", "/v1/services", {"name": name, "id": f"{name}-{i}", "port": 8000,
                                                      "address": address})
                    hosts.append(f"{address} {name}.service.mesh")
            (work / "hosts").write_text("\n".join(hosts) + "\n")
            queries = work / "queries.txt"
            queries.write_text("\n".join(names) + "\n")
            procs.start(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                         f"--addn-hosts={work / 'hosts'}", "--listen-address=127.0.0.1", "--bind-interfaces",
                         f"--port={dm_port}", "--user=root", f"--pid-file={work / 'dnsmasq.pid'}"],
                        work / "dnsmasq.log", None, ROOT)
            time.sleep(0.5)
            for port in (agent_dns, dm_port):
                dnsperf(port, queries, 1.0)  # warm-up: every answer built, caches filled
            servers = {"mesh-agent": agent_dns, "dnsmasq": dm_port}
            peaks: dict[str, list[float]] = {k: [] for k in servers}
            lats: dict[str, list[list[float]]] = {k: [] for k in servers}
            for run in range(args.runs):
                for server, port in servers.items():
                    qps, _, lost = dnsperf(port, queries, args.seconds)
                    peaks[server].append(qps)
                    print(f"run {run + 1} {server}: peak {qps:,.0f} q/s, {lost} lost", flush=True)
                half = args.rate or int(statistics.median(peaks["mesh-agent"]) / 2)
                for server, port in servers.items():
                    qps, latencies, lost = dnsperf(port, queries, args.seconds, half)
                    lats[server].append(latencies)
                    print(f"run {run + 1} {server} at {half:,} q/s: p50 {percentile(latencies, 50) * 1e6:.0f} us,"
                          f" p99 {percentile(latencies, 99) * 1e6:.0f} us, {lost} lost", flush=True)
        finally:
            procs.close()
    half = args.rate or int(statistics.median(peaks["mesh-agent"]) / 2)
    print(f"\n{args.services} names x {args.instances} A records, UDP, {args.runs} runs of {args.seconds:g} s, "
          f"medians; latency at {half:,} q/s" + ("" if args.rate else " (half the agent's peak)"))
    print("| server | peak q/s | p50 (us) | p90 (us) | p99 (us) | p99.9 (us) |")
    print("|---|---:|---:|---:|---:|---:|")
    for server in servers:
        row = [statistics.median(peaks[server])]
        for p in (50, 90, 99, 99.9):
            row.append(statistics.median(percentile(run_lats, p) for run_lats in lats[server]) * 1e6)
        print(f"| {server} | {row[0]:,.0f} | {row[1]:.0f} | {row[2]:.0f} | {row[3]:.0f} | {row[4]:.0f} |")
    ratio = statistics.median(peaks["mesh-agent"]) / statistics.median(peaks["dnsmasq"])
    print(f"peak ratio mesh-agent / dnsmasq: {ratio:.2f}")


if __name__ == "__main__":
    main()
