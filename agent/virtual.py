"""Virtual addresses: ``NAME.virtual.<domain>`` leads an unmodified client through the mesh.

Each service gets a loopback address of its own in 127.64.0.0/10, derived from
its name (so it is the same on every agent and across restarts, unless two
names collide, when the later one takes the next free address).  Linux routes
all of 127.0.0.0/8 to the loopback interface, so listening there needs no
address configured.  The first lookup opens an upstream on that address
through the agent's upstream machinery (agent/upstreams.py), so connections
to it get the mesh's load balancing, encryption, retries and intentions; its
port is the one the service's instances use (the most common one when they
differ).  Such upstreams are not saved: one nobody looked up or connected
through for ``virtual_idle`` seconds is closed, and a later lookup opens it
again.

A service that already has an upstream configured by hand keeps it: its
virtual name answers with that upstream's address instead (its port is the
one configured).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from agent.peercred import is_loopback
from agent.services import ServiceError
from gossip.wire import format_addr

if TYPE_CHECKING:
    from agent.upstreams import Upstreams
    from dataplane.proxy import UpstreamListener

VIRTUAL_NET = ipaddress.ip_network("127.64.0.0/10")
#: After a failed open, lookups answer SERVFAIL for this long before trying again.
RETRY_AFTER = 5.0


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass
class _Opened:
    address: str
    port: int
    last_used: float
    connections: int = 0


class VirtualUpstreams:
    def __init__(self, listeners: Callable[[], Mapping[str, UpstreamListener]],
                 upstreams: Callable[[], Awaitable[Upstreams]], port_for: Callable[[str], int | None], idle: float,
                 logger: Any) -> None:
        #: The open upstreams by service, and the upstream machinery (loading the data plane when it is not yet:
        #: a DNS lookup of a virtual name is a first use of it, agent/plane.py).
        self.listeners = listeners
        self.upstreams = upstreams
        self.port_for = port_for
        self.idle = idle
        self.log = logger
        self._address: dict[str, str] = {}
        self._owner: dict[str, str] = {}
        self.opened: dict[str, _Opened] = {}
        self._opening: dict[str, trio.Event] = {}
        self._failed: dict[str, float] = {}
        self.stats: Counter[str] = Counter()

    def address_for(self, service: str) -> str:
        hand = self.listeners().get(service)
        if hand is not None and service not in self.opened:
            host = hand.listen[0]
            return host if is_loopback(host) and ":" not in host else "127.0.0.1"
        address = self._address.get(service)
        if address is not None:
            return address
        size = VIRTUAL_NET.num_addresses
        n = stable_hash(service)
        for attempt in range(64):
            offset = (n + attempt) % size
            if offset & 0xFF in (0, 255):
                continue  # no .0 or .255: some tools treat them as network or broadcast addresses
            candidate = str(VIRTUAL_NET.network_address + offset)
            if candidate not in self._owner:
                break
        self._owner[candidate] = service
        self._address[service] = candidate
        return candidate

    def ready(self, service: str) -> bool:
        """Whether lookups can be answered at once (and note the lookup, which keeps it open)."""
        opened = self.opened.get(service)
        if opened is not None:
            if service in self.listeners():
                opened.last_used = trio.current_time()
                return True
            del self.opened[service]  # removed through the API
        return service in self.listeners()

    async def ensure(self, service: str) -> bool:
        """Open the service's virtual upstream unless it is open; False when it cannot be."""
        if self.ready(service):
            return True
        opening = self._opening.get(service)
        if opening is not None:
            await opening.wait()
            return self.ready(service)
        now = trio.current_time()
        if now - self._failed.get(service, -RETRY_AFTER) < RETRY_AFTER:
            return False
        done = self._opening[service] = trio.Event()
        try:
            return await self._open(service, now)
        finally:
            done.set()
            del self._opening[service]

    async def _open(self, service: str, now: float) -> bool:
        port = self.port_for(service)
        address = self.address_for(service)
        if port is None:
            self._failed[service] = now
            return False
        from agent.runner import PlaneUnavailable

        try:
            upstreams = await self.upstreams()
        except PlaneUnavailable as exc:
            return self._could_not_open(service, address, port, now, exc)
        from dataplane.proxy import ProxyError, UpstreamExists  # loaded with the upstreams above

        try:
            await upstreams.open_unsaved(service, (address, port), "dns")
        except UpstreamExists:
            return True  # opened by hand meanwhile
        except (ProxyError, ServiceError) as exc:
            return self._could_not_open(service, address, port, now, exc)
        self.opened[service] = _Opened(address, port, now)
        self.stats["opened"] += 1
        self.log.info("virtual_upstream_opened", service=service, listen=format_addr((address, port)))
        return True

    def _could_not_open(self, service: str, address: str, port: int, now: float, exc: Exception) -> bool:
        """Count and log a virtual upstream that could not be opened; lookups wait RETRY_AFTER to try again."""
        self._failed[service] = now
        self.stats["failed"] += 1
        self.log.warning("virtual_upstream_failed", service=service, listen=format_addr((address, port)),
                         detail=str(exc))
        return False

    async def reap_loop(self) -> None:
        while True:
            await trio.sleep(max(0.5, min(self.idle / 4, 30.0)))
            await self.reap()

    async def reap(self) -> None:
        now = trio.current_time()
        for service, opened in list(self.opened.items()):
            up = self.listeners().get(service)
            if up is None:
                del self.opened[service]
                continue
            connections = up.stats["connections"]
            if connections != opened.connections or up.router.open > 0:
                opened.connections = connections
                opened.last_used = now
            if now - opened.last_used < self.idle:
                continue
            del self.opened[service]
            try:
                await (await self.upstreams()).close_unsaved(service)
            except ServiceError:
                continue
            self.stats["reaped"] += 1
            self.log.info("virtual_upstream_closed", service=service, detail=f"unused for {self.idle:g}s")

    def view(self) -> list[dict[str, Any]]:
        return [{"service": s, "listen": format_addr((o.address, o.port))} for s, o in sorted(self.opened.items())]
