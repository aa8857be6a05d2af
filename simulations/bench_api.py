"""The local API's cost side by side with another revision: agent CPU per kept-alive GET.

    .venv/bin/python simulations/bench_api.py --ref f7efd70 [--runs 5] [--requests 4000] [--path /v1/members]

Each run starts one agent of each tree (alternating, so a slow phase of the host hits both),
warms a kept-alive connection with 200 requests, then times ``--requests`` more and reads the
agent's user+system CPU from /proc before and after.  Prints the per-run figures, the medians
and their ratio (this tree / the reference).  A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations.bench_cluster import snapshot_source  # noqa: E402
from simulations.harness import free_port as _free_port  # noqa: E402

_taken: set[int] = set()


def free_port() -> int:
    return _free_port(_taken)


def agent_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(tree: Path, state: Path, path: str, requests: int) -> float:
    """Agent CPU microseconds per request, for the agent whose code is ``tree``."""
    gossip, api = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(tree), XDG_STATE_HOME=str(state))
    p = subprocess.Popen([sys.executable, "-m", "cli.main", "agent", "--name", "bench", "--insecure",
                          "--bind", f"127.0.0.1:{gossip}", "--api", f"127.0.0.1:{api}", "--tunnel", "127.0.0.1:0",
                          "--profile", "local"], cwd=tree.parent, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
                conn.request("GET", path)
                conn.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent of {tree} did not answer") from None
                time.sleep(0.1)
        for _ in range(200):
            conn.request("GET", path)
            conn.getresponse().read()
        before = agent_cpu(p.pid)
        for _ in range(requests):
            conn.request("GET", path)
            conn.getresponse().read()
        return (agent_cpu(p.pid) - before) / requests * 1e6
    finally:
        p.kill()
        p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="git revision to compare with (e.g. a commit before a change)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--path", default="/v1/members")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        work = Path(tmp)
        new, new_what = snapshot_source(work / "new" / "src", None)
        old, old_what = snapshot_source(work / "old" / "src", args.ref)
        figures: dict[str, list[float]] = {"this tree": [], args.ref: []}
        for _ in range(args.runs):
            figures[args.ref].append(one_run(old, work / "state", args.path, args.requests))
            figures["this tree"].append(one_run(new, work / "state", args.path, args.requests))
        print(f"agent CPU per kept-alive GET {args.path}, {args.requests} requests a run, {args.runs} runs")
        print(f"  this tree: {new_what}\n  {args.ref}: {old_what}")
        print("| tree | median (us) | runs (us) |\n|---|---:|---|")
        for name, runs in figures.items():
            print(f"| {name} | {statistics.median(runs):.1f} | {', '.join(f'{r:.1f}' for r in runs)} |")
        ratio = statistics.median(figures["this tree"]) / statistics.median(figures[args.ref])
        print(f"ratio this tree / {args.ref}: {ratio:.2f}")


if __name__ == "__main__":
    main()
