"""Every ``mesh-agent`` command but ``agent``: they talk to the local agent through its API.

cli/main.py loads this module when one of them is asked for (or the help
that lists them), so the agent process, which runs ``agent`` only, never
builds them.  Client commands speak only HTTP to the agent, so what they print
is exactly what the agent believes; they import nothing of the protocol, the
data plane or the agent (tests/test_cli.py checks this).  Two run locally
instead and use the agent's own packages on purpose: ``demo`` starts several
agents, and ``keygen`` makes a key in the one format gossip.keyring reads, so
that format has a single owner.

Over 600 lines because each command is a few lines of click options over
client.call, and they are read together.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from cli.client import ApiError
from cli.common import (
    STATUSES,
    OneLineErrors,
    _call,
    _emit,
    _fail,
    _print_json,
    _query,
    _segment,
    _table,
    api_option,
    json_option,
)


@click.command()
@api_option
@json_option
@click.option("--status", type=click.Choice(STATUSES), help="Only members with this status.")
def members(api: str, as_json: bool, status: str | None) -> None:
    """List the members this agent knows, like `serf members`."""
    path = "/v1/members" + (f"?status={status}" if status else "")
    data = _call(api, "GET", path)
    if as_json:
        _print_json([{k: m[k] for k in ("name", "address", "status", "incarnation", "tags")} for m in data])
        return
    rows = [["NAME", "ADDRESS", "STATUS", "INCARNATION", "TAGS"]]
    for m in data:
        tags = ",".join(f"{k}={v}" for k, v in sorted(m["tags"].items()))
        rows.append([m["name"], m["address"], m["status"], str(m["incarnation"]), tags])
    _table(rows)


@click.command()
@api_option
@json_option
def info(api: str, as_json: bool) -> None:
    """Show this agent's identity, member counts and counters (drops by reason)."""
    data = _call(api, "GET", "/v1/agent/self")
    if as_json:
        _print_json(data)
        return
    click.echo(f"name:        {data['name']}")
    click.echo(f"address:     {data['address']}  (bind {data['bind']}, api {data['api']})")
    dns = data.get("dns")
    click.echo(f"dns:         {dns['address']}  (domain {dns['domain']}, {dns['queries']} queries)" if dns else
               "dns:         off")
    click.echo(f"status:      {data['status']}  incarnation {data['incarnation']}")
    click.echo(f"profile:     {data['profile']}  encrypted: {'yes' if data['encrypted'] else 'NO'}")
    click.echo(f"joined:      {'yes' if data['joined'] else 'no, retrying: ' + data['join_error']}")
    click.echo(f"health:      local health score {data['health_score']} (0 is best)")
    click.echo("members:     " + ", ".join(f"{k} {v}" for k, v in data["members"].items()))
    for name in data.get("udp_blocked", []):
        click.echo(f"warning:     UDP to {name} looks blocked (it answers over TCP only): check firewalls")
    for row in data.get("undecryptable", []):
        click.echo(f"warning:     {row['hint']}")
    counters = data["counters"]
    dropped = counters.get("dropped", {})
    click.echo("dropped:     " + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none"))
    for name, state in data.get("store", {}).items():
        if state.get("error"):
            click.echo(f"store:       {name}.json not saved ({state['failures']} failures): {state['error']}")
    refused = {k: v for k, v in counters.get("api_refused", {}).items() if v}
    click.echo("api refused: " + (", ".join(f"{k} {v}" for k, v in refused.items()) or "none"))
    other = {k: v for k, v in counters.items() if k not in ("dropped", "dropped_total", "api_refused")}
    if dns and dns["dropped"]:
        click.echo("dns dropped: " + ", ".join(f"{k} {v}" for k, v in dns["dropped"].items()))
    click.echo("counters:    " + ", ".join(f"{k} {v}" for k, v in other.items()))


@click.command()
@api_option
@json_option
@click.argument("addresses", nargs=-1, required=True)
def join(api: str, as_json: bool, addresses: tuple[str, ...]) -> None:
    """Ask the local agent to join the cluster through ADDRESSES."""
    data = _call(api, "POST", "/v1/join", {"addresses": list(addresses)})
    if as_json:
        _print_json(data)
    else:
        click.echo(f"joined through {data['joined']} of {len(addresses)} address(es)")
        for addr, err in data.get("errors", {}).items():
            click.echo(f"  {addr}: {err}")
    sys.exit(0 if data.get("ok") else 1)


@click.command()
@api_option
@json_option
def leave(api: str, as_json: bool) -> None:
    """Make the local agent leave the cluster gracefully and exit."""
    data = _call(api, "POST", "/v1/leave")
    _emit(data, as_json, data.get("detail", "leaving"))


@click.command("force-leave")
@api_option
@json_option
@click.argument("node")
def force_leave(api: str, as_json: bool, node: str) -> None:
    """Mark NODE, a member that will never come back, as left everywhere (before the reap removes it)."""
    data = _call(api, "PUT", f"/v1/agent/force-leave/{_segment(node)}")
    _emit(data, as_json, f"{data['node']} (was {data['was']}): {data['detail']}")


@click.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the key to this file (mode 0600).")
@click.option("--force", is_flag=True, help="Replace --out if it exists (its old key is lost).")
def keygen(out: str | None, force: bool) -> None:
    """Print a new cluster key: 32 random bytes, base64."""
    from gossip.keyring import generate_key

    key = generate_key()
    if out:
        from pathlib import Path

        path = Path(out)
        try:
            # O_EXCL: a key file that exists may be the only copy of a cluster's key.
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
            fd = os.open(path, flags, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(key + "\n")
            os.chmod(path, 0o600)
        except FileExistsError:
            _fail(f"{out} already exists: it may hold a key in use; pass --force to replace it")
        except OSError as exc:
            _fail(f"cannot write {out}: {exc.strerror}")
    click.echo(key)


@click.group(invoke_without_command=True)
@api_option
@json_option
@click.pass_context
def services(ctx: click.Context, api: str, as_json: bool) -> None:
    """List the services known to the mesh (run `services --help` for more)."""
    if ctx.invoked_subcommand is not None:
        return
    data = _call(api, "GET", "/v1/services")
    if as_json:
        _print_json(data)
        return
    rows = [["SERVICE", "INSTANCES", "PASSING"]]
    rows += [[s["name"], str(s["instances"]), str(s["passing"])] for s in data]
    _table(rows)


@services.command("show")
@api_option
@json_option
@click.option("--passing", is_flag=True, help="Only instances whose health is passing.")
@click.argument("name")
def services_show(api: str, as_json: bool, passing: bool, name: str) -> None:
    """Show the instances of service NAME across the mesh."""
    path = f"/v1/services/{_segment(name)}" + ("?passing" if passing else "")
    data = _call(api, "GET", path)
    if as_json:
        _print_json(data)  # the API's objects whole (node_status included)
        return
    rows = [["ID", "NODE", "ADDRESS", "HEALTH", "TAGS", "CHECK OUTPUT"]]
    for i in data:
        health = i["health"] + (" (node suspect)" if i.get("node_status") == "suspect" else "")
        rows.append([i["id"], i["node"], i["address"], health, ",".join(i["tags"]) or "-", i.get("output") or ""])
    _table(rows)


def _meta_pairs(values: tuple[str, ...]) -> dict[str, str]:
    meta = {}
    for v in values:
        if "=" not in v:
            _fail(f"--meta {v!r}: expected KEY=VALUE", 2)
        k, _, val = v.partition("=")
        meta[k] = val
    return meta


@services.command("register")
@api_option
@json_option
@click.option("--name", required=True, help="Service name (a DNS label).")
@click.option("--port", required=True, type=int, help="Port the instance listens on.")
@click.option("--id", "iid", help="Instance id [NAME-NODE].")
@click.option("--address", help="Instance address [the agent's advertise host].")
@click.option("--tag", "tags", multiple=True, help="Tag (repeatable).")
@click.option("--meta", "meta", multiple=True, help="KEY=VALUE (repeatable).")
@click.option("--check-tcp", help="Health: TCP connect to HOST:PORT.")
@click.option("--check-http", help="Health: HTTP GET URL (2xx passing, 429 warning).")
@click.option("--check-exec", help="Health: shell command (exit 0 passing, 1 warning); the agent must run "
              "with --enable-script-checks.")
@click.option("--check-interval", help="Time between checks [10s].")
@click.option("--check-timeout", help="Time a check may take, at most the interval [2s or the interval].")
@click.option("--protocol", type=click.Choice(["tcp", "http"]),
              help="How the mesh carries calls to it: tcp (bytes) or http (balanced per request) [tcp].")
def services_register(api: str, as_json: bool, name: str, port: int, iid: str | None, address: str | None,
                      tags: tuple[str, ...], meta: tuple[str, ...], check_tcp: str | None,
                      check_http: str | None, check_exec: str | None, check_interval: str | None,
                      check_timeout: str | None, protocol: str | None) -> None:
    """Register a service instance on the local agent (persisted under --data-dir)."""
    body: dict[str, Any] = {"name": name, "port": port, "tags": list(tags), "meta": _meta_pairs(meta)}
    if protocol:
        body["protocol"] = protocol
    if iid:
        body["id"] = iid
    if address:
        body["address"] = address
    checks = [(t, v) for t, v in (("tcp", check_tcp), ("http", check_http), ("exec", check_exec)) if v]
    if len(checks) > 1:
        _fail("give at most one of --check-tcp, --check-http, --check-exec", 2)
    if not checks and (check_interval or check_timeout):
        _fail("--check-interval and --check-timeout need a check (--check-tcp, --check-http or --check-exec)", 2)
    if checks:
        body["check"] = {"type": checks[0][0], "target": checks[0][1], "interval": check_interval or "10s"}
        if check_timeout:  # otherwise the agent's default: 2 s, or the interval if that is shorter
            body["check"]["timeout"] = check_timeout
    data = _call(api, "PUT", "/v1/services", body)
    _emit(data, as_json, f"registered {data['id']}")


@services.command("deregister")
@api_option
@json_option
@click.argument("iid", metavar="ID")
def services_deregister(api: str, as_json: bool, iid: str) -> None:
    """Remove instance ID from the local agent."""
    data = _call(api, "DELETE", f"/v1/services/{_segment(iid)}")
    # Ids are per node (as in Consul): say whose instance this was.
    _emit(data, as_json, f"deregistered {data['id']} (service {data['service']}) from node {data['node']}")


@click.group(invoke_without_command=True)
@api_option
@json_option
@click.pass_context
def upstreams(ctx: click.Context, api: str, as_json: bool) -> None:
    """List this agent's upstreams: local ports that lead to a service in the mesh."""
    if ctx.invoked_subcommand is not None:
        return
    data = _call(api, "GET", "/v1/upstreams")
    if as_json:
        _print_json(data)
        return
    rows = [["SERVICE", "LISTEN", "INSTANCES", "CONNECTIONS", "FAILURES", "SOURCE"]]
    rows += [[u["service"], u["listen"], str(u["instances"]), str(u["connections"]), str(u["connect_failures"]),
              u.get("source") or "-"]
             for u in data]
    _table(rows)


@upstreams.command("add")
@api_option
@json_option
@click.option("--service", required=True, help="Service to reach.")
@click.option("--listen", required=True, help="Local HOST:PORT to listen on.")
@click.option("--source", help="Local service these connections act for (judged by the far agents' intentions).")
@click.option("--connect-timeout", help="Time to reach an instance before trying another [5s].")
@click.option("--idle-timeout", help="Silence either way before a connection is reset; 0 is off [1h].")
@click.option("--lb", help="Balancing: p2c (peak-EWMA), round_robin or least_connections [p2c].")
@click.option("--max-connections", type=int, help="Open connections (http: requests in flight) at most [1024].")
@click.option("--max-pending", type=int, help="Connects in flight at most [1024].")
@click.option("--consecutive-failures", type=int, help="Failures (http: and 5xx answers) in a row that eject [5].")
@click.option("--base-ejection-time", help="First ejection's length, growing with each [30s].")
@click.option("--max-ejection-percent", type=float, help="Instances that may be ejected at once, in % [50].")
@click.option("--slow-start-window", help="Ramp-up of a new or returning instance; 0 is off [30s].")
@click.option("--timeout", help="http: end of request to end of response, retries included; 0 is off [15s].")
@click.option("--retry-on", help="http: instance answers retried for idempotent requests [502,503,504].")
@click.option("--max-retries", type=int, help="http: retries per request, within the retry budget [2].")
@click.option("--public", is_flag=True,
              help="Allow a --listen address other hosts can reach (anyone who reaches it reaches SERVICE).")
def upstreams_add(api: str, as_json: bool, service: str, listen: str, source: str | None,
                  connect_timeout: str | None, idle_timeout: str | None, lb: str | None,
                  max_connections: int | None, max_pending: int | None, consecutive_failures: int | None,
                  base_ejection_time: str | None, max_ejection_percent: float | None,
                  slow_start_window: str | None, timeout: str | None, retry_on: str | None,
                  max_retries: int | None, public: bool) -> None:
    """Open a local port that leads to SERVICE through the mesh (options unset follow its service-defaults)."""
    body: dict[str, Any] = {"service": service, "listen": listen}
    if public:
        body["public"] = True
    optional: dict[str, Any] = {
        "source": source, "connect_timeout": connect_timeout, "idle_timeout": idle_timeout, "lb": lb,
        "max_connections": max_connections, "max_pending": max_pending,
        "consecutive_failures": consecutive_failures, "base_ejection_time": base_ejection_time,
        "max_ejection_percent": max_ejection_percent, "slow_start_window": slow_start_window,
        "timeout": timeout, "retry_on": retry_on, "max_retries": max_retries,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    data = _call(api, "PUT", "/v1/upstreams", body)
    as_source = f" (as {data['source']})" if data.get("source") else ""
    _emit(data, as_json, f"{data['listen']} -> {data['service']}{as_source}")


@upstreams.command("remove")
@api_option
@json_option
@click.argument("service")
def upstreams_remove(api: str, as_json: bool, service: str) -> None:
    """Close the upstream for SERVICE."""
    data = _call(api, "DELETE", f"/v1/upstreams/{_segment(service)}")
    _emit(data, as_json, f"removed upstream {data['service']}")


@click.group(invoke_without_command=True)
@api_option
@json_option
@click.pass_context
def intentions(ctx: click.Context, api: str, as_json: bool) -> None:
    """List this agent's intentions: which services may call its instances (default allow)."""
    if ctx.invoked_subcommand is not None:
        return
    data = _call(api, "GET", "/v1/intentions")
    if as_json:
        _print_json(data)
        return
    rows = [["SOURCE", "DESTINATION", "ACTION", "PRECEDENCE", "DESCRIPTION"]]
    rows += [[r["source"], r["destination"], r["action"], str(r["precedence"]), r["description"]] for r in data]
    _table(rows)


def _set_intention(api: str, as_json: bool, action: str, source: str, destination: str,
                   description: str | None) -> None:
    body: dict[str, Any] = {"source": source, "destination": destination, "action": action}
    if description is not None:
        body["description"] = description
    data = _call(api, "PUT", "/v1/intentions", body)
    _emit(data, as_json, f"{data['source']} -> {data['destination']}: {data['action']}")


@intentions.command("allow")
@api_option
@json_option
@click.option("--description", help="Why the rule exists.")
@click.argument("source")
@click.argument("destination")
def intentions_allow(api: str, as_json: bool, description: str | None, source: str, destination: str) -> None:
    """Allow SOURCE to call DESTINATION ('*' for any service; replaces a rule for the same pair)."""
    _set_intention(api, as_json, "allow", source, destination, description)


@intentions.command("deny")
@api_option
@json_option
@click.option("--description", help="Why the rule exists.")
@click.argument("source")
@click.argument("destination")
def intentions_deny(api: str, as_json: bool, description: str | None, source: str, destination: str) -> None:
    """Deny SOURCE calling DESTINATION ('*' for any service; replaces a rule for the same pair)."""
    _set_intention(api, as_json, "deny", source, destination, description)


@intentions.command("remove")
@api_option
@json_option
@click.argument("source")
@click.argument("destination")
def intentions_remove(api: str, as_json: bool, source: str, destination: str) -> None:
    """Remove the rule from SOURCE to DESTINATION."""
    data = _call(api, "DELETE", f"/v1/intentions/{_segment(source)}/{_segment(destination)}")
    _emit(data, as_json, f"removed {data['source']} -> {data['destination']}")


@click.group("config")
def config_entries() -> None:
    """Mesh-wide config entries: written on any node, the same on every node (intention,
    service-defaults, service-resolver, service-splitter, service-router)."""


_ENTRY_META = ("kind", "name", "version", "writer", "written_at", "signed_by")


def _entry_fields(entry: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in entry.items() if k not in _ENTRY_META}, sort_keys=True)


@config_entries.command("write")
@api_option
@json_option
@click.option("--cas", type=click.IntRange(0), help="Write only if the entry is still at this version "
                                                    "(from `config read`; 0: only if it does not exist).")
@click.argument("file", type=click.File("r"))
def config_write(api: str, as_json: bool, cas: int | None, file: Any) -> None:
    """Write the entry (or list of entries) in FILE, JSON; '-' reads standard input."""
    try:
        body = json.load(file)
    except ValueError as exc:
        _fail(f"{file.name}: not JSON: {exc}")
    path = "/v1/config" + (f"?cas={cas}" if cas is not None else "")
    data = _call(api, "PUT", path, body)
    written = data if isinstance(data, list) else [data]
    _emit(data, as_json, "\n".join(f"wrote {e['kind']} {e['name']} (version {e['version']})" for e in written))


@config_entries.command("read")
@api_option
@json_option
@click.argument("kind")
@click.argument("name")
def config_read(api: str, as_json: bool, kind: str, name: str) -> None:
    """Show one entry, with who wrote it and when."""
    data = _call(api, "GET", f"/v1/config/{_segment(kind)}/{_segment(name)}")
    if as_json:
        _print_json(data)
        return
    for k in _ENTRY_META:
        click.echo(f"{k + ':':12}{data[k]}")
    click.echo(json.dumps({k: v for k, v in data.items() if k not in _ENTRY_META}, indent=2, sort_keys=True))


@config_entries.command("list")
@api_option
@json_option
@click.argument("kind", required=False)
def config_list(api: str, as_json: bool, kind: str | None) -> None:
    """List the entries, of one KIND or all."""
    data = _call(api, "GET", "/v1/config" + (f"/{_segment(kind)}" if kind else ""))
    if as_json:
        _print_json(data)
        return
    rows = [["KIND", "NAME", "VERSION", "WRITER", "WRITTEN", "FIELDS"]]
    rows += [[e["kind"], e["name"], str(e["version"]), e["writer"], e["written_at"], _entry_fields(e)] for e in data]
    _table(rows)


@config_entries.command("delete")
@api_option
@json_option
@click.option("--cas", type=click.IntRange(1), help="Delete only if the entry is still at this version.")
@click.argument("kind")
@click.argument("name")
def config_delete(api: str, as_json: bool, cas: int | None, kind: str, name: str) -> None:
    """Delete an entry everywhere (the delete itself spreads, so it cannot come back)."""
    path = f"/v1/config/{_segment(kind)}/{_segment(name)}" + (f"?cas={cas}" if cas else "")
    data = _call(api, "DELETE", path)
    _emit(data, as_json, f"deleted {data['kind']} {data['name']} (version {data['version']})")


@click.group()
def keys() -> None:
    """Manage the gossip keyring on every member at once (like `serf keys`)."""


def _key_report(data: dict[str, Any], what: str) -> None:
    click.echo(f"{what}: {data['acked']} of {data['members']} members acknowledged")
    for name, error in sorted(data.get("failed", {}).items()):
        click.echo(f"  {name}: {error}")
    for name in data.get("missing", []):
        click.echo(f"  {name}: no answer")


def _key_command(api: str, as_json: bool, op: str, key: str | None) -> None:
    data = _call(api, "GET", "/v1/keys") if op == "list" else _call(api, "POST", "/v1/keys", {"op": op, "key": key})
    if as_json:
        _print_json(data)
    elif op == "list":
        _key_report(data, "keys")
        primaries = data.get("primary", {})
        for k, count in sorted(data.get("keys", {}).items()):
            mark = f" (primary on {primaries[k]})" if k in primaries else ""
            click.echo(f"  {k}  installed on {count}/{data['members']}{mark}")
    else:
        _key_report(data, {"install": "installed", "use": "made primary", "remove": "removed"}[op])
    if not data.get("ok"):
        sys.exit(1)


@keys.command("list")
@api_option
@json_option
def keys_list(api: str, as_json: bool) -> None:
    """Every key installed across the cluster, and on how many members."""
    _key_command(api, as_json, "list", None)


@keys.command("install")
@api_option
@json_option
@click.argument("key")
def keys_install(api: str, as_json: bool, key: str) -> None:
    """Add KEY to every member's keyring (it opens packets; the primary still seals)."""
    _key_command(api, as_json, "install", key)


@keys.command("use")
@api_option
@json_option
@click.argument("key")
def keys_use(api: str, as_json: bool, key: str) -> None:
    """Make the installed KEY primary on every member."""
    _key_command(api, as_json, "use", key)


@keys.command("remove")
@api_option
@json_option
@click.argument("key")
def keys_remove(api: str, as_json: bool, key: str) -> None:
    """Remove KEY from every member (refused for the primary key)."""
    _key_command(api, as_json, "remove", key)


@click.command()
@api_option
@json_option
@click.argument("service", required=False)
def routes(api: str, as_json: bool, service: str | None) -> None:
    """Show the routing table: each upstream's instances with RTT, path, weight and state."""
    path = "/v1/routes" + ("?" + _query({"service": service}) if service else "")
    data = _call(api, "GET", path)
    if as_json:
        _print_json(data)
        return
    rows = [["SERVICE", "INSTANCE", "NODE", "PATH", "RTT", "WEIGHT", "STATE", "OPEN", "LATENCY", "LAST FAILURE"]]
    for r in data:
        rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.2f}ms"
        latency = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}ms"
        state = r["state"] + (" (half-open)" if r.get("half_open") else "")
        if r.get("refused"):
            state += " (refused)"  # its agent's intentions refuse this upstream's source
        failure = "-" if not r.get("last_failure") else f"{r['last_failure']} {r['last_failure_ago_s']:.0f}s ago"
        rows.append([r["service"], r["instance"], r["node"], " > ".join(r["path"]), rtt, f"{r['weight']:.2f}",
                     state, str(r.get("outstanding", 0)), latency, failure])
    _table(rows)


@click.command()
@api_option
@json_option
@click.argument("node")
@click.argument("node2", required=False)
def rtt(api: str, as_json: bool, node: str, node2: str | None) -> None:
    """Round-trip time from this agent to NODE, or from NODE to NODE2 (estimated from coordinates)."""
    query = {"to": node} if node2 is None else {"from": node, "to": node2}
    data = _call(api, "GET", "/v1/rtt?" + _query(query))
    _emit(data, as_json, f"{data['from']} <-> {data['to']}: {data['rtt_ms']:.3f} ms ({data['source']})")


@click.command()
@api_option
@json_option
@click.option("--log-level", default="info", show_default=True, metavar="LEVEL",
              help="Least severe level to show: debug, info, warning or error (may be below the agent's own).")
def monitor(api: str, as_json: bool, log_level: str) -> None:
    """Stream the agent's log lines and member events until Ctrl-C, like `consul monitor`."""
    import signal

    import structlog

    from cli.client import stream_lines

    # Lines look as the agent's own console log does; the agent sends JSON.
    render = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    # Exit quietly when the reader of a pipe (`| head`) goes away.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        try:
            lines = stream_lines(api, "/v1/agent/monitor?" + _query({"log_level": log_level}))
        except ApiError as exc:
            _fail(str(exc))
        click.echo(f"mesh-agent: monitoring {api} at level {log_level} (Ctrl-C to stop)", err=True)
        for line in lines:
            text = line.decode(errors="replace").rstrip("\n")
            if not as_json:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    text = render(None, str(event.get("level", "info")), event)
            click.echo(text)
    except KeyboardInterrupt:
        sys.exit(0)
    _fail(f"the agent at {api} ended the stream (it stopped or left)")


@click.command(cls=OneLineErrors)
@click.option("--nodes", default=5, show_default=True, type=click.IntRange(2, 50), help="How many agents.")
@click.option("--base-port", default=17946, show_default=True, type=click.IntRange(1024, 65000),
              help="First port; each agent takes two (gossip, API), then one per demo service instance "
                   "and one for the upstream.")
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(0.05, 60),
              help="Seconds between the client's calls.")
def demo(nodes: int, base_port: int, interval: float) -> None:
    """Start a local mesh on loopback: agents, demo services, an upstream and a client (Ctrl-C leaves)."""
    from cli.demo import run_demo

    run_demo(nodes, base_port, interval)


@click.command("demo-service", cls=OneLineErrors)
@click.option("--port", required=True, type=click.IntRange(1, 65535), help="Port to serve HTTP on.")
@click.option("--id", "instance", required=True, help="Instance id, returned in every answer.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--register", "service", help="Register with the local agent as an instance of this service.")
@click.option("--address", help="Address the agent reaches the instance at [--host, or the agent's].")
@click.option("--check-interval", default="2s", show_default=True, help="Health-check interval when registered.")
@api_option
def demo_service(port: int, instance: str, host: str, service: str | None, address: str | None,
                 check_interval: str, api: str) -> None:
    """A tiny HTTP service that answers every request with its instance id (for demos and tests)."""
    from cli.demo_service import run_service

    run_service(host, port, instance, service, address, api, check_interval)


@click.command("demo-client", cls=OneLineErrors)
@click.option("--url", required=True, help="What to call, e.g. an upstream: http://127.0.0.1:9000/.")
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(0, 3600),
              help="Seconds between calls.")
@click.option("--count", type=click.IntRange(1), help="Stop after this many calls [never].")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 300),
              help="Seconds one call may take.")
@click.option("--upstream", "service", help="First make the local agent's upstream for this service listen on --url.")
@api_option
def demo_client(url: str, interval: float, count: int | None, timeout: float, service: str | None,
                api: str) -> None:
    """Call URL in a loop, printing which instance answered and how long it took."""
    from cli.demo_service import run_client

    run_client(url, interval, count, timeout, service, api)


#: The top-level commands and groups, attached to cli.main's group when first needed.
COMMANDS = (
    members, info, join, leave, force_leave, keygen, services, upstreams, intentions, config_entries, keys,
    routes, rtt, monitor, demo, demo_service, demo_client,
)
