"""``mesh-agent stat`` and ``mesh-agent tap``: the golden metrics of HTTP services, as `linkerd viz` shows them.

Kept out of cli/main.py, which is long enough; the commands are attached to
its group by :func:`register`, which takes the shared options as arguments so
that this module need not import cli.main (cli.main imports it).  Like every
client command they speak only HTTP to the local agent (cli/client.py).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from cli.client import ApiError, call, stream_lines
from cli.common import _query

Decorator = Callable[[Any], Any]


def _fail(msg: str) -> NoReturn:
    click.echo(f"mesh-agent: {msg}", err=True)
    sys.exit(1)


def _rate(v: Any) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _latency(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.2f}ms" if v >= 0.1 else f"{v * 1000:.0f}us"


def _figures(row: dict[str, Any]) -> list[str]:
    return [_rate(row["success_rate"]), f"{row['rps']:.1f}", _latency(row["p50_ms"]), _latency(row["p95_ms"]),
            _latency(row["p99_ms"]), str(row["requests"])]


def stat_table(view: dict[str, Any]) -> list[str]:
    """The lines `mesh-agent stat` prints for GET /v1/stat's answer."""
    out: list[str] = []
    head = ["SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "REQUESTS"]
    for direction, who in (("outbound", "calls this agent's clients made"),
                           ("inbound", "calls that reached this agent's instances")):
        rows: list[list[str]] = [["SERVICE", "INSTANCE", *head]]
        for svc in view.get(direction, []):
            rows.append([svc["service"], "*", *_figures(svc)])
            rows += [["", inst["instance"] or "(none reached)", *_figures(inst)] for inst in svc["instances"]]
            rows += [["", f"from {src['source']}", *_figures(src)] for src in svc.get("sources", [])]
        out.append(f"{direction.upper()} ({who}, last {view.get('window_seconds', 60):.0f}s)")
        if len(rows) == 1:
            out.append("  no HTTP requests yet")
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out


def tap_text(item: dict[str, Any]) -> str:
    """One tap line for people."""
    if item.get("event") == "tap_dropped":
        return f"... {item.get('dropped')} requests skipped (this tap read too slowly)"
    arrow = "->" if item.get("direction") == "outbound" else "<-"
    status = item.get("status") or "no-response"
    extra = ""
    if item.get("mesh_error"):
        extra += f" mesh_error={item['mesh_error']}"
    if item.get("retries"):
        extra += f" retries={item['retries']}"
    src = f" src={item['source']}" if item.get("source") else ""
    return (f"{item.get('time', '')} {item.get('direction', '?'):<8} {arrow} {item.get('service')}/"
            f"{item.get('instance') or '-'}@{item.get('node') or '-'}{src} {item.get('method')} {item.get('path')} "
            f"{status} {item.get('latency_ms')}ms{extra}")


@click.argument("service", required=False)
def stat(api: str, as_json: bool, service: str | None) -> None:
    """Success rate, requests/s and latency p50/p95/p99 of HTTP services over the last minute."""
    path = "/v1/stat" + (f"?{_query({'service': service})}" if service else "")
    try:
        view = call(api, "GET", path)
    except ApiError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    for line in stat_table(view):
        click.echo(line)


@click.argument("service")
@click.option("--instance", help="Only requests answered by this instance.")
@click.option("--method", help="Only requests with this method (GET, POST, ...).")
@click.option("--path", help="Only requests whose path starts with this.")
def tap(api: str, as_json: bool, service: str, instance: str | None, method: str | None,
        path: str | None) -> None:
    """Stream one line per HTTP request to SERVICE through this agent, as it finishes, until Ctrl-C."""
    query = {"service": service, **{k: v for k, v in (("instance", instance), ("method", method),
                                                        ("path", path)) if v is not None}}
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends us quietly
    try:
        try:
            lines = stream_lines(api, "/v1/tap?" + _query(query))
        except ApiError as exc:
            _fail(str(exc))
        click.echo(f"mesh-agent: tapping {service} at {api} (Ctrl-C to stop)", err=True)
        for raw in lines:
            if as_json:
                click.echo(raw.decode(errors="replace").rstrip("\n"))
                continue
            try:
                item = json.loads(raw)
            except ValueError:
                item = None
            click.echo(tap_text(item) if isinstance(item, dict) else raw.decode(errors="replace").rstrip("\n"))
    except KeyboardInterrupt:
        sys.exit(0)
    _fail(f"the agent at {api} ended the tap (it stopped or left)")


def register(group: click.Group, api_option: Decorator, json_option: Decorator,
             command_class: type[click.Command]) -> None:
    """Attach ``stat`` and ``tap`` to the CLI's group, with the options every client command has."""
    for f in (stat, tap):
        group.command(cls=command_class)(api_option(json_option(f)))
