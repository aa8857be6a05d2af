"""``mesh-agent demo``: a local mesh on loopback, for a first look.

It starts N real agents (separate processes, encrypted gossip, the fast
``local`` profile) that join through the first one, prints the membership
table whenever it changes, and on Ctrl-C asks every agent to leave
gracefully.  It only supervises processes and reads their local APIs, like
any other client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from cli.client import ApiError, call
from gossip.keyring import generate_key


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


def _print_table(names: list[str], views: dict[str, dict[str, str] | None], started: float) -> None:
    click.echo(f"\n--- membership as each agent sees it (t={time.monotonic() - started:5.1f}s) ---")
    header = ["seen by \\ member"] + names
    rows = [header]
    for observer in names:
        v = views.get(observer)
        if v is None:
            rows.append([observer] + ["(no answer)"] + [""] * (len(names) - 1))
        else:
            rows.append([observer] + [v.get(n, "-") for n in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def run_demo(nodes: int, base_port: int) -> None:
    ports = [(base_port + 2 * i, base_port + 2 * i + 1) for i in range(nodes)]
    busy = [p for pair in ports for p in pair if not _port_free(p)]
    if busy:
        raise click.ClickException(f"port {busy[0]} is in use; pick another --base-port")
    key = generate_key()
    workdir = Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    names = [f"node{i + 1}" for i in range(nodes)]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    apis = {n: f"127.0.0.1:{ports[i][1]}" for i, n in enumerate(names)}
    seed = f"127.0.0.1:{ports[0][0]}"
    env = dict(os.environ, MESH_KEY=key)
    click.echo(f"starting {nodes} agents on loopback (encrypted gossip; logs in {workdir})")
    for i, name in enumerate(names):
        args = [sys.executable, "-m", "cli.main", "agent", "--name", name,
                "--bind", f"127.0.0.1:{ports[i][0]}", "--api", apis[name], "--profile", "local",
                "--tunnel", "127.0.0.1:0"]
        if i > 0:
            args += ["--join", seed]
        with open(workdir / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
        click.echo(f"  {name}: gossip 127.0.0.1:{ports[i][0]}  api {apis[name]}  pid {procs[name].pid}")
    click.echo(f"\ntry, in another shell:  mesh-agent members --api {apis[names[0]]}")
    click.echo(f"                        kill -9 {procs[names[-1]].pid}   (watch {names[-1]} turn suspect, then dead)")
    click.echo("Ctrl-C leaves gracefully (members show as 'left').")
    started = time.monotonic()
    last: Any = None
    converged = False
    try:
        while True:
            views = {n: (_view(apis[n]) if procs[n].poll() is None else None) for n in names}
            if views != last:
                _print_table(names, views, started)
                last = views
            if not converged and all(v is not None and all(v.get(n) == "alive" for n in names)
                                     for v in views.values()):
                converged = True
                click.echo(f"converged: all {nodes} agents see {nodes} alive "
                           f"after {time.monotonic() - started:.1f}s")
            time.sleep(0.5)
    except KeyboardInterrupt:
        click.echo("\nleaving gracefully ...")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, p in procs.items():
            try:
                code = p.wait(max(0.1, deadline - time.monotonic()))
                click.echo(f"  {name} exited with {code}")
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                click.echo(f"  {name} did not stop in time; killed")
