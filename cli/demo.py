"""``mesh-agent demo``: a whole mesh on loopback, for a first look without Docker.

It starts N real agents (separate processes, encrypted gossip, the fast
``local`` profile) that join through the first two, the demo services
registered on them, an upstream on the last agent and a client that calls
through it in a loop, printing which instance answered and how long it took.
The layout is the one docker-compose.yml runs (agent *i* is node *i*), so what
the README tells about one holds for the other.  Killing an agent's process
shows the calls moving to the remaining instances; Ctrl-C stops the services,
asks every agent to leave gracefully, and exits 0.  It only supervises
processes and reads their local APIs, like any other client.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click

from cli.client import ApiError, call
from cli.demo_service import call_once, format_answer
from gossip.keyring import generate_key

#: Which agents (0-based, modulo the number of agents) run an instance of each demo service, in the
#: order of their instance ids: the placement docker-compose.yml uses for its five agents.
PLACEMENT: dict[str, tuple[int, ...]] = {"web": (1, 2, 3), "api": (0, 3)}
#: The service the client calls, through an upstream on the last agent.
CLIENT_SERVICE = "web"
SEEDS = 2


@dataclass(frozen=True)
class Instance:
    service: str
    id: str
    node_index: int


def layout(nodes: int) -> list[Instance]:
    """The demo services' instances for ``nodes`` agents (several on one agent when there are few)."""
    out = []
    for service, where in PLACEMENT.items():
        placed = list(dict.fromkeys(i % nodes for i in where))
        out += [Instance(service, f"{service}-{k + 1}", idx) for k, idx in enumerate(placed)]
    return out


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _view(api: str) -> dict[str, str] | None:
    try:
        return {m["name"]: m["status"] for m in call(api, "GET", "/v1/members", timeout=2)}
    except ApiError:
        return None


def _routes(api: str, service: str) -> list[str] | None:
    try:
        rows = call(api, "GET", f"/v1/routes?service={service}", timeout=2)
    except ApiError:
        return None
    return sorted(f"{r['instance']} ({r['state']})" for r in rows)


def _passing(api: str, service: str) -> int:
    try:
        return len(call(api, "GET", f"/v1/services/{service}?passing", timeout=2))
    except ApiError:
        return 0


def _print_table(names: list[str], views: dict[str, dict[str, str] | None], started: float,
                 exited: set[str]) -> None:
    click.echo(f"\n--- membership as each agent sees it (t={time.monotonic() - started:5.1f}s) ---")
    header = ["seen by \\ member"] + names
    rows = [header]
    for observer in names:
        v = views.get(observer)
        if v is None:
            rows.append([observer] + ["(exited)" if observer in exited else "(no answer)"] + [""] * (len(names) - 1))
        else:
            rows.append([observer] + [v.get(n, "-") for n in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    click.echo("")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _stop(group: dict[str, subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM every process group, then wait; what does not stop in time is killed."""
    for p in group.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for name, p in group.items():
        try:
            code = p.wait(max(0.1, deadline - time.monotonic()))
            click.echo(f"  {name} exited with {code}")
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            click.echo(f"  {name} did not stop in time; killed")


def run_demo(nodes: int, base_port: int, interval: float) -> None:
    names = [f"node{i + 1}" for i in range(nodes)]
    instances = layout(nodes)
    ports = [(base_port + 2 * i, base_port + 2 * i + 1) for i in range(nodes)]
    service_ports = {inst.id: base_port + 2 * nodes + k for k, inst in enumerate(instances)}
    upstream_port = base_port + 2 * nodes + len(instances)
    wanted = [p for pair in ports for p in pair] + list(service_ports.values()) + [upstream_port]
    busy = [p for p in wanted if not _port_free(p)]
    if busy:
        raise click.ClickException(f"port {busy[0]} is in use; pick another --base-port")
    if max(wanted) > 65535:
        raise click.ClickException("--base-port is too high for this many agents")
    key = generate_key()
    workdir = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    agents: dict[str, subprocess.Popen[bytes]] = {}
    services: dict[str, subprocess.Popen[bytes]] = {}
    apis = {n: f"127.0.0.1:{ports[i][1]}" for i, n in enumerate(names)}
    seeds = [f"127.0.0.1:{ports[i][0]}" for i in range(min(SEEDS, nodes))]
    client_node = names[-1]
    url = f"http://127.0.0.1:{upstream_port}/"
    env = dict(os.environ, MESH_KEY=key)
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)

    def spawn(name: str, args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(workdir / f"{name}.log", "wb") as log:
            return subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env={**env, **(extra_env or {})},
                                    start_new_session=True)

    try:
        click.echo(f"starting {nodes} agents on loopback, joining through {' and '.join(names[:SEEDS])} "
                   f"(encrypted gossip; logs in {workdir})")
        for i, name in enumerate(names):
            # Every agent joins through the seeds, a seed through the others (a push-pull with itself
            # would be refused as a second agent of its name), as in docker-compose.yml.
            join = [s for k, s in enumerate(seeds) if k != i]
            agents[name] = spawn(name, ["agent", "--name", name, "--bind", f"127.0.0.1:{ports[i][0]}",
                                        "--api", apis[name], "--profile", "local", "--tunnel", "127.0.0.1:0"],
                                 {"MESH_JOIN": ",".join(join)})
            click.echo(f"  {name}: gossip 127.0.0.1:{ports[i][0]}  api {apis[name]}  pid {agents[name].pid}")
        click.echo("demo services (`mesh-agent demo-service`, each registered with its agent):")
        for inst in instances:
            node = names[inst.node_index]
            port = service_ports[inst.id]
            services[inst.id] = spawn(inst.id, ["demo-service", "--port", str(port), "--id", inst.id,
                                                "--register", inst.service, "--api", apis[node]])
            click.echo(f"  {inst.id:6} on {node}: 127.0.0.1:{port}  pid {services[inst.id].pid}")
        _watch(names, agents, apis, instances, client_node, url, interval)
    except KeyboardInterrupt:
        click.echo("\nstopping: services deregister, agents leave gracefully ...")
        clean = True
    else:
        clean = False
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the leave short
        signal.signal(signal.SIGTERM, previous_term)
        _stop(services, 10)
        _stop(agents, 15)
    # The logs matter only when something went wrong: then they stay, and the path is said.
    if clean:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        click.echo(f"logs kept in {workdir}", err=True)


def _watch(names: list[str], agents: dict[str, subprocess.Popen[bytes]], apis: dict[str, str],
           instances: list[Instance], client_node: str, url: str, interval: float) -> None:
    """Print membership and routing changes, and one line per client call, until Ctrl-C."""
    client_api = apis[client_node]
    host_port = url.split("/")[2]
    host, port = host_port.rsplit(":", 1)
    called = [i for i in instances if i.service == CLIENT_SERVICE]
    victim = names[called[len(called) // 2].node_index]
    started = time.monotonic()
    last_views: Any = None
    last_routes: list[str] | None = None
    ready = False
    upstream_added = False
    next_poll = 0.0
    while True:
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + 0.5
            views = {n: (_view(apis[n]) if agents[n].poll() is None else None) for n in names}
            if views != last_views and any(v is not None for v in views.values()):
                _print_table(names, views, started, {n for n, p in agents.items() if p.poll() is not None})
                last_views = views
            if not upstream_added and views.get(client_node) is not None:
                try:
                    call(client_api, "PUT", "/v1/upstreams", {"service": CLIENT_SERVICE, "listen": host_port})
                except ApiError as exc:
                    raise click.ClickException(f"cannot add the upstream on {client_node}: {exc}") from None
                upstream_added = True
                click.echo(f"upstream on {client_node}: {host_port} -> {CLIENT_SERVICE}")
            if upstream_added:
                routes = _routes(client_api, CLIENT_SERVICE)
                if routes is not None and routes != last_routes:
                    click.echo(f"{client_node} routes {CLIENT_SERVICE} to: {', '.join(routes) or 'nothing'}")
                    last_routes = routes
            if not ready:
                alive = all(v is not None and all(v.get(n) == "alive" for n in names) for v in views.values())
                ready = upstream_added and alive and _passing(client_api, CLIENT_SERVICE) == len(called)
                if ready or now - started > 30:
                    ready = True
                    click.echo(f"\nmesh ready after {now - started:.1f}s; the client calls {url} "
                               f"({CLIENT_SERVICE} through {client_node}'s upstream) every {interval} s.")
                    click.echo("try, in another shell:")
                    click.echo(f"  .venv/bin/mesh-agent members --api {apis[names[0]]}")
                    click.echo(f"  .venv/bin/mesh-agent routes --api {client_api}")
                    click.echo(f"  .venv/bin/mesh-agent stat {CLIENT_SERVICE} --api {client_api}    "
                               "(success rate, requests/s, latency per instance)")
                    hosted = ", ".join(i.id for i in instances if names[i.node_index] == victim)
                    click.echo(f"  kill -9 {agents[victim].pid}    ({victim}, which runs {hosted}: watch it turn "
                               f"suspect, then dead, and the calls move to the other {CLIENT_SERVICE} instances)")
                    click.echo("Ctrl-C stops everything; the agents leave gracefully.\n")
        if ready:
            answer, ms, error = call_once(host, int(port), "/", timeout=5)
            click.echo(format_answer(answer, ms, error))
            time.sleep(interval)
        else:
            time.sleep(0.2)
