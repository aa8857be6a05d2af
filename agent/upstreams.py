"""Upstreams: local ports on this agent that lead to a service anywhere in the mesh.

Configured in the file (``[[upstream]]``), or at run time through the API and
CLI; run-time ones are written under --data-dir so a restart keeps them.  An
upstream may name the local service it calls on behalf of (``source``): the
receiving agents judge its connections by their intentions for that service.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import log, store
from agent.durations import parse_duration
from agent.peercred import is_loopback
from agent.services import SERVICE_NAME_RE, ServiceError, shown
from dataplane.balancer import POLICIES
from dataplane.http_options import DEFAULT_TIMEOUT, MAX_RETRIES_LIMIT, HttpOptions
from dataplane.outlier import OutlierConfig
from dataplane.proxy import CONNECT_TIMEOUT, IDLE_TIMEOUT, Proxy, ProxyError, UpstreamExists, UpstreamOptions
from dataplane.routing import CLOSED_BEFORE_REPLY, RESET_BEFORE_REPLY, RoutingOptions
from gossip.wire import format_addr, parse_addr

STORE_FILE = "upstreams.json"


#: How a service is called, settable per upstream and, for every upstream of a service, by its
#: service-defaults entry (agent/entry_kinds.py).
TUNABLE_FIELDS = ("connect_timeout", "idle_timeout", "lb", "max_connections", "max_pending", "consecutive_failures",
                  "base_ejection_time", "max_ejection_percent", "slow_start_window",
                  # http services only (dataplane.http_options): per request.
                  "timeout", "retry_on", "max_retries")
FIELDS = ("service", "listen", "public", "source", *TUNABLE_FIELDS)
#: Integer settings: (name, lowest, highest).
_INT_FIELDS = (("max_connections", 1, 1_000_000), ("max_pending", 1, 1_000_000), ("consecutive_failures", 1, 1000))
_DEFAULT_ROUTING = RoutingOptions()
_DEFAULT_OUTLIER = OutlierConfig()
#: Bounds a user may set: a connect timeout must end, an idle timeout may be 0 (off).
MAX_CONNECT_TIMEOUT = 300.0
MAX_IDLE_TIMEOUT = 7 * 24 * 3600.0
MAX_REQUEST_TIMEOUT = 24 * 3600.0
_DEFAULT_HTTP = HttpOptions()


@dataclass(frozen=True)
class UpstreamSpec:
    service: str
    listen: tuple[str, int]
    options: UpstreamOptions = UpstreamOptions()
    #: The operator's opt-in to a listener other hosts can reach (see validate).
    public: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The stored and shown form: optional fields only when set away from the default."""
        d: dict[str, Any] = {"service": self.service, "listen": format_addr(self.listen)}
        if self.public:
            d["public"] = True
        d.update(options_dict(self.options))
        return d


def options_dict(options: UpstreamOptions) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if options.source is not None:
        d["source"] = options.source
    if options.connect_timeout != CONNECT_TIMEOUT:
        d["connect_timeout"] = options.connect_timeout
    if options.idle_timeout != IDLE_TIMEOUT:
        d["idle_timeout"] = options.idle_timeout
    h = options.http
    if h.timeout != _DEFAULT_HTTP.timeout:
        d["timeout"] = h.timeout
    if h.retry_on != _DEFAULT_HTTP.retry_on:
        d["retry_on"] = list(h.retry_on)
    if h.max_retries != _DEFAULT_HTTP.max_retries:
        d["max_retries"] = h.max_retries
    r, o = options.routing, options.routing.outlier
    for name, value, default in (
        ("lb", r.lb, _DEFAULT_ROUTING.lb),
        ("max_connections", r.max_connections, _DEFAULT_ROUTING.max_connections),
        ("max_pending", r.max_pending, _DEFAULT_ROUTING.max_pending),
        ("consecutive_failures", o.consecutive_failures, _DEFAULT_OUTLIER.consecutive_failures),
        ("base_ejection_time", o.base_ejection_time, _DEFAULT_OUTLIER.base_ejection_time),
        ("max_ejection_percent", o.max_ejection_percent, _DEFAULT_OUTLIER.max_ejection_percent),
        ("slow_start_window", o.slow_start_window, _DEFAULT_OUTLIER.slow_start_window),
    ):
        if value != default:
            d[name] = value
    return d


def _routing(payload: dict[str, Any]) -> RoutingOptions:
    lb = payload.get("lb", _DEFAULT_ROUTING.lb)
    if lb not in POLICIES:
        raise ServiceError(f"lb must be one of {', '.join(sorted(POLICIES))}, got {shown(lb)}")
    ints: dict[str, int] = {}
    for name, low, high in _INT_FIELDS:
        raw = payload.get(name)
        if raw is None:
            continue
        if type(raw) is not int or not low <= raw <= high:
            raise ServiceError(f"{name} must be a whole number from {low} to {high}, got {shown(raw)}")
        ints[name] = raw
    percent = payload.get("max_ejection_percent", _DEFAULT_OUTLIER.max_ejection_percent)
    if type(percent) not in (int, float) or not 0 <= percent <= 100:
        raise ServiceError(f"max_ejection_percent must be a number from 0 to 100, got {shown(percent)}")
    base = _duration(payload, "base_ejection_time", _DEFAULT_OUTLIER.base_ejection_time, 3600.0, zero_ok=False)
    outlier = OutlierConfig(
        consecutive_failures=ints.get("consecutive_failures", _DEFAULT_OUTLIER.consecutive_failures),
        base_ejection_time=base,
        max_ejection_time=max(_DEFAULT_OUTLIER.max_ejection_time, base),
        max_ejection_percent=float(percent),
        slow_start_window=_duration(payload, "slow_start_window", _DEFAULT_OUTLIER.slow_start_window,
                                    3600.0, zero_ok=True),
    )
    return RoutingOptions(lb=lb, max_connections=ints.get("max_connections", _DEFAULT_ROUTING.max_connections),
                          max_pending=ints.get("max_pending", _DEFAULT_ROUTING.max_pending), outlier=outlier)


def _duration(payload: dict[str, Any], name: str, default: float, high: float, zero_ok: bool) -> float:
    raw = payload.get(name)
    if raw is None:
        return default
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise ServiceError(f"{name}: {exc}") from None
    if value > high or (value == 0 and not zero_ok):
        low = "0 (off)" if zero_ok else "above 0"
        raise ServiceError(f"{name} must be {low} and at most {high:g}s, got {shown(raw)}")
    return value


def _http(payload: dict[str, Any]) -> HttpOptions:
    timeout = _duration(payload, "timeout", DEFAULT_TIMEOUT, MAX_REQUEST_TIMEOUT, zero_ok=True)
    retry_on = payload.get("retry_on", list(_DEFAULT_HTTP.retry_on))
    if isinstance(retry_on, str):  # "502,503" from a flag or a config file
        try:
            retry_on = [int(x) for x in retry_on.replace(" ", "").split(",") if x]
        except ValueError:
            raise ServiceError(f"retry_on must be a list of 5xx status codes, got {shown(retry_on)}") from None
    if (not isinstance(retry_on, list) or len(retry_on) > 100
            or not all(type(x) is int and 500 <= x <= 599 for x in retry_on)):
        raise ServiceError(f"retry_on must be a list of 5xx status codes, got {shown(retry_on)}")
    retries = payload.get("max_retries", _DEFAULT_HTTP.max_retries)
    if type(retries) is not int or not 0 <= retries <= MAX_RETRIES_LIMIT:
        raise ServiceError(f"max_retries must be a whole number from 0 to {MAX_RETRIES_LIMIT}, got {shown(retries)}")
    return HttpOptions(timeout=timeout, retry_on=tuple(sorted(set(retry_on))), max_retries=retries)


def check_tunables(payload: dict[str, Any]) -> None:
    """Raise ServiceError unless the TUNABLE_FIELDS ``payload`` sets are valid."""
    _duration(payload, "connect_timeout", CONNECT_TIMEOUT, MAX_CONNECT_TIMEOUT, zero_ok=False)
    _duration(payload, "idle_timeout", IDLE_TIMEOUT, MAX_IDLE_TIMEOUT, zero_ok=True)
    _routing(payload)
    _http(payload)


def validate(payload: Any) -> UpstreamSpec:
    if not isinstance(payload, dict):
        raise ServiceError("an upstream must be an object with service and listen")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise ServiceError(f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(FIELDS))})")
    service = payload.get("service")
    if not isinstance(service, str) or not SERVICE_NAME_RE.match(service):
        raise ServiceError(f"invalid service name {shown(service)}: use a DNS label")
    listen = payload.get("listen")
    if not isinstance(listen, str):
        raise ServiceError("listen must be a host:port string")
    try:
        addr = parse_addr(listen)
    except ValueError as exc:
        raise ServiceError(f"listen: {exc}") from None
    public = payload.get("public", False)
    if not isinstance(public, bool):
        raise ServiceError("public must be true or false")
    # An upstream is an open door into the mesh for whoever reaches its port: off this host only
    # when the operator says so (Consul's local_bind_address defaults to loopback likewise).
    if not public and not is_loopback(addr[0]):
        raise ServiceError(f"listen {format_addr(addr)} is not a loopback address: anyone who reaches it could "
                           f"call {shown(service)} through the mesh. Pass --public (field \"public\": "
                           "true) to allow it", 403, "public_listen")
    source = payload.get("source")
    if source is not None and (not isinstance(source, str) or not SERVICE_NAME_RE.match(source)):
        raise ServiceError(f"invalid source {shown(source)}: the name of a service registered on this node")
    options = UpstreamOptions(
        source=source,
        connect_timeout=_duration(payload, "connect_timeout", CONNECT_TIMEOUT, MAX_CONNECT_TIMEOUT, zero_ok=False),
        idle_timeout=_duration(payload, "idle_timeout", IDLE_TIMEOUT, MAX_IDLE_TIMEOUT, zero_ok=True),
        routing=_routing(payload),
        http=_http(payload),
    )
    return UpstreamSpec(service, addr, options, public)


class Upstreams:
    """The upstream listeners, each with its own settings over its service's service-defaults entry.

    A field an upstream sets is its own; every other tunable comes from the
    mesh-wide ``service-defaults`` entry of its service (when there is one),
    and follows that entry when it changes.
    """

    def __init__(self, proxy: Proxy, data_dir: Path | None, node: str,
                 defaults: Callable[[str], dict[str, Any] | None] = lambda service: None) -> None:
        self.proxy = proxy
        self.data_dir = data_dir
        #: ``defaults(service)``: the service-defaults entry's body, or None.
        self.defaults = defaults
        #: Each upstream as the operator gave it (what is saved, and what overrides the defaults).
        self.given: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, str] = {}
        #: Upstreams whose listener the operator opened to other hosts.
        self.public: set[str] = set()
        self.log = log.get("mesh.upstreams").bind(node=node)
        self.saver = store.Saver(None if data_dir is None else data_dir / STORE_FILE, self.log)

    async def load(self, config_upstreams: list[dict[str, Any]]) -> None:
        """Open the configured and the persisted upstreams (config errors were caught at start)."""
        for raw in config_upstreams:
            await self._open(raw, self._effective(raw), "config")
        for raw in self._read_store():
            try:
                spec = self._effective(raw)
                if spec.service not in self.proxy.upstreams:
                    await self._open(raw, spec, "api")
            except (ServiceError, ProxyError) as exc:
                self.log.error("stored_upstream_failed", detail=str(exc))

    def _effective(self, given: Any) -> UpstreamSpec:
        """The upstream's own fields over its service's service-defaults (each checked alone first)."""
        spec = validate(given)
        defaults = self.defaults(spec.service)
        if not defaults:
            return spec
        inherited = {k: v for k, v in defaults.items() if k in TUNABLE_FIELDS and k not in given}
        return validate({**given, **inherited}) if inherited else spec

    def defaults_changed(self) -> None:
        """The service-defaults entries may have changed: upstreams that inherit from them follow."""
        for service, given in list(self.given.items()):
            up = self.proxy.upstreams.get(service)
            if up is None:
                continue
            try:
                spec = self._effective(given)
            except ServiceError as exc:
                self.log.error("upstream_defaults_refused", service=service, detail=str(exc))
                continue
            if spec.options != up.options:
                self.proxy.update_options(service, spec.options)
                self.log.info("upstream_defaults_applied", service=service, **options_dict(spec.options))

    async def _open(self, given: Any, spec: UpstreamSpec, origin: str) -> None:
        await self.proxy.add_upstream(spec.service, spec.listen, spec.options)
        self.given[spec.service] = dict(given)
        self.sources[spec.service] = origin
        if spec.public:
            self.public.add(spec.service)
            self.log.warning("upstream_public", service=spec.service, listen=format_addr(spec.listen),
                             detail="reachable from other hosts: anyone who reaches it can call the service")
        self.log.info("upstream_added", **spec.to_dict())

    async def add(self, payload: Any) -> dict[str, Any]:
        spec = self._effective(payload)
        try:
            await self._open(payload, spec, "api")
        except UpstreamExists as exc:
            raise ServiceError(str(exc), 409) from None
        except ProxyError as exc:
            raise ServiceError(str(exc), 400) from None
        try:
            self._persist()
        except store.StoreError:
            await self._close(spec.service)  # not saved: not open either
            raise
        return {"ok": True, **spec.to_dict()}

    async def open_unsaved(self, service: str, listen: tuple[str, int], origin: str) -> None:
        """An upstream opened on demand (agent.virtual): not saved, so a restart does not bring it back."""
        raw = {"service": service, "listen": format_addr(listen)}
        await self._open(raw, self._effective(raw), origin)

    async def close_unsaved(self, service: str) -> None:
        await self._close(service)

    async def remove(self, service: str) -> dict[str, Any]:
        if service not in self.proxy.upstreams:
            raise ServiceError(f"no upstream for {shown(service)}", 404)
        self._persist(without=service)
        await self._close(service)
        self.log.info("upstream_removed", service=service)
        return {"ok": True, "service": service}

    async def _close(self, service: str) -> None:
        try:
            await self.proxy.remove_upstream(service)
        except ProxyError as exc:
            raise ServiceError(str(exc), 404) from None
        self.sources.pop(service, None)
        self.given.pop(service, None)
        self.public.discard(service)

    def view(self) -> list[dict[str, Any]]:
        out = []
        for service, up in sorted(self.proxy.upstreams.items()):
            out.append({
                "service": service,
                "listen": format_addr(up.listen),
                "public": service in self.public,
                "instances": len(self.proxy.directory.passing_endpoints(service)),
                "connections": up.stats["connections"],
                "connect_failures": up.stats["connect_failures"] + up.stats["no_instance"] + up.stats["denied"],
                "bytes_out": up.stats["bytes_out"],
                "bytes_in": up.stats["bytes_in"],
                "retried": up.stats["retried"],
                "denied": up.stats["denied"],
                # Of those, refused here before any agent was asked: the mesh-wide rules deny the call.
                "denied_here": up.stats["denied_here"],
                # Refusals by a far agent's intentions (carried on to another agent when one allows),
                # and instances that reset or closed before a byte of answer (outlier failures).
                "refusals": up.stats["refusals"],
                "instance_failures": sum(up.stats[f"instance_{f}"] for f in (RESET_BEFORE_REPLY, CLOSED_BEFORE_REPLY)),
                "idle_timeouts": up.stats["idle_timeouts"],
                "source": up.options.source,
                "connect_timeout": up.options.connect_timeout,
                "idle_timeout": up.options.idle_timeout,
                "lb": up.options.routing.lb,
                "protocol": self.proxy.protocol_of(service),
                # http mode: per request (dataplane.http_proxy).
                "timeout": up.options.http.timeout,
                "retry_on": list(up.options.http.retry_on),
                "max_retries": up.options.http.max_retries,
                "requests": up.stats["http_requests"],
                "retries": up.stats["http_retries"],
                "retry_budget_exhausted": up.stats["http_retry_budget_exhausted"],
                "timeouts": up.stats["http_timeouts"],
                "responses_5xx": up.stats["http_5xx"],
                "mesh_answers": {k[len("http_mesh_"):]: v for k, v in up.stats.items() if k.startswith("http_mesh_")},
                # Of the requests, those carried whole in the reactor's callbacks, and those they began and
                # handed to the request's task (dataplane.http_turns).
                "turns": {"carried": up.stats["http_in_turns"], "handed_over": up.stats["http_handed_over"]},
                "pool": {"idle": up.pool.idle_count(), "opened": up.pool.opened, "reused": up.pool.reused,
                         "stale": up.pool.stale, "expired": up.pool.expired},
                "open": up.router.open,
                "pending": up.router.pending,
                "overflows": up.stats["overflow_max_connections"] + up.stats["overflow_max_pending"],
                "ejections": up.router.outlier.stats["ejections"],
                "outlier": dict(up.router.outlier.stats),
                "balancer": dict(up.router.balancer.stats),
            })
        return out

    def _read_store(self) -> list[dict[str, Any]]:
        path = None if self.data_dir is None else self.data_dir / STORE_FILE
        return store.read_records(path, self.log, "upstream_store_unreadable")

    def _persist(self, without: str | None = None) -> None:
        """Save the run-time upstreams (less ``without``); StoreError when they cannot be saved."""
        body = [validate(self.given[s]).to_dict() for s in self.proxy.upstreams
                if self.sources.get(s) == "api" and s != without]
        self.saver.save(body)
