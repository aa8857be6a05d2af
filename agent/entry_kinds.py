"""The kinds of mesh-wide config entry, and what makes one valid before it spreads.

The kinds are Consul's (``intention``, ``service-defaults``,
``service-resolver``, ``service-splitter``, ``service-router``), with fields
named as this agent's upstreams already name them.  An entry is checked twice
over before it is written: its own fields, and against the entries it refers
to or that refer to it (a subset a splitter names must be defined by the
service's resolver; a router needs an ``http`` service; failover must not loop).
Once written an entry spreads to every node, so a mistake caught here is one
the mesh never has to hold.

Every error names the field and says what would be accepted, in one line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from agent.services import SERVICE_NAME_RE, ServiceError, shown

INTENTION: Final = "intention"
SERVICE_DEFAULTS: Final = "service-defaults"
SERVICE_RESOLVER: Final = "service-resolver"
SERVICE_SPLITTER: Final = "service-splitter"
SERVICE_ROUTER: Final = "service-router"
KINDS: Final = (INTENTION, SERVICE_DEFAULTS, SERVICE_RESOLVER, SERVICE_SPLITTER, SERVICE_ROUTER)

PROTOCOLS: Final = ("tcp", "http")
WILDCARD: Final = "*"
ACTIONS: Final = ("allow", "deny")
MAX_DESCRIPTION: Final = 512
MAX_SUBSETS: Final = 64
MAX_SPLITS: Final = 32
MAX_ROUTES: Final = 128
MAX_FAILOVER: Final = 8
HTTP_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
#: Weights are percentages to two decimals, as Consul's; they must add up to 100 within this.
_WEIGHT_SLACK: Final = 1e-6

#: (kind, name) -> the body of the live entry, or None: what an entry is checked against.
Lookup = Callable[[str, str], dict[str, Any] | None]


def intention_name(source: str, destination: str) -> str:
    """One entry per (source, destination) pair, so edits of different pairs never overwrite each other."""
    return f"{source}/{destination}"


def validate(kind: Any, name: Any, body: Any, lookup: Lookup) -> dict[str, Any]:
    """The entry's body as it will be stored, or ServiceError (400) saying what is wrong."""
    if kind not in KINDS:
        raise ServiceError(f"unknown kind {shown(kind)}: one of {', '.join(KINDS)}")
    if not isinstance(body, dict):
        raise ServiceError(f"a {kind} entry must be an object")
    if kind == INTENTION:
        return _intention(name, body)
    _service_name(name, "name")
    if kind == SERVICE_DEFAULTS:
        return _defaults(name, body, lookup)
    if kind == SERVICE_RESOLVER:
        return _resolver(name, body, lookup)
    if kind == SERVICE_SPLITTER:
        return _splitter(name, body, lookup)
    return _router(name, body, lookup)


def check_delete(kind: str, name: str, lookup: Lookup) -> None:
    """Refuse a delete that would leave another entry pointing at nothing (its subsets, its protocol)."""
    if kind == SERVICE_RESOLVER:
        for other_kind in (SERVICE_SPLITTER, SERVICE_ROUTER):
            other = lookup(other_kind, name)
            if other is not None and _subsets_named(other_kind, name, other).get(name):
                raise ServiceError(f"the {other_kind} of {name} names subsets this resolver defines: "
                                   f"delete or change it first", 409)


def _fields(kind: str, body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ServiceError(f"{kind}: unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})")


def _service_name(value: Any, what: str, wildcard: bool = False) -> str:
    if wildcard and value == WILDCARD:
        return WILDCARD
    if not isinstance(value, str) or not SERVICE_NAME_RE.match(value):
        more = " or *" if wildcard else ""
        raise ServiceError(f"{what}: {shown(value)} is not a service name (a DNS label{more})")
    return value


def _intention(name: Any, body: dict[str, Any]) -> dict[str, Any]:
    _fields(INTENTION, body, ("source", "destination", "action", "description"))
    source = _service_name(body.get("source"), "source", wildcard=True)
    destination = _service_name(body.get("destination"), "destination", wildcard=True)
    if name != intention_name(source, destination):
        raise ServiceError(f"an intention's name is SOURCE/DESTINATION: {intention_name(source, destination)!r}, "
                           f"not {shown(name)}")
    action = body.get("action")
    if action not in ACTIONS:
        raise ServiceError(f"action must be allow or deny, got {shown(action)}")
    out: dict[str, Any] = {"source": source, "destination": destination, "action": action}
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise ServiceError(f"description must be text of at most {MAX_DESCRIPTION} characters")
    if description:
        out["description"] = description
    return out


def _defaults(name: str, body: dict[str, Any], lookup: Lookup) -> dict[str, Any]:
    from agent.upstreams import TUNABLE_FIELDS, check_tunables

    _fields(SERVICE_DEFAULTS, body, ("protocol", *TUNABLE_FIELDS))
    protocol = body.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        raise ServiceError(f"protocol must be tcp or http, got {shown(protocol)}")
    if protocol != "http" and lookup(SERVICE_ROUTER, name) is not None:
        raise ServiceError(f"{name} has a service-router, which needs protocol http: delete the router first", 409)
    check_tunables(body)
    return dict(body)


def _subset_filter(service: str, subset: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ServiceError(f"subset {subset!r} of {service}: an object with tags and/or meta")
    _fields(f"subset {subset!r}", raw, ("tags", "meta"))
    out: dict[str, Any] = {}
    tags = raw.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
            raise ServiceError(f"subset {subset!r}: tags must be a non-empty list of strings")
        out["tags"] = sorted(set(tags))
    meta = raw.get("meta")
    if meta is not None:
        if not isinstance(meta, dict) or not meta or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ServiceError(f"subset {subset!r}: meta must be a non-empty object of strings")
        out["meta"] = dict(meta)
    if not out:
        raise ServiceError(f"subset {subset!r} selects every instance: give it tags or meta")
    return out


def _target(raw: Any, default_service: str, what: str) -> dict[str, str]:
    """A {service, subset} pair, either optional; the service defaults to the entry's own."""
    if not isinstance(raw, dict) or not raw:
        raise ServiceError(f"{what}: an object with service and/or subset")
    _fields(what, raw, ("service", "subset"))
    out = {"service": _service_name(raw.get("service", default_service), f"{what}: service")}
    if "subset" in raw:
        subset = raw["subset"]
        if not isinstance(subset, str) or not SERVICE_NAME_RE.match(subset):
            raise ServiceError(f"{what}: subset {shown(subset)} is not a subset name (a DNS label)")
        out["subset"] = subset
    return out


def _known_subset(target: dict[str, str], lookup: Lookup, resolvers: dict[str, dict[str, Any]], what: str) -> None:
    subset = target.get("subset")
    if subset is None:
        return
    service = target["service"]
    resolver = resolvers.get(service) if service in resolvers else lookup(SERVICE_RESOLVER, service)
    if resolver is None or subset not in resolver.get("subsets", {}):
        raise ServiceError(f"{what}: {service} has no subset {subset!r} (a service-resolver for {service} "
                           "must define it first)")


def _resolver(name: str, body: dict[str, Any], lookup: Lookup) -> dict[str, Any]:
    _fields(SERVICE_RESOLVER, body, ("subsets", "default_subset", "failover"))
    out: dict[str, Any] = {}
    subsets = body.get("subsets", {})
    if not isinstance(subsets, dict) or len(subsets) > MAX_SUBSETS:
        raise ServiceError(f"subsets must be an object of at most {MAX_SUBSETS} named filters")
    out["subsets"] = {}
    for sub, flt in sorted(subsets.items()):
        if not SERVICE_NAME_RE.match(sub):
            raise ServiceError(f"subset name {shown(sub)} is not a DNS label")
        out["subsets"][sub] = _subset_filter(name, sub, flt)
    if "default_subset" in body:
        default = body["default_subset"]
        if default not in out["subsets"]:
            raise ServiceError(f"default_subset {shown(default)} is not one of this resolver's subsets")
        out["default_subset"] = default
    failover = body.get("failover", [])
    if not isinstance(failover, list) or len(failover) > MAX_FAILOVER:
        raise ServiceError(f"failover must be a list of at most {MAX_FAILOVER} targets")
    targets = [_target(t, name, f"failover[{i}]") for i, t in enumerate(failover)]
    resolvers = {name: out}
    for i, t in enumerate(targets):
        if t == {"service": name} or t == {"service": name, "subset": out.get("default_subset", "")}:
            raise ServiceError(f"failover[{i}] is the service itself")
        _known_subset(t, lookup, resolvers, f"failover[{i}]")
    if targets:
        out["failover"] = targets
        _no_failover_loop(name, targets, lookup)
    return out


def _no_failover_loop(start: str, targets: list[dict[str, str]], lookup: Lookup) -> None:
    """Refuse failover that could come back to ``start`` through other services' failover."""
    seen = {start}
    frontier = [t["service"] for t in targets if t["service"] != start]
    while frontier:
        service = frontier.pop()
        if service in seen:
            continue
        seen.add(service)
        other = lookup(SERVICE_RESOLVER, service)
        for t in (other or {}).get("failover", []):
            if t["service"] == start:
                raise ServiceError(f"failover loop: {start} fails over to {service}, which fails over back to {start}")
            frontier.append(t["service"])


def _splitter(name: str, body: dict[str, Any], lookup: Lookup) -> dict[str, Any]:
    _fields(SERVICE_SPLITTER, body, ("splits",))
    splits = body.get("splits")
    if not isinstance(splits, list) or not 1 <= len(splits) <= MAX_SPLITS:
        raise ServiceError(f"splits must be a list of 1 to {MAX_SPLITS} weighted targets")
    out = []
    total = 0.0
    for i, raw in enumerate(splits):
        what = f"splits[{i}]"
        if not isinstance(raw, dict):
            raise ServiceError(f"{what}: an object with weight and service and/or subset")
        weight: Any = raw.get("weight")
        if type(weight) not in (int, float) or not math.isfinite(weight) or not 0 <= weight <= 100:
            raise ServiceError(f"{what}: weight must be a number from 0 to 100, got {shown(weight)}")
        target = _target({k: v for k, v in raw.items() if k != "weight"} or {"service": name}, name, what)
        _known_subset(target, lookup, {}, what)
        total += weight
        out.append({"weight": weight, **target})
    if abs(total - 100) > _WEIGHT_SLACK:
        raise ServiceError(f"the weights of splits add up to {total:g}, not 100")
    return {"splits": out}


def _router(name: str, body: dict[str, Any], lookup: Lookup) -> dict[str, Any]:
    _fields(SERVICE_ROUTER, body, ("routes",))
    defaults = lookup(SERVICE_DEFAULTS, name) or {}
    if defaults.get("protocol", "tcp") != "http":
        raise ServiceError(f"a service-router needs {name} to speak http: write a service-defaults entry "
                           f"with protocol http for {name} first")
    routes = body.get("routes")
    if not isinstance(routes, list) or not 1 <= len(routes) <= MAX_ROUTES:
        raise ServiceError(f"routes must be a list of 1 to {MAX_ROUTES} routes")
    out = []
    for i, raw in enumerate(routes):
        what = f"routes[{i}]"
        if not isinstance(raw, dict):
            raise ServiceError(f"{what}: an object with match and destination")
        _fields(what, raw, ("match", "destination"))
        match = _match(raw.get("match"), what)
        destination = _target(raw.get("destination"), name, f"{what}.destination")
        _known_subset(destination, lookup, {}, f"{what}.destination")
        out.append({"match": match, "destination": destination})
    return {"routes": out}


def _match(raw: Any, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        raise ServiceError(f"{what}.match: an object with path_prefix, header and/or methods")
    _fields(f"{what}.match", raw, ("path_prefix", "header", "methods"))
    out: dict[str, Any] = {}
    if "path_prefix" in raw:
        prefix = raw["path_prefix"]
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise ServiceError(f"{what}.match.path_prefix must start with '/', got {shown(prefix)}")
        out["path_prefix"] = prefix
    if "header" in raw:
        header = raw["header"]
        if not isinstance(header, dict) or set(header) - {"name", "exact", "present"} or "name" not in header:
            raise ServiceError(f"{what}.match.header: an object with name and exact (or present: true)")
        hname = header["name"]
        if not isinstance(hname, str) or not hname or not all(c.isalnum() or c in "-_" for c in hname):
            raise ServiceError(f"{what}.match.header.name {shown(hname)} is not a header name")
        if "exact" in header and not isinstance(header["exact"], str):
            raise ServiceError(f"{what}.match.header.exact must be text")
        if "exact" not in header and header.get("present") is not True:
            raise ServiceError(f"{what}.match.header needs exact or present: true")
        out["header"] = {"name": hname.lower(), **({"exact": header["exact"]} if "exact" in header
                                                   else {"present": True})}
    if "methods" in raw:
        methods = raw["methods"]
        if not isinstance(methods, list) or not methods or not all(m in HTTP_METHODS for m in methods):
            raise ServiceError(f"{what}.match.methods must list some of {', '.join(HTTP_METHODS)}")
        out["methods"] = sorted(set(methods))
    return out


def _subsets_named(kind: str, service: str, body: dict[str, Any]) -> dict[str, set[str]]:
    """service -> the subsets of it that a splitter or router body names."""
    out: dict[str, set[str]] = {}
    items = body.get("splits", []) if kind == SERVICE_SPLITTER else [r["destination"] for r in body.get("routes", [])]
    for t in items:
        if "subset" in t:
            out.setdefault(t.get("service", service), set()).add(t["subset"])
    return out
