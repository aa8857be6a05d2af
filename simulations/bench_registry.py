"""Service-registry benchmark: how fast registrations spread to every agent, and a large registry converges.

Real ``mesh-agent`` processes on loopback (encrypted, ``--profile lan`` by default), driven through their
HTTP API. Two measurements:

1. Registration-to-visible-everywhere, for each cluster size in ``--sizes``: N agents joined through the
   first, membership converged, then ``--runs`` times: register one instance (``PUT /v1/services``, a fresh
   id each time) on a random agent and time until EVERY agent's ``GET /v1/services/{name}`` lists it --
   counted from the PUT returning and from the PUT being sent. Then ``DELETE /v1/services/{id}`` and time
   until it is gone from every agent. Every agent is watched by a thread holding a blocking query
   (``?index=N&wait=..``), so a change is seen the moment the agent's view changes, without busy polling
   (``--watch poll`` polls every ``--poll-interval`` instead).
2. Large registry: ``--big-agents`` agents, ``--big-instances`` instances spread evenly across them and over
   ``--big-services`` service names; the time from the last registration returning until every agent's
   ``GET /v1/services`` shows the expected totals and every agent's ``GET /v1/services/{name}`` returns the
   expected instance ids (so all views are identical); a final snapshot compares the full instance records
   across agents.

It prints Markdown tables (``--json`` adds one JSON object with every sample on the last line). It is a
benchmark, not a test: it exits 0 whatever the numbers say, unless the cluster cannot be set up.

    .venv/bin/python simulations/bench_registry.py --sizes 10,25 --runs 5 --big-agents 20 --big-instances 1000

Agents are started by the one harness of tests and benchmarks (simulations/harness.py).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simulations.bench_cluster import proc_cpu_seconds
from simulations.harness import AgentProc, mesh_agent_cmd
from simulations.harness import Cluster as Harness

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


COST_COUNTERS = ("state_fetched", "state_requests_in", "push_pull_in", "tcp_bytes_out", "udp_bytes_out",
                 "dropped_total", "suspicions", "refutations")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0 when unreadable)."""
    return proc_cpu_seconds(pid) or 0.0


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body.strip()[:300]}")
        self.status = status


def http_call(api_port: int, method: str, path: str, body: Any = None,
              timeout: float = 10.0) -> tuple[Any, dict[str, str]]:
    """One request on a fresh connection (the agent answers one request per connection)."""
    conn = http.client.HTTPConnection(HOST, api_port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status >= 400:
            raise ApiError(resp.status, raw.decode(errors="replace"))
        return json.loads(raw), hdrs
    finally:
        conn.close()


class Cluster(Harness):
    """The harness's agents, started in a row, plus what this benchmark sums over them."""

    def __init__(self, workdir: Path, key: str, profile: str, label: str) -> None:
        super().__init__(workdir, key, profile)
        self.label = label
        #: In start order: the first is everyone's seed.
        self.started: list[AgentProc] = []

    def start_all(self, n: int) -> None:
        """Start n agents one after another, each joining through the first."""
        seed: list[str] = []
        for i in range(n):
            name = f"{self.label}-n{i:02d}"
            data_dir = self.workdir / f"{name}-data"
            data_dir.mkdir(parents=True, exist_ok=True)
            a = self.start(name, join=seed, extra=["--data-dir", str(data_dir)], timeout=30)
            self.started.append(a)
            seed = seed or [a.addr]

    def wait_all_converged(self, timeout: float) -> float:
        """Until every agent lists every agent alive; returns seconds waited."""
        t0 = time.monotonic()
        self.wait_converged([a.name for a in self.started], timeout)
        return time.monotonic() - t0

    def snapshot(self) -> dict[str, float]:
        """Summed over agents: CPU seconds (from /proc) and the counters cost is read from."""
        tot: dict[str, float] = {"cpu_s": 0.0}
        for a in self.started:
            tot["cpu_s"] += cpu_seconds(a.popen.pid)
            info = a.try_call("GET", "/v1/agent/self", timeout=10)
            counters = info.get("counters", {}) if isinstance(info, dict) else {}
            for k in COST_COUNTERS:
                v = counters.get(k)
                if isinstance(v, (int, float)):
                    tot[k] = tot.get(k, 0) + v
        return tot

    def dead(self) -> list[str]:
        return [a.name for a in self.started if not a.running()]


# -- watching a condition on every agent ----------------------------------------------------------


def watch_all(agents: list[AgentProc], path: str, pred: Callable[[Any], bool], timeout: float, mode: str,
              poll_interval: float, ready: threading.Barrier | None = None) -> dict[str, float | None]:
    """Per agent, the monotonic time its ``GET path`` first satisfied ``pred`` (None: not within timeout).

    In ``block`` mode each agent gets a thread holding a blocking query on ``path``; the first answer
    (no index) gives the current view, then each answer comes back as soon as the view changes.
    ``ready`` (a barrier with len(agents)+1 parties) is passed once every thread holds its first view,
    so the caller can act (register) only after all the watchers are armed.
    """
    result: dict[str, float | None] = {a.name: None for a in agents}
    deadline = time.monotonic() + timeout
    errors: dict[str, str] = {}

    def arm() -> None:
        if ready is not None:
            try:
                ready.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass

    def one(a: AgentProc) -> None:
        index: str | None = None
        armed = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                if mode == "block" and index is not None:
                    sep = "&" if "?" in path else "?"
                    q = f"{path}{sep}index={index}&wait={max(1, min(int(left), 60))}s"
                    view, hdrs = http_call(a.api_port, "GET", q, timeout=min(left, 60) + 10)
                else:
                    view, hdrs = http_call(a.api_port, "GET", path, timeout=10)
                if not armed:
                    armed = True
                    if ready is not None:
                        arm()
                        # The view before the caller acted is stale by definition: ask again.
                        view, hdrs = http_call(a.api_port, "GET", path, timeout=10)
                now = time.monotonic()
                if pred(view):
                    result[a.name] = now
                    break
                index = hdrs.get("x-mesh-index", index)
                if mode != "block" or index is None:
                    time.sleep(poll_interval)
            except (OSError, ApiError, ValueError, http.client.HTTPException) as exc:
                # Transient (an overloaded agent, a refused connection): note it and retry.
                errors[a.name] = errors.get(a.name, "") + f"{type(exc).__name__}: {exc}; "
                index = None
                time.sleep(0.1)
        if not armed:
            arm()

    threads = [threading.Thread(target=one, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 90)
    for name, err in errors.items():
        log(f"  watcher for {name}: errors (retried): {err[:300]}")
    return result


class Watch:
    """``watch_all`` in a background thread, armed (every watcher holds a view) when the constructor returns."""

    def __init__(self, agents: list[AgentProc], path: str, pred: Callable[[Any], bool],
                 args: argparse.Namespace) -> None:
        self._res: dict[str, float | None] = {}
        barrier = threading.Barrier(len(agents) + 1)

        def run() -> None:
            self._res = watch_all(agents, path, pred, args.timeout, args.watch, args.poll_interval, barrier)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            log("  not every watcher armed within 60 s; measuring anyway")

    def result(self) -> dict[str, float | None]:
        self._thread.join()
        return self._res


def has_id(iid: str) -> Callable[[Any], bool]:
    return lambda view: isinstance(view, list) and any(i.get("id") == iid for i in view)


def lacks_id(iid: str) -> Callable[[Any], bool]:
    return lambda view: isinstance(view, list) and all(i.get("id") != iid for i in view)


# -- statistics and tables ------------------------------------------------------------------------


def fmt_ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.0f}"


def summary(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


# -- benchmark 1: one registration spreading -------------------------------------------------------


def bench_spread(n: int, runs: int, args: argparse.Namespace, key: str, workdir: Path,
                 rng: random.Random) -> dict[str, Any]:
    cluster = Cluster(workdir, key, args.profile, f"s{n}")
    out: dict[str, Any] = {"n": n, "profile": args.profile, "runs": []}
    try:
        t0 = time.monotonic()
        cluster.start_all(n)
        log(f"N={n}: {n} agents started in {time.monotonic() - t0:.1f} s; waiting for membership")
        conv = cluster.wait_all_converged(timeout=max(60.0, 4.0 * n))
        out["membership_converged_s"] = conv
        log(f"N={n}: membership converged {conv:.1f} s after the last start")
        if args.settle > 0:
            time.sleep(args.settle)
        service = "bench"
        for r in range(runs):
            owner = rng.choice(cluster.started)
            iid = f"bench-n{n}-r{r}-{rng.randrange(1 << 30):x}"
            sample: dict[str, Any] = {"run": r, "owner": owner.name, "id": iid}
            path = f"/v1/services/{service}"

            # register
            watch = Watch(cluster.started, path, has_id(iid), args)
            t_sent = time.monotonic()
            reply = owner.call("PUT", "/v1/services", {"name": service, "port": 8000 + r, "id": iid,
                                                      "tags": ["bench"], "meta": {"run": str(r)}})
            t_ret = time.monotonic()
            seen = watch.result()
            if not reply.get("ok") or reply.get("id") != iid:
                log(f"  unexpected PUT reply: {reply}")
            missing = sorted(k for k, v in seen.items() if v is None)
            sample["put_s"] = t_ret - t_sent
            if missing:
                sample["register_missing"] = missing
                sample["visible_from_return_s"] = sample["visible_from_send_s"] = None
                log(f"  run {r}: {iid} never visible on {missing} within {args.timeout:.0f} s")
            else:
                last = max(v for v in seen.values() if v is not None)
                others = [v for k, v in seen.items() if k != owner.name and v is not None]
                sample["visible_from_return_s"] = max(0.0, last - t_ret)
                sample["visible_from_send_s"] = last - t_sent
                sample["first_other_from_return_s"] = max(0.0, min(others) - t_ret) if others else None

            # deregister
            watch = Watch(cluster.started, path, lacks_id(iid), args)
            t_sent = time.monotonic()
            owner.call("DELETE", f"/v1/services/{iid}")
            t_ret = time.monotonic()
            gone = watch.result()
            missing = sorted(k for k, v in gone.items() if v is None)
            sample["delete_s"] = t_ret - t_sent
            if missing:
                sample["deregister_missing"] = missing
                sample["gone_from_return_s"] = sample["gone_from_send_s"] = None
                log(f"  run {r}: {iid} still listed on {missing} after {args.timeout:.0f} s")
            else:
                last = max(v for v in gone.values() if v is not None)
                sample["gone_from_return_s"] = max(0.0, last - t_ret)
                sample["gone_from_send_s"] = last - t_sent
            out["runs"].append(sample)
            log(f"  run {r}: owner {owner.name}: visible everywhere {fmt_ms(sample['visible_from_return_s'])} ms"
                f" after the PUT returned ({fmt_ms(sample['visible_from_send_s'])} ms after sent); gone"
                f" {fmt_ms(sample['gone_from_return_s'])} ms after the DELETE returned")
            time.sleep(args.pause)
        out["dead_agents"] = cluster.dead()
    finally:
        cluster.close()
    return out


def spread_table(results: list[dict[str, Any]], profile: str) -> str:
    rows = [
        ("registration → visible on every agent, from PUT returned", "visible_from_return_s"),
        ("registration → visible on every agent, from PUT sent", "visible_from_send_s"),
        ("registration → visible on first other agent, from PUT returned", "first_other_from_return_s"),
        ("deregistration → gone from every agent, from DELETE returned", "gone_from_return_s"),
        ("deregistration → gone from every agent, from DELETE sent", "gone_from_send_s"),
        ("PUT round trip", "put_s"),
    ]
    lines = [f"### Registration spread (profile `{profile}`, encrypted; times in ms)", ""]
    head = "| metric |" + "".join(f" N={r['n']} median | min | max |" for r in results)
    lines += [head, "|---|" + "---:|---:|---:|" * len(results)]
    for label, key in rows:
        cells = []
        for r in results:
            xs = [s[key] for s in r["runs"] if s.get(key) is not None]
            st = summary(xs)
            cells.append(f" {fmt_ms(st['median'])} | {fmt_ms(st['min'])} | {fmt_ms(st['max'])} |")
        lines.append(f"| {label} |" + "".join(cells))
    counts = []
    for r in results:
        ok_reg = sum(1 for s in r["runs"] if s.get("visible_from_return_s") is not None)
        ok_dereg = sum(1 for s in r["runs"] if s.get("gone_from_return_s") is not None)
        counts.append(f" {ok_reg}/{len(r['runs'])} reg, {ok_dereg}/{len(r['runs'])} dereg | | |")
    lines.append("| runs completed within the timeout |" + "".join(counts))
    lines.append("| membership converged after last start (s) |" + "".join(
        f" {r.get('membership_converged_s', float('nan')):.1f} | | |" for r in results))
    return "\n".join(lines)


# -- benchmark 2: a large registry converging ---------------------------------------------------------


def bench_big(args: argparse.Namespace, key: str, workdir: Path) -> dict[str, Any]:
    n, total, nsvc = args.big_agents, args.big_instances, args.big_services
    cluster = Cluster(workdir, key, args.profile, "big")
    out: dict[str, Any] = {"agents": n, "instances": total, "services": nsvc, "profile": args.profile,
                           "pace_s": args.big_pace}
    try:
        t0 = time.monotonic()
        cluster.start_all(n)
        log(f"big: {n} agents started in {time.monotonic() - t0:.1f} s; waiting for membership")
        out["membership_converged_s"] = cluster.wait_all_converged(timeout=max(60.0, 4.0 * n))
        if args.settle > 0:
            time.sleep(args.settle)

        # Expected view: instance j goes to agent j % n, service j % nsvc.
        expected: dict[str, set[str]] = {f"big-svc{s}": set() for s in range(nsvc)}
        plan = []
        for j in range(total):
            a = cluster.started[j % n]
            svc = f"big-svc{j % nsvc}"
            iid = f"{svc}-{a.name}-{j}"
            expected[svc].add(iid)
            plan.append((a, {"name": svc, "port": 10000 + j % 50000, "id": iid, "tags": ["big"],
                             "meta": {"j": str(j)}}))
        expected = {k: v for k, v in expected.items() if v}
        expected_counts = {k: len(v) for k, v in expected.items()}

        log(f"big: registering {total} instances ({total // n}-{-(-total // n)} per agent, {len(expected)} services)")
        if args.idle_window > 0:
            idle0 = cluster.snapshot()
            t_idle = time.monotonic()
            time.sleep(args.idle_window)
            out["idle_cores"] = (cluster.snapshot()["cpu_s"] - idle0["cpu_s"]) / (time.monotonic() - t_idle)
        errors = 0
        put_times: list[float] = []
        before = cluster.snapshot()
        t_first = time.monotonic()
        for a, body in plan:
            t = time.monotonic()
            try:
                a.call("PUT", "/v1/services", body)
            except (OSError, ApiError, http.client.HTTPException) as exc:
                errors += 1
                log(f"  PUT {body['id']} on {a.name} failed: {exc}")
            put_times.append(time.monotonic() - t)
            if args.big_pace > 0:
                time.sleep(max(0.0, args.big_pace - (time.monotonic() - t)))
        t_last = time.monotonic()
        out["put_s"] = summary(put_times)
        out["put_p90_s"] = sorted(put_times)[int(0.9 * (len(put_times) - 1))] if put_times else None
        out["register_phase_s"] = t_last - t_first
        out["register_errors"] = errors
        log(f"big: {total} PUTs took {t_last - t_first:.1f} s ({errors} errors); waiting for convergence")

        def totals_ok(view: Any) -> bool:
            return isinstance(view, list) and {s["name"]: s["instances"] for s in view} == expected_counts

        # Timed: every agent's GET /v1/services shows the expected per-service totals (blocking queries, so
        # each agent answers the moment its view changes). Only then, untimed so that the checking load does
        # not slow the agents being timed: every agent's GET /v1/services/{name} must list exactly the
        # expected ids for every service. If that fails at first, it is retried, and the time it finally
        # passed counts as that agent's convergence time.
        seen = watch_all(cluster.started, "/v1/services", totals_ok, args.big_timeout, args.watch,
                         args.poll_interval)
        # Cost up to here: the registrations and their spreading (not the verification below).
        after = cluster.snapshot()
        out["cost"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        out["cost_window_s"] = time.monotonic() - t_first
        last_diff: dict[str, str] = {}

        def ids_ok(a: AgentProc) -> bool:
            for svc, want in expected.items():
                got = a.try_call("GET", f"/v1/services/{svc}", timeout=10)
                ids = [i["id"] for i in got] if isinstance(got, list) else []
                if sorted(ids) != sorted(want):
                    have = set(ids)
                    last_diff[a.name] = (f"{svc}: {len(ids)} listed, {len(want - have)} missing,"
                                         f" {len(have - want)} extra, {len(ids) - len(have)} duplicate")
                    return False
            return True

        deadline = t_last + args.big_timeout
        conv: dict[str, float | None] = {}
        first_try: list[str] = []
        for a in cluster.started:
            conv[a.name] = None
            if seen[a.name] is None:
                last_diff[a.name] = "totals never matched"
                continue
            if ids_ok(a):
                conv[a.name] = seen[a.name]
                first_try.append(a.name)
                continue
            log(f"big: {a.name}: totals matched but ids did not ({last_diff[a.name]}); retrying")
            while time.monotonic() < deadline:
                time.sleep(0.2)
                if ids_ok(a):
                    conv[a.name] = time.monotonic()
                    break
        missing = sorted(k for k, v in conv.items() if v is None)
        out["ids_first_check"] = f"{len(first_try)}/{len(cluster.started)}"
        out["not_converged"] = {k: last_diff.get(k, "") for k in missing}
        totals = [v for v in seen.values() if v is not None]
        out["totals_converged_s"] = max(totals) - t_last if len(totals) == len(seen) else None
        if not missing:
            times = [v for v in conv.values() if v is not None]
            out["converged_s"] = max(times) - t_last
            out["first_agent_s"] = min(times) - t_last
            out["median_agent_s"] = statistics.median(times) - t_last
        else:
            out["converged_s"] = None
            log(f"big: not converged on {out['not_converged']}")
        out["converged_abs"] = {k: (None if v is None else v - t_last) for k, v in conv.items()}

        # Final snapshot: full records identical across agents.
        views: dict[str, dict[str, Any]] = {}
        for a in cluster.started:
            per: dict[str, Any] = {}
            for svc in expected:
                got = a.try_call("GET", f"/v1/services/{svc}", timeout=10) or []
                per[svc] = sorted((i["id"], i["node"], i["address"], tuple(i["tags"]),
                                   tuple(sorted(i["meta"].items())), i["health"]) for i in got)
            views[a.name] = per
        ref_name = cluster.started[0].name
        differ = [k for k, v in views.items() if v != views[ref_name]]
        sums = {k: sum(len(x) for x in v.values()) for k, v in views.items()}
        out["identical_views"] = not differ
        out["differing_agents"] = differ
        out["instance_sums"] = sorted(set(sums.values()))
        out["expected_ids_match"] = all(
            {r[0] for r in views[ref_name][svc]} == want for svc, want in expected.items())
        out["dead_agents"] = cluster.dead()
    finally:
        cluster.close()
    return out


def big_table(b: dict[str, Any]) -> str:
    put = b.get("put_s") or {}
    cost = b.get("cost") or {}
    pace = b.get("pace_s", 0.0)
    lines = [
        f"### Large registry convergence (profile `{b['profile']}`, encrypted)", "",
        "| metric | value |", "|---|---:|",
        f"| agents | {b['agents']} |",
        f"| instances (service names) | {b['instances']} ({b['services']}) |",
        f"| registration phase: {b['instances']} sequential PUTs"
        f"{f', one every {pace * 1000:.0f} ms' if pace else ', back to back'} | {b.get('register_phase_s', 0):.1f} s"
        f" ({b.get('register_errors', 0)} errors) |",
        f"| PUT round trip during that phase: median / p90 / max | {fmt_ms(put.get('median'))} /"
        f" {fmt_ms(b.get('put_p90_s'))} / {fmt_ms(put.get('max'))} ms |",
        f"| last PUT returned → first agent converged | {fmt_s(b.get('first_agent_s'))} |",
        f"| last PUT returned → median agent converged | {fmt_s(b.get('median_agent_s'))} |",
        f"| **last PUT returned → every agent converged** (totals in `GET /v1/services` == {b['instances']}"
        f" and sorted ids of every `GET /v1/services/{{name}}` == the registered set) | "
        f"**{fmt_s(b.get('converged_s'))}** |",
        f"| agents whose ids matched on the first check right after their totals did |"
        f" {b.get('ids_first_check', '?')} |",
        f"| final snapshot: instance sums seen across agents | {', '.join(map(str, b.get('instance_sums', [])))} |",
        f"| final snapshot: views identical on all agents (id, node, address, tags, meta, health) | "
        f"{'yes' if b.get('identical_views') else 'NO: ' + ', '.join(b.get('differing_agents', []))} |",
        f"| final snapshot: ids equal the registered set | {'yes' if b.get('expected_ids_match') else 'NO'} |",
    ]
    if cost:
        n, inst = b["agents"], b["instances"]
        win = b.get("cost_window_s", 0.0)
        cpu = cost.get("cpu_s", 0.0)
        idle = b.get("idle_cores")
        above = None if idle is None else max(0.0, cpu - idle * win)
        lines += [
            f"| cost, all agents, from first PUT until every agent showed the totals ({win:.0f} s): CPU | {cpu:.0f} s"
            f" ({cpu / max(win, 1e-9):.2f} cores) |",
            f"| idle CPU of all {n} agents before registering | "
            f"{'—' if idle is None else f'{idle:.2f} cores'} |",
            f"| CPU above idle per registration, all agents | "
            f"{'—' if above is None else f'{above / inst * 1000:.0f} ms'} |",
            f"| catalog fetches (`state_fetched`; {inst} registrations × {n - 1} peers = {inst * (n - 1)}) |"
            f" {cost.get('state_fetched', 0):.0f} |",
            f"| gossip TCP bytes sent, all agents | {cost.get('tcp_bytes_out', 0) / 1e6:.1f} MB |",
            f"| gossip UDP bytes sent, all agents | {cost.get('udp_bytes_out', 0) / 1e6:.1f} MB |",
            f"| dropped packets / suspicions / refutations | {cost.get('dropped_total', 0):.0f} /"
            f" {cost.get('suspicions', 0):.0f} / {cost.get('refutations', 0):.0f} |",
        ]
    if b.get("not_converged"):
        lines.append(f"| not converged within the timeout | {b['not_converged']} |")
    return "\n".join(lines)


def fmt_s(x: float | None) -> str:
    return "never (timeout)" if x is None else f"{x:.2f} s"


# -- main -----------------------------------------------------------------------------------------------


def keygen() -> str:
    out = subprocess.run([*mesh_agent_cmd(), "keygen"], capture_output=True, text=True, check=True, timeout=30,
                         cwd=ROOT)
    return out.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10,25", help="cluster sizes for the spread benchmark (comma-separated)")
    p.add_argument("--runs", type=int, default=5, help="registrations per cluster")
    p.add_argument("--profile", default="lan", choices=["lan", "local", "wan"])
    p.add_argument("--big-agents", type=int, default=20)
    p.add_argument("--big-instances", type=int, default=1000)
    p.add_argument("--big-services", type=int, default=10, help="service names the big registry spreads over")
    p.add_argument("--big-pace", type=float, default=0.0,
                   help="seconds from one big-registry PUT to the next (default 0: back to back)")
    p.add_argument("--idle-window", type=float, default=5.0,
                   help="seconds of idle CPU measured before the big registration, as a baseline")
    p.add_argument("--skip-spread", action="store_true")
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--watch", choices=["block", "poll"], default="block",
                   help="detect visibility by blocking queries (default) or by polling")
    p.add_argument("--poll-interval", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=90.0, help="per registration/deregistration, seconds")
    p.add_argument("--big-timeout", type=float, default=180.0, help="big registry convergence, seconds")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to idle after membership converges")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between runs")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep-logs", action="store_true", help="keep the agents' logs (path printed)")
    p.add_argument("--json", action="store_true", help="also print every sample as JSON on the last line")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    key = keygen()
    load = os.getloadavg()
    log(f"logs in {workdir}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    results: dict[str, Any] = {"profile": args.profile, "watch": args.watch, "spread": [], "big": None,
                               "loadavg_start": load}
    try:
        if not args.skip_spread:
            for n in sizes:
                results["spread"].append(bench_spread(n, args.runs, args, key, workdir, rng))
        if not args.skip_big:
            results["big"] = bench_big(args, key, workdir)
    finally:
        results["loadavg_end"] = os.getloadavg()
        if args.keep_logs:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    how = ("blocking queries (`?index=&wait=`), one watcher thread per agent" if args.watch == "block"
           else f"polling every {args.poll_interval * 1000:.0f} ms per agent")
    print(f"## mesh-agent registry benchmark ({os.cpu_count()} CPUs, load average at start "
          f"{load[0]:.2f}, at end {results['loadavg_end'][0]:.2f}; visibility detected by {how})\n")
    if results["spread"]:
        print(spread_table(results["spread"], args.profile))
        print()
        dead = {r["n"]: r["dead_agents"] for r in results["spread"] if r.get("dead_agents")}
        if dead:
            print(f"Agents that exited during the run: {dead}\n")
    if results["big"]:
        print(big_table(results["big"]))
        print()
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
