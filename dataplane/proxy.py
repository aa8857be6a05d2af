"""The L4 service proxy: local listeners (upstreams) and the far end of streams.

An application connects to an upstream's local port on its own agent; the
proxy picks a passing instance of the service and carries the bytes there --
straight to it when the instance is on this node, otherwise as one stream of
the encrypted tunnel session to the instance's agent, which connects to the
instance and splices.  The far end only ever connects to instances registered
on itself: a peer names an instance id, never an address, so no member can use
another as an open relay.

Failures are loud: when either side breaks mid-stream the other is reset
(TCP RST via SO_LINGER 0), never closed as if the transfer had completed.
"""

from __future__ import annotations

import itertools
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgpack
import trio

from dataplane.tunnel import TunnelError

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 5.0
#: The stream header's first byte, so the tunnel can carry other kinds later.
HEADER_KIND_CONNECT = 1


@dataclass(frozen=True)
class Endpoint:
    node: str
    instance_id: str
    host: str
    port: int


class InstanceDirectory(Protocol):
    """What the proxy reads of the registry: a small read-only view."""

    def passing_endpoints(self, service: str) -> list[Endpoint]: ...

    def local_endpoint(self, instance_id: str) -> Endpoint | None: ...


class TunnelStream(Protocol):
    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


Duplex = trio.abc.HalfCloseableStream | TunnelStream


class TunnelOpener(Protocol):
    async def open_stream(self, peer: str, header: bytes) -> TunnelStream: ...


class ProxyError(Exception):
    """A proxied connection could not be set up; worded for a log line."""


def encode_connect(instance_id: str) -> bytes:
    packed: bytes = msgpack.packb({"id": instance_id}, use_bin_type=True)
    return bytes([HEADER_KIND_CONNECT]) + packed


def decode_connect(header: bytes) -> str:
    if not header or header[0] != HEADER_KIND_CONNECT:
        raise ProxyError("unknown stream kind")
    try:
        obj = msgpack.unpackb(header[1:], raw=False)
    except Exception as exc:
        raise ProxyError("malformed stream header") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        raise ProxyError("malformed stream header")
    iid: str = obj["id"]
    return iid


def _reset(stream: trio.SocketStream) -> None:
    """Abort with RST so the peer sees a failure, not a clean end of stream."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


async def splice(a: Duplex, b: Duplex,
                 stats: Counter[str], on_error: Callable[[], None]) -> None:
    """Copy both directions with half-close; any error tears both down loudly."""
    failed = False

    async def pump(src: Duplex, dst: Duplex, key: str) -> None:
        nonlocal failed
        try:
            while True:
                data = bytes(await src.receive_some(CHUNK))
                if not data:
                    break
                await dst.send_all(data)
                stats[key] += len(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProxyError, EOFError) as exc:
            failed = True
            stats["splice_errors"] += 1
            stats[f"splice_error.{type(exc).__name__}"] += 1
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, "bytes_out")
        nursery.start_soon(pump, b, a, "bytes_in")
    if failed:
        on_error()


class UpstreamListener:
    def __init__(self, service: str, listen: tuple[str, int], listeners: list[trio.SocketListener]) -> None:
        self.service = service
        self.listen = listen
        self.listeners = listeners
        self.scope = trio.CancelScope()
        self.stats: Counter[str] = Counter()


class Proxy:
    def __init__(self, local_node: str, directory: InstanceDirectory, tunnels: TunnelOpener,
                 log: Callable[..., None] | None = None) -> None:
        self.local_node = local_node
        self.directory = directory
        self.tunnels = tunnels
        self.stats: Counter[str] = Counter()
        self.upstreams: dict[str, UpstreamListener] = {}
        self._rr = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._log = log or (lambda *a, **k: None)

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- upstream listeners ----------------------------------------------------------------

    async def add_upstream(self, service: str, listen: tuple[str, int]) -> UpstreamListener:
        if service in self.upstreams:
            raise ProxyError(f"an upstream for {service!r} already exists; remove it first")
        assert self._nursery is not None
        try:
            listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
        except OSError as exc:
            raise ProxyError(f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}") from None
        up = UpstreamListener(service, listen, listeners)
        self.upstreams[service] = up

        async def handler(client: trio.SocketStream) -> None:
            await self._serve_client(up, client)

        async def serve() -> None:
            with up.scope:
                await trio.serve_listeners(handler, listeners)

        self._nursery.start_soon(serve)
        return up

    async def remove_upstream(self, service: str) -> None:
        up = self.upstreams.pop(service, None)
        if up is None:
            raise ProxyError(f"no upstream for {service!r}")
        up.scope.cancel()
        for listener in up.listeners:
            await listener.aclose()

    def pick(self, service: str) -> Endpoint | None:
        """Round robin over passing instances (issue 5 replaces this with P2C + EWMA)."""
        endpoints = self.directory.passing_endpoints(service)
        if not endpoints:
            return None
        return endpoints[next(self._rr) % len(endpoints)]

    async def _serve_client(self, up: UpstreamListener, client: trio.SocketStream) -> None:
        up.stats["connections"] += 1
        endpoint = self.pick(up.service)
        if endpoint is None:
            up.stats["no_instance"] += 1
            self._log("proxy_no_instance", service=up.service)
            _reset(client)
            await trio.aclose_forcefully(client)
            return
        try:
            far = await self._connect(endpoint)
        except (OSError, ProxyError, TunnelError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            up.stats["connect_failures"] += 1
            self._log("proxy_connect_failed", service=up.service, node=endpoint.node,
                      instance=endpoint.instance_id, error=str(exc) or type(exc).__name__)
            _reset(client)
            await trio.aclose_forcefully(client)
            return
        up.stats["connected"] += 1

        def broken() -> None:
            _reset(client)
            if isinstance(far, trio.SocketStream):
                _reset(far)

        try:
            await splice(client, far, up.stats, broken)
        finally:
            await trio.aclose_forcefully(client)
            await _close(far)

    async def _connect(self, endpoint: Endpoint) -> trio.abc.HalfCloseableStream | TunnelStream:
        if endpoint.node == self.local_node:
            with trio.fail_after(CONNECT_TIMEOUT):
                return await trio.open_tcp_stream(endpoint.host, endpoint.port)
        with trio.fail_after(CONNECT_TIMEOUT):
            return await self.tunnels.open_stream(endpoint.node, encode_connect(endpoint.instance_id))

    # -- the far end: a peer opened a stream to one of our instances --------------------------

    async def handle_stream(self, peer: str, header: bytes, stream: TunnelStream) -> None:
        self.stats["streams_in"] += 1
        try:
            iid = decode_connect(header)
            endpoint = self.directory.local_endpoint(iid)
            if endpoint is None:
                raise ProxyError(f"no local instance {iid!r}")
            with trio.fail_after(CONNECT_TIMEOUT):
                conn = await trio.open_tcp_stream(endpoint.host, endpoint.port)
        except (OSError, ProxyError, trio.TooSlowError) as exc:
            self.stats["far_connect_failures"] += 1
            self._log("proxy_far_connect_failed", peer=peer, error=str(exc) or type(exc).__name__)
            await stream.aclose()  # resets the stream: the client sees a failure
            return

        def broken() -> None:
            _reset(conn)

        try:
            await splice(stream, conn, self.stats, broken)
        finally:
            await trio.aclose_forcefully(conn)
            await stream.aclose()


async def _close(s: trio.abc.HalfCloseableStream | TunnelStream) -> None:
    if isinstance(s, trio.abc.AsyncResource):
        await trio.aclose_forcefully(s)
    else:
        with trio.CancelScope(shield=True):
            await s.aclose()


