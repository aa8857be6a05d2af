"""This agent's own service instances: validation, persistence, health checks.

The agent is the only writer of its instances (gossip/registry.py spreads
them), so everything about a local instance happens here: input is checked
before anything changes, run-time registrations are written to ``--data-dir``
so a restart loses nothing, and each instance's health check runs as a task
in the agent's nursery, cancelled when the instance is deregistered.

Discovery views combine the registry with membership: instances of dead or
departed members leave discovery, and those of suspect members are flagged.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from agent import log, store
from gossip.member import Status
from gossip.registry import Instance, Registry
from gossip.swim import Membership
from gossip.wire import format_addr

if TYPE_CHECKING:
    from agent.health import CheckRunner, CheckSpec

SERVICE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
META_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_TAGS = 64
MAX_TAG_LEN = 256
MAX_META = 64
MAX_META_VALUE = 512
FIELDS = {"name", "id", "address", "port", "tags", "meta", "check", "protocol"}
PROTOCOLS = ("tcp", "http")
#: How an instance's protocol travels in the registry: as a meta entry under a key no user can
#: register (META_KEY_RE has no '.'), so agents that predate it carry and show it, never refuse it.
PROTOCOL_META = "mesh.protocol"
STORE_FILE = "services.json"


def shown(value: Any) -> str:
    """A value from a request as the caller wrote it (JSON: null, true, "x"), never as Python prints it."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


class ServiceError(ValueError):
    """Bad registration input; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: Set on a refusal by policy (not bad input): the refusal counter it counts in (agent.access).
        self.reason = reason


@dataclass
class Registration:
    id: str
    name: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    check: CheckSpec | None = None
    #: "config" registrations come back from the config file at each start;
    #: "api" ones are persisted under --data-dir.
    source: str = "api"
    #: "tcp" (carried as bytes) or "http" (balanced per request): see effective_protocol.
    protocol: str = "tcp"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "name": self.name, "address": self.address, "port": self.port,
                             "tags": list(self.tags), "meta": dict(self.meta)}
        if self.protocol != "tcp":
            d["protocol"] = self.protocol
        if self.check is not None:
            d["check"] = self.check.to_dict()
        return d


#: What refuses an exec check registered over the API, naming the setting that allows it.
SCRIPT_CHECKS_OFF = ("exec checks registered over the API are off: they would let any API caller run commands "
                     "as the agent's user. Start the agent with --enable-script-checks (config: "
                     "enable_script_checks = true) to allow them; exec checks in the config file need nothing")


def validate(payload: Any, node: str, default_address: str, source: str = "api",
             script_checks: bool = True) -> Registration:
    """Check a registration fully before anything changes; one-line errors.

    ``script_checks`` False refuses an exec check (Consul's model: a script
    check from the API is remote code execution for whoever can reach it,
    so it is off unless the operator turns it on; the config file is the
    operator's own).
    """
    if not isinstance(payload, dict):
        raise ServiceError("a service registration must be a JSON object")
    unknown = sorted(set(payload) - FIELDS)
    if unknown:
        raise ServiceError(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(FIELDS))})")
    name = payload.get("name")
    if not isinstance(name, str) or not SERVICE_NAME_RE.match(name):
        raise ServiceError(
            f"invalid service name {shown(name)}: use a DNS label (1-63 of a-z, 0-9 and '-', "
            "not starting or ending with '-')")
    port = payload.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ServiceError("port is missing: give an integer from 1 to 65535" if port is None
                           else f"port must be an integer from 1 to 65535, got {shown(port)}")
    iid = payload.get("id") or f"{name}-{node}"
    if not isinstance(iid, str) or not INSTANCE_ID_RE.match(iid):
        raise ServiceError(f"invalid id {shown(iid)}: 1-128 of letters, digits, '_', '.', ':' and '-'")
    address = payload.get("address") or default_address
    if not isinstance(address, str) or len(address) > 255 or any(c.isspace() for c in address):
        raise ServiceError(f"invalid address {shown(address)}")
    tags = payload.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= MAX_TAG_LEN for t in tags):
        raise ServiceError(f"tags must be a list of non-empty strings of at most {MAX_TAG_LEN} characters")
    if len(tags) > MAX_TAGS:
        raise ServiceError(f"at most {MAX_TAGS} tags")
    meta = payload.get("meta", {})
    if not isinstance(meta, dict):
        raise ServiceError("meta must be an object of string values")
    if len(meta) > MAX_META:
        raise ServiceError(f"meta holds at most {MAX_META} keys, got {len(meta)}")
    for k, v in meta.items():
        if not isinstance(k, str) or not META_KEY_RE.match(k):
            raise ServiceError(f"invalid meta key {k!r}: 1-128 of letters, digits, '_' and '-'")
        if not isinstance(v, str) or len(v) > MAX_META_VALUE:
            raise ServiceError(f"meta value for {k!r} must be a string of at most {MAX_META_VALUE} characters")
    protocol = payload.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        raise ServiceError(f"protocol must be tcp or http, got {shown(protocol)}")
    if protocol != "tcp" and len(meta) >= MAX_META:
        raise ServiceError(f"an http service holds at most {MAX_META - 1} meta keys (the protocol takes one)")
    check = None
    raw_check = payload.get("check")
    if raw_check is not None:
        if not isinstance(raw_check, dict):
            raise ServiceError("check must be an object with type and target")
        from agent.health import CheckSpec  # the check machinery loads with the first check

        try:
            check = CheckSpec.from_dict(raw_check)
        except ValueError as exc:
            raise ServiceError(f"invalid check: {exc}") from None
        if check.type == "exec" and not script_checks:
            raise ServiceError(SCRIPT_CHECKS_OFF, 403, "script_checks")
    return Registration(iid, name, address, port, list(tags), dict(meta), check, source, protocol)


def effective_protocol(declared: str | None, registered: set[str]) -> tuple[str | None, str | None]:
    """A service's protocol, and the disagreement to show when there is one.

    The mesh-wide service-defaults entry decides when it names a protocol
    (issue 27: that is where a service's protocol lives); otherwise the
    registrations do, when they agree.  Instances that disagree are carried
    as tcp, which carries anything, until they agree or an entry decides:
    the conflict is shown (``services``, ``routes``), never silently resolved.
    None while nothing says (no entry, no instance registered).
    """
    if declared is not None:
        if registered - {declared}:
            return declared, (f"service-defaults says {declared}, instances are registered as "
                              f"{' and '.join(sorted(registered))}: {declared} is used")
        return declared, None
    if len(registered) > 1:
        return "tcp", "instances are registered as both http and tcp: carried as tcp until they agree"
    return (next(iter(registered)) if registered else None), None


def instance_protocol(meta: tuple[tuple[str, str], ...]) -> str:
    for k, v in meta:
        if k == PROTOCOL_META:
            return v if v in PROTOCOLS else "tcp"
    return "tcp"


class LocalServices:
    def __init__(self, node: str, default_address: str, data_dir: Path | None,
                 registry: Registry, membership: Membership, on_change: Callable[[], None],
                 script_checks: bool = False) -> None:
        self.node = node
        #: A service's protocol as its mesh-wide service-defaults entry names it, or None (set by the agent).
        self.declared_protocol: Callable[[str], str | None] = lambda service: None
        #: Whether run-time (API) registrations may carry exec checks (--enable-script-checks).
        self.script_checks = script_checks
        #: Stored run-time registrations not loaded (an exec check while script checks are off):
        #: written back with every save, so that turning the setting on again brings them back.
        self._held: list[dict[str, Any]] = []
        self.default_address = default_address
        self.data_dir = data_dir
        self.registry = registry
        self.membership = membership
        self._on_change = on_change
        self.registrations: dict[str, Registration] = {}
        self.runners: dict[str, CheckRunner] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self.log = log.get("mesh.services").bind(node=node)
        self.saver = store.Saver(None if data_dir is None else data_dir / STORE_FILE, self.log)
        #: Woken on every change that may alter a discovery answer.
        self.changed = trio.Event()
        self._view_hashes: dict[str, bytes] = {}
        self._view_index: dict[str, int] = {}
        self._index = 0

    # -- lifecycle ------------------------------------------------------------------------

    def load(self, config_services: list[dict[str, Any]]) -> None:
        """Register the config file's services and the persisted run-time ones.

        Called before the nursery exists; checks start in ``start()``.
        """
        for raw in config_services:
            reg = validate(raw, self.node, self.default_address, source="config")
            self._add(reg)
        stored_version = 0
        for raw in self._read_store():
            if raw.get("version") is not None:
                stored_version = int(raw["version"])
                continue
            try:
                reg = validate(raw, self.node, self.default_address, script_checks=self.script_checks)
            except ServiceError as exc:
                if exc.reason == "script_checks":
                    self._held.append(raw)
                    self.log.error("stored_service_held", id=raw.get("id"), detail=str(exc))
                else:
                    self.log.error("stored_service_invalid", detail=str(exc))
                continue
            if reg.id not in self.registrations:
                self._add(reg)
        # Start counting past anything peers may remember from our last run.
        self.registry.start_after(stored_version)

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        for iid in self.registrations:
            self._start_check(iid)

    # -- writes -----------------------------------------------------------------------------

    def register(self, payload: Any) -> Registration:
        reg = validate(payload, self.node, self.default_address, script_checks=self.script_checks)
        if reg.id in self.registrations:
            raise ServiceError(f"an instance with id {reg.id!r} is already registered on this agent; "
                               "deregister it first or pick another id", 409)
        self._persist([*self.registrations.values(), reg], next_version=True)
        self._add(reg)
        self._start_check(reg.id)
        self.log.info("service_registered", id=reg.id, service=reg.name, port=reg.port,
                      check=reg.check.type if reg.check else None)
        self._changed()
        return reg

    def deregister(self, iid: str) -> Registration:
        if iid not in self.registrations:
            raise ServiceError(f"no instance with id {shown(iid)} on this agent", 404)
        self._persist([r for r in self.registrations.values() if r.id != iid], next_version=True)
        reg = self.registrations.pop(iid)
        scope = self._scopes.pop(iid, None)
        if scope is not None:
            scope.cancel()
        self.runners.pop(iid, None)
        self.registry.remove(iid)
        self.log.info("service_deregistered", id=iid, service=reg.name)
        self._changed()
        return reg

    def _add(self, reg: Registration) -> None:
        self.registrations[reg.id] = reg
        health = "passing" if reg.check is None else "critical"
        meta = dict(reg.meta)
        if reg.protocol != "tcp":
            meta[PROTOCOL_META] = reg.protocol
        self.registry.put(Instance(reg.id, reg.name, reg.address, reg.port, tuple(reg.tags),
                                   tuple(sorted(meta.items())), health))

    def _start_check(self, iid: str) -> None:
        reg = self.registrations[iid]
        if reg.check is None or self._nursery is None or iid in self._scopes:
            return

        def on_change(health: str, output: str) -> None:
            if self.registry.set_health(iid, health, output):
                self.log.info("health_changed", id=iid, service=reg.name, health=health, output=output)
                self._changed()

        from agent.health import CheckRunner

        runner = CheckRunner(reg.check, on_change)
        scope = trio.CancelScope()
        self._scopes[iid] = scope
        self.runners[iid] = runner

        async def run() -> None:
            with scope:
                await runner.run()

        self._nursery.start_soon(run)

    def _changed(self) -> None:
        self.membership.state_changed()
        self.notify()
        self._on_change()

    def notify(self) -> None:
        """Something discovery shows may have changed (registry or membership)."""
        self.changed.set()
        self.changed = trio.Event()

    # -- persistence -------------------------------------------------------------------------

    def _store_path(self) -> Path | None:
        return None if self.data_dir is None else self.data_dir / STORE_FILE

    def _read_store(self) -> list[dict[str, Any]]:
        path = self._store_path()
        data = store.read_json(path, self.log, "service_store_unreadable")
        if data is None:
            return []
        if not isinstance(data, dict) or not isinstance(data.get("services"), list):
            self.log.error("service_store_unreadable", path=str(path), error="unexpected shape")
            return []
        out: list[dict[str, Any]] = [s for s in data["services"] if isinstance(s, dict)]
        if isinstance(data.get("version"), int):
            out.append({"version": data["version"]})
        return out

    def _persist(self, registrations: Iterable[Registration], next_version: bool = False) -> None:
        """Save ``registrations`` (the state about to be applied); StoreError when it cannot be.

        ``next_version`` stores the version the change will bring, so that a
        restart counts past it.
        """
        regs = list(registrations)
        ids = {r.id for r in regs}
        body = {
            "version": self.registry.local.version + (1 if next_version else 0),
            "services": [r.to_dict() for r in regs if r.source == "api"]
            + [h for h in self._held if h.get("id") not in ids],
        }
        self.saver.save(body)

    # -- discovery views ----------------------------------------------------------------------

    def _node_status(self, node: str) -> Status | None:
        m = self.membership.members.get(node)
        return None if m is None else m.status

    def instances(self, service: str | None = None, passing_only: bool = False) -> list[dict[str, Any]]:
        out = []
        for node, inst in self.registry.all_instances():
            if service is not None and inst.service != service:
                continue
            status = self._node_status(node)
            if status is None or not status.up:
                continue  # dead or departed: out of discovery until it returns
            if passing_only and inst.health != "passing":
                continue
            out.append({
                "id": inst.id,
                "service": inst.service,
                "node": node,
                "address": format_addr((inst.address, inst.port)),
                "tags": list(inst.tags),
                "meta": {k: v for k, v in inst.meta if k != PROTOCOL_META},
                "protocol": instance_protocol(inst.meta),
                "health": inst.health,
                "output": inst.output,
                "node_status": status.value,
            })
        out.sort(key=lambda d: (d["service"], d["node"], d["id"]))
        return out

    def services(self) -> list[dict[str, Any]]:
        counts: dict[str, list[int]] = {}
        protocols: dict[str, set[str]] = {}
        for inst in self.instances():
            c = counts.setdefault(inst["service"], [0, 0])
            c[0] += 1
            c[1] += inst["health"] == "passing"
            protocols.setdefault(inst["service"], set()).add(inst["protocol"])
        out = []
        for n, c in sorted(counts.items()):
            protocol, conflict = effective_protocol(self.declared_protocol(n), protocols[n])
            row: dict[str, Any] = {"name": n, "instances": c[0], "passing": c[1], "protocol": protocol}
            if conflict is not None:
                row["protocol_conflict"] = conflict
            out.append(row)
        return out

    def protocol_of(self, service: str) -> tuple[str | None, str | None]:
        """The protocol the mesh carries ``service`` with, and any disagreement about it."""
        registered = {instance_protocol(inst.meta) for _, inst in self.registry.all_instances()
                      if inst.service == service}
        return effective_protocol(self.declared_protocol(service), registered)

    def indexed(self, key: str, view: Any) -> int:
        """The index of ``view`` under ``key``: it grows whenever the view changes."""
        digest = hashlib.blake2b(json.dumps(view, sort_keys=True).encode(), digest_size=16).digest()
        if self._view_hashes.get(key) != digest:
            self._index += 1
            self._view_hashes[key] = digest
            self._view_index[key] = self._index
        return self._view_index[key]
