"""Upstreams: local ports on this agent that lead to a service anywhere in the mesh.

Configured in the file (``[[upstream]]``), or at run time through the API and
CLI; run-time ones are written under --data-dir so a restart keeps them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent import log
from agent.services import SERVICE_NAME_RE, ServiceError
from dataplane.proxy import Proxy, ProxyError
from gossip.wire import format_addr, parse_addr

STORE_FILE = "upstreams.json"


def validate(payload: Any) -> tuple[str, tuple[str, int]]:
    if not isinstance(payload, dict):
        raise ServiceError("an upstream must be an object with service and listen")
    unknown = sorted(set(payload) - {"service", "listen"})
    if unknown:
        raise ServiceError(f"unknown field {unknown[0]!r} (allowed: listen, service)")
    service = payload.get("service")
    if not isinstance(service, str) or not SERVICE_NAME_RE.match(service):
        raise ServiceError(f"invalid service name {service!r}: use a DNS label")
    listen = payload.get("listen")
    if not isinstance(listen, str):
        raise ServiceError("listen must be a host:port string")
    try:
        addr = parse_addr(listen)
    except ValueError as exc:
        raise ServiceError(f"listen: {exc}") from None
    return service, addr


class Upstreams:
    def __init__(self, proxy: Proxy, data_dir: Path | None, node: str) -> None:
        self.proxy = proxy
        self.data_dir = data_dir
        self.sources: dict[str, str] = {}
        self.log = log.get("mesh.upstreams").bind(node=node)

    async def load(self, config_upstreams: list[dict[str, Any]]) -> None:
        """Open the configured and the persisted upstreams (config errors were caught at start)."""
        for raw in config_upstreams:
            service, addr = validate(raw)
            await self._open(service, addr, "config")
        for raw in self._read_store():
            try:
                service, addr = validate(raw)
                if service not in self.proxy.upstreams:
                    await self._open(service, addr, "api")
            except (ServiceError, ProxyError) as exc:
                self.log.error("stored_upstream_failed", detail=str(exc))

    async def _open(self, service: str, addr: tuple[str, int], source: str) -> None:
        await self.proxy.add_upstream(service, addr)
        self.sources[service] = source
        self.log.info("upstream_added", service=service, listen=format_addr(addr))

    async def add(self, payload: Any) -> dict[str, Any]:
        service, addr = validate(payload)
        try:
            await self._open(service, addr, "api")
        except ProxyError as exc:
            raise ServiceError(str(exc), 409 if "already exists" in str(exc) else 400) from None
        self._persist()
        return {"ok": True, "service": service, "listen": format_addr(addr)}

    async def remove(self, service: str) -> dict[str, Any]:
        try:
            await self.proxy.remove_upstream(service)
        except ProxyError as exc:
            raise ServiceError(str(exc), 404) from None
        self.sources.pop(service, None)
        self._persist()
        self.log.info("upstream_removed", service=service)
        return {"ok": True, "service": service}

    def view(self) -> list[dict[str, Any]]:
        out = []
        for service, up in sorted(self.proxy.upstreams.items()):
            out.append({
                "service": service,
                "listen": format_addr(up.listen),
                "instances": len(self.proxy.directory.passing_endpoints(service)),
                "connections": up.stats["connections"],
                "connect_failures": up.stats["connect_failures"] + up.stats["no_instance"],
                "bytes_out": up.stats["bytes_out"],
                "bytes_in": up.stats["bytes_in"],
            })
        return out

    def _read_store(self) -> list[dict[str, Any]]:
        if self.data_dir is None or not (self.data_dir / STORE_FILE).exists():
            return []
        try:
            data = json.loads((self.data_dir / STORE_FILE).read_text())
        except (OSError, ValueError) as exc:
            self.log.error("upstream_store_unreadable", error=str(exc))
            return []
        return [u for u in data if isinstance(u, dict)] if isinstance(data, list) else []

    def _persist(self) -> None:
        if self.data_dir is None:
            return
        body = [{"service": s, "listen": format_addr(up.listen)} for s, up in self.proxy.upstreams.items()
                if self.sources.get(s) == "api"]
        path = self.data_dir / STORE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))  # compact: indent= makes json use its slow pure-Python encoder
        os.replace(tmp, path)
