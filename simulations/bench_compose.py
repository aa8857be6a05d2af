"""The docker-compose demo on a Docker engine, side by side with its network-namespace twin.

The same scenario both ways, from docker-compose.yml: start the 11 services, wait until every agent
sees all five alive and the client has heard all three web instances, kill agent3 (its process and
its network: a container that is killed takes its interface with it), wait until the others see it
dead.  Per run: start to converged, kill to dead (the last observer's own ``member_dead`` log line),
and the client's slowest call from the kill until 3 s after that.  The client calls every 0.5 s, so
whether one of its calls meets agent3 before gossip suspects it (about a second) is a matter of luck;
a burst of calls 20 ms apart from agent5's host, running across the kill (``worst_burst_ms``), meets
it every time: the figure for "what does a vanished host cost a caller".  Docker's run also shows start to
healthy (its health check runs every 10 s, so this is at least one interval) and the image build
(once: the first build makes the base image too).

    python simulations/bench_compose.py --runs 3     (root; docker.io, docker-compose, mmdebstrap, ip)

Prints a table: the median of the runs, and each run.  ``--explain`` also prints, per run, where the
client's slowest call went: its agent's data-plane log lines from the kill on (dials, relays, attempts
given up, agent3's suspicion and death), in ms after the kill, and the calls slower than 5 ms.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from netns import Lab, load_compose, sh  # noqa: E402

from gossip.keyring import generate_key  # noqa: E402
from simulations.harness import mesh_agent_cmd, wait_for  # noqa: E402

COMPOSE = ROOT / "docker-compose.yml"
AGENTS = [f"agent{i}" for i in range(1, 6)]
WEB = {"web-1", "web-2", "web-3"}
STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z? \[\w+\s*\] (\w+)\s+(.*)")
CALL = re.compile(r"instance=(\S+) node=\S+ ([\d.]+) ms|error: ")


def stamp(text: str) -> float:
    head, _, frac = text.partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def dead_at(lines: list[str], name: str) -> float | None:
    """When a log said ``member_dead`` about ``name`` (the agent's own timestamp)."""
    for line in lines:
        m = STAMP.search(line)
        if m and m.group(2) == "member_dead" and re.search(rf"\bname={name}\b", m.group(3)):
            return stamp(m.group(1))
    return None


def calls(lines: list[str]) -> list[tuple[str | None, float | None]]:
    out: list[tuple[str | None, float | None]] = []
    for line in lines:
        m = CALL.search(line)
        if m:
            out.append((m.group(1), float(m.group(2))) if m.group(1) else (None, None))
    return out


#: What the client's agent logs about a call that met the vanished host (dataplane.tunnel, dataplane.proxy).
EXPLAIN = re.compile(r"tunnel_|proxy_connect_failed|proxy_instance_failed|relay_|member_(suspect|dead)")


def explain(title: str, lines: list[str], kill: float, until: float, client: list[str], start_index: int) -> None:
    """Print the client agent's data-plane events between the kill and ``until`` (ms after the kill)."""
    print(f"--- {title}: agent5's data-plane events after the kill (ms after it)")
    for line in lines:
        m = STAMP.search(line)
        if m and EXPLAIN.search(m.group(2)) and kill - 0.05 <= stamp(m.group(1)) <= until:
            print(f"  {(stamp(m.group(1)) - kill) * 1000:8.1f}  {m.group(2)} {m.group(3)[:220]}")
    print(f"  client, calls slower than 5 ms (or failed) after the kill: {slow_calls(client, start_index)}")


def slow_calls(lines: list[str], start_index: int) -> list[tuple[str | None, float | None]]:
    return [(i, ms) for i, ms in calls(lines)[start_index:] if ms is None or ms > 5.0]


#: The burst: calls on fresh connections this far apart, from before the kill until well after suspicion.
BURST = ["--interval", "0.02", "--count", "150", "--timeout", "10"]


def worst_burst(lines: list[str]) -> tuple[float, int]:
    got = calls(lines)
    return max((ms for _, ms in got if ms is not None), default=0.0), sum(1 for i, _ in got if i is None)


def worst_after(lines_at: Callable[[], list[str]], start_index: int, until: float) -> tuple[float, int]:
    """The slowest call the client printed from ``start_index`` on, up to wall time ``until``; and failures."""
    time.sleep(max(0.0, until - time.time()))
    window = calls(lines_at())[start_index:]
    return max((ms for _, ms in window if ms is not None), default=0.0), sum(1 for i, _ in window if i is None)


# -- Docker ----------------------------------------------------------------------------------------


def images() -> set[str]:
    return set(subprocess.run(["docker", "image", "ls", "-a", "-q", "--no-trunc"], capture_output=True, text=True,
                              check=True).stdout.split())


class Docker:
    def __init__(self, tag: str, workdir: Path) -> None:
        self.project = f"meshbench{tag}"
        env_file = workdir / "empty.env"
        env_file.write_text("")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "COMPOSE_", "DOCKER_"))}
        self.env.update(MESH_CLUSTER_KEY=generate_key(), MESH_IMAGE=f"mesh-agent-bench:{tag}",
                        MESH_BASE_IMAGE=f"mesh-agent-bench-base:{tag}", MESH_WHEELS=f"build/wheels-bench-{tag}")
        self.base = ["docker-compose", "-p", self.project, "-f", str(COMPOSE), "--env-file", str(env_file)]
        self.images_before = images()

    def compose(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True, env=self.env,
                              cwd=ROOT, timeout=600).stdout

    def cid(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def members(self, agent: str) -> dict[str, str]:
        p = subprocess.run(["docker", "exec", self.cid(agent), "mesh-agent", "members"], capture_output=True,
                           text=True, timeout=30)
        return {f[0]: f[2] for f in (ln.split() for ln in p.stdout.splitlines()[1:]) if len(f) >= 3}

    def logs(self, service: str) -> list[str]:
        return self.compose("logs", "--no-color", service).splitlines()

    def build(self) -> float:
        t0 = time.monotonic()
        subprocess.run([str(ROOT / "docker" / "build-offline.sh")], check=True, env=self.env, cwd=ROOT,
                       capture_output=True, timeout=900)
        return time.monotonic() - t0

    def run(self, show: bool = False) -> dict[str, float]:
        out: dict[str, float] = {}
        t0 = time.monotonic()
        self.compose("up", "-d")
        wait_for(lambda: all(
            subprocess.run(["docker", "inspect", "--format", "{{.State.Health.Status}}", self.cid(a)],
                           capture_output=True, text=True).stdout.strip() == "healthy" for a in AGENTS),
            180, "healthy", interval=0.5)
        out["start_to_healthy_s"] = time.monotonic() - t0
        wait_for(lambda: all(set(self.members(a).values()) == {"alive"} and len(self.members(a)) == 5
                             for a in AGENTS) and {i for i, _ in calls(self.logs("client"))} >= WEB,
                 180, "converged and all web heard", interval=0.5)
        out["start_to_converged_s"] = time.monotonic() - t0
        start_index = len(calls(self.logs("client")))
        burst = subprocess.Popen(["docker", "exec", self.cid("agent5"), "mesh-agent", "demo-client", "--url",
                                  "http://127.0.0.1:9000/", *BURST], stdout=subprocess.PIPE, text=True)
        assert burst.stdout is not None
        burst_lines = [burst.stdout.readline()]  # it is calling
        kill = time.time()
        self.compose("kill", "agent3")
        others = [a for a in AGENTS if a != "agent3"]
        wait_for(lambda: all(self.members(a).get("agent3") == "dead" for a in others), 60, "dead", interval=0.3)
        dead = max(dead_at(self.logs(a), "agent3") or kill for a in others)
        out["kill_to_dead_s"] = dead - kill
        out["worst_call_ms"], failures = worst_after(lambda: self.logs("client"), start_index, dead + 3)
        out["failed_calls"] = failures
        burst_lines += burst.communicate(timeout=120)[0].splitlines()
        out["worst_burst_ms"], out["failed_burst_calls"] = worst_burst(burst_lines)
        if show:
            explain("docker", self.logs("agent5"), kill, dead + 3, self.logs("client"), start_index)
            print(f"  burst, calls slower than 5 ms (or failed): {slow_calls(burst_lines, 0)}")
        self.compose("down", "--timeout", "10")
        return out

    def close(self) -> None:
        subprocess.run([*self.base, "down", "--volumes", "--remove-orphans", "--timeout", "5"], capture_output=True,
                       env=self.env, cwd=ROOT, timeout=300)
        subprocess.run(["docker", "rmi", self.env["MESH_IMAGE"], self.env["MESH_BASE_IMAGE"]], capture_output=True,
                       timeout=300)
        for image in images() - self.images_before:  # the build stage's, and nothing that was there before
            subprocess.run(["docker", "rmi", image], capture_output=True, timeout=60)
        subprocess.run(["rm", "-rf", str(ROOT / self.env["MESH_WHEELS"])], check=False)


# -- network namespaces (tests/test_compose_topology.py's twin) ------------------------------------


def netns_run(workdir: Path, show: bool = False) -> dict[str, float]:
    key = generate_key()
    services = load_compose(COMPOSE, {"MESH_CLUSTER_KEY": key})
    lab = Lab(workdir, key)
    out: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        agents = lab.start_compose(services, lambda s: {"MESH_DATA_DIR": str(workdir / f"data-{s.network_of}")})
        client_log = workdir / "client.log"

        def client_lines() -> list[str]:
            return client_log.read_text(errors="replace").splitlines() if client_log.exists() else []

        def converged() -> bool:
            views = [a.try_members() for a in agents.values()]
            return all(v is not None and len(v) == 5 and all(m["status"] == "alive" for m in v.values())
                       for v in views) and {i for i, _ in calls(client_lines())} >= WEB

        wait_for(converged, 180, "converged and all web heard", interval=0.25)
        out["start_to_converged_s"] = time.monotonic() - t0
        start_index = len(calls(client_lines()))
        burst_log = workdir / "burst.log"
        burst = lab.run_in(lab.hosts["agent5"], mesh_agent_cmd() + ["demo-client", "--url", "http://127.0.0.1:9000/",
                                                                    *BURST], "burst.log")
        wait_for(lambda: burst_log.exists() and bool(calls(burst_log.read_text().splitlines())), 30, "burst calling")
        kill = time.time()
        victim = agents["agent3"]
        os.killpg(victim.popen.pid, signal.SIGKILL)
        sh("ip", "-n", victim.ns, "link", "set", "eth0", "down")
        others = [a for n, a in agents.items() if n != "agent3"]
        wait_for(lambda: all((a.try_members() or {}).get("agent3", {}).get("status") == "dead" for a in others),
                 60, "dead", interval=0.2)
        dead = max(dead_at(a.log().splitlines(), "agent3") or kill for a in others)
        out["kill_to_dead_s"] = dead - kill
        out["worst_call_ms"], failures = worst_after(client_lines, start_index, dead + 3)
        out["failed_calls"] = failures
        burst.wait(timeout=120)
        out["worst_burst_ms"], out["failed_burst_calls"] = worst_burst(burst_log.read_text().splitlines())
        if show:
            explain("netns", agents["agent5"].log().splitlines(), kill, dead + 3, client_lines(), start_index)
            print(f"  burst, calls slower than 5 ms (or failed): {slow_calls(burst_log.read_text().splitlines(), 0)}")
    finally:
        lab.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--explain", action="store_true", help="print where each run's slow calls went")
    args = parser.parse_args()
    tag = f"{os.getpid()}{secrets.token_hex(2)}"
    results: dict[str, list[dict[str, float]]] = {"docker": [], "netns": []}
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        docker = Docker(tag, Path(tmp))
        try:
            build = docker.build()
            for i in range(args.runs):
                results["docker"].append(docker.run(args.explain))
                run_dir = Path(tmp) / f"netns{i}"
                run_dir.mkdir()
                results["netns"].append(netns_run(run_dir, args.explain))
                print(f"run {i + 1}: docker {results['docker'][-1]}  netns {results['netns'][-1]}", flush=True)
        finally:
            docker.close()
    keys = ["start_to_healthy_s", "start_to_converged_s", "kill_to_dead_s", "worst_call_ms", "failed_calls",
            "worst_burst_ms", "failed_burst_calls"]
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nimage build (first, base image included): {build:.1f} s\n")
    print(f"{'median of ' + str(args.runs):<24}{'docker':>12}{'netns twin':>12}   runs (docker | netns)")
    for k in keys:
        cells = []
        for side in ("docker", "netns"):
            vals = [r[k] for r in results[side] if k in r]
            cells.append(f"{statistics.median(vals):>12.2f}" if vals else f"{'-':>12}")
        per = " ".join(f"{r[k]:.2f}" for r in results["docker"] if k in r) + " | " + " ".join(
            f"{r[k]:.2f}" for r in results["netns"] if k in r)
        print(f"{k:<24}{cells[0]}{cells[1]}   {per}")


if __name__ == "__main__":
    main()
