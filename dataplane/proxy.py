"""The L4 service proxy: local listeners (upstreams) and the far end of streams.

(Over 700 lines because the near end's retries and the far end's status byte
are the two halves of one protocol, and each is only checked against the other.)

An application connects to an upstream's local port on its own agent; the
proxy picks a passing instance of the service and carries the bytes there --
straight to it when the instance is on this node, otherwise as one stream of
the encrypted tunnel session to the instance's agent, which connects to the
instance and splices.  The far end only ever connects to instances registered
on itself: a peer names an instance id, never an address, so no member can use
another as an open relay.

The far end answers every stream with one status byte before any payload:
connected, denied (an intention refuses the caller), or unavailable (no such
instance, or it could not be reached), and it forwards nothing to the
instance before it has answered "connected".  So an attempt answered
"unavailable" or "denied" is known to have reached no instance and is retried
on another passing instance without the client noticing (at most MAX_ATTEMPTS
failures; a denial rules out every instance on that agent, whose intentions
are the same for all of them, and the router remembers it: see
dataplane.routing).  The client is reset only when no instance is left that
could take it.  The client's first bytes (up to EARLY_MAX) travel with the
open rather than after the answer, so the status costs no round trip; a copy
is kept to replay on the next instance.

Once connected, the client's bytes have reached the instance, so a failure
resets the client rather than risk delivering a request twice; if it came
from the instance's side before its first byte of answer (a reset, or a close
while the client was still sending), the router counts it against the
instance (:func:`splice` says which side ended how).

Who may call is decided here, on the receiving side, by an :class:`Authorizer`
(agent/intentions.py) from the tunnel's authenticated node name and the source
service the open header names; refused streams never reach the instance.

Failures are loud: when either side breaks mid-stream, or a connection is idle
for longer than its idle timeout, the other side is reset (TCP RST via
SO_LINGER 0), never closed as if the transfer had completed.
"""

from __future__ import annotations

import errno
import math
import os
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

import msgpack
import trio

from dataplane import routing
from dataplane.discovery_chain import ChainSource, DiscoveryChain, Target
from dataplane.endpoint import Endpoint as Endpoint  # re-exported: the data plane names it from here
from dataplane.http_options import HttpOptions
from dataplane.http_pool import IDLE_TIMEOUT as POOL_IDLE_TIMEOUT
from dataplane.http_pool import InstanceConn, Kept, Pool
from dataplane.observed import INBOUND, NoSink, RequestRecord, RequestSink
from dataplane.rawsocket import RawSocketStream, SocketPump, connect_tcp
from dataplane.retry_budget import RetryBudget
from dataplane.routing import Attempt, PathView, Router, RoutingOptions
from dataplane.stream import TunnelStream
from dataplane.tunnel import DialAbandoned, StreamResetError, TunnelError

#: Bytes read from a client or instance socket at a time: fewer, larger reads
#: and tunnel records per byte (see mux.DEFAULT_MAX_RECORD).
CHUNK = 256 * 1024
#: How often per idle_timeout the splice watchdog looks for activity.
_IDLE_LOOKS = 8
#: Defaults per upstream: connecting (tunnel stream and far-end TCP connect), and
#: silence in both directions before a proxied connection is reset (Envoy's stream idle default).
CONNECT_TIMEOUT = 5.0
IDLE_TIMEOUT = 3600.0
#: A peer's header may ask for at most this connect timeout.
MAX_CONNECT_TIMEOUT = 300.0
#: Accept errors that mean "too many connections for now" (trio.serve_listeners'
#: list and pause): the listener pauses, then goes on.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_PAUSE: Final = 0.1
#: Instances tried per client connection before it is given up.
MAX_ATTEMPTS = 3
#: Client bytes forwarded (and kept for a retry) before the far end has answered.
EARLY_MAX = 64 * 1024
#: The share of an upstream's connect timeout the far agent is given to connect its instance.
FAR_CONNECT_SHARE = 0.8
#: The stream header's first byte, so the tunnel can carry other kinds later.
#: Kind 1 (no status byte) is retired: an agent that speaks only it refuses
#: kind 2 as unknown, a loud failure rather than a misread first byte.
HEADER_KIND_CONNECT = 2
#: A caller-side refusal is logged at most this often per upstream (counted always).
DENIED_LOG_EVERY = 10.0
#: The far end's first byte on a connect stream.
STATUS_OK = 0
STATUS_DENIED = 1
STATUS_UNAVAILABLE = 2



@dataclass(frozen=True)
class UpstreamOptions:
    #: The local service on whose behalf connections are made (None: anonymous).
    source: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    #: 0 disables the idle timeout.
    idle_timeout: float = IDLE_TIMEOUT
    #: Balancing policy, circuit-breaker limits and outlier detection.
    routing: RoutingOptions = field(default_factory=RoutingOptions)
    #: Per request, when the service speaks http: timeout and retries.
    http: HttpOptions = field(default_factory=HttpOptions)


@dataclass(frozen=True)
class ConnectRequest:
    instance_id: str
    source: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    #: The caller speaks HTTP on this stream: the far end watches the exchanges for its inbound figures.
    http: bool = False


class InstanceDirectory(Protocol):
    """What the proxy reads of the registry: a small read-only view."""

    def passing_endpoints(self, service: str) -> list[Endpoint]: ...

    def local_endpoint(self, instance_id: str) -> Endpoint | None: ...


class Verdict(Protocol):
    @property
    def allowed(self) -> bool: ...

    @property
    def reason(self) -> str: ...


class Authorizer(Protocol):
    """Decides whether ``source`` on authenticated ``node`` may reach ``destination``."""

    def authorize(self, node: str, source: str | None, destination: str) -> Verdict: ...


@dataclass(frozen=True)
class _Allowed:
    allowed: bool = True
    reason: str = "default"


class _AllowAll:
    def authorize(self, node: str, source: str | None, destination: str) -> Verdict:
        return _Allowed()


class PeerStream(Protocol):
    """What the proxy needs of a stream to another agent (dataplane.stream.TunnelStream is one).

    One that is also a :class:`~dataplane.rawsocket.SocketPump` is spliced to
    raw sockets by its own fast paths.
    """

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


Duplex = trio.abc.HalfCloseableStream | PeerStream


class TunnelOpener(Protocol):
    """``alternative()``, asked only when a new tunnel must be dialled: whether the caller has another
    instance elsewhere to try; then it waits for the tunnel only as long as the peer's RTT says an answer
    takes (dataplane.tunnel.TunnelManager.open_stream)."""

    async def open_stream(self, peer: str, header: bytes, *,
                          alternative: Callable[[], bool] | None = None) -> PeerStream: ...


class ProxyError(Exception):
    """A proxied connection could not be set up; worded for a log line."""


class UpstreamExists(ProxyError):
    """An upstream for that service is open already (the API answers 409 Conflict)."""


class Denied(ProxyError):
    """The receiving agent's intentions refuse the caller: no instance on that agent will do."""


class _ClientGone(ProxyError):
    """The client closed or reset while its connection was being set up: nothing to retry for."""


class _Delivered(ProxyError):
    """An attempt failed after bytes may have reached an instance: retrying could deliver them twice."""

    def __init__(self, message: str, reason: str = routing.RESET_BEFORE_REPLY) -> None:
        super().__init__(message)
        #: How the router records it against the instance (dataplane.routing's failure names).
        self.reason = reason


@dataclass
class _Early:
    """The client's bytes sent before the far end answered, kept to replay on another instance."""

    data: bytearray = field(default_factory=bytearray)
    eof: bool = False
    #: Some of it (or the EOF) went out on the current attempt's stream.
    sent: bool = False


def encode_connect(instance_id: str, source: str | None = None,
                   connect_timeout: float | None = None, http: bool = False) -> bytes:
    # Fields an older agent does not know are ignored by it ("http": it splices without watching).
    obj: dict[str, object] = {"id": instance_id}
    if http:
        obj["http"] = 1
    if source is not None:
        obj["src"] = source
    if connect_timeout is not None:
        obj["ct"] = connect_timeout
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return bytes([HEADER_KIND_CONNECT]) + packed


def decode_connect(header: bytes) -> ConnectRequest:
    if not header or header[0] != HEADER_KIND_CONNECT:
        raise ProxyError("unknown stream kind")
    try:
        obj = msgpack.unpackb(header[1:], raw=False)
    except Exception as exc:
        raise ProxyError("malformed stream header") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        raise ProxyError("malformed stream header")
    source = obj.get("src")
    if source is not None and not isinstance(source, str):
        raise ProxyError("malformed stream header: bad source")
    ct = obj.get("ct", CONNECT_TIMEOUT)
    if isinstance(ct, bool) or not isinstance(ct, (int, float)) or not math.isfinite(ct) or ct <= 0:
        raise ProxyError("malformed stream header: bad connect timeout")
    return ConnectRequest(obj["id"], source, min(float(ct), MAX_CONNECT_TIMEOUT), obj.get("http") == 1)


def _reset(stream: RawSocketStream) -> None:
    """Abort with RST so the peer sees a failure, not a clean end of stream."""
    try:
        stream.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


@dataclass
class Spliced:
    """How a splice ended, so the caller can tell whose doing a failure was."""

    #: What tore it down: "a" or "b" (that side's error), "idle", or None (a clean end both ways).
    failed: str | None = None
    #: ``b`` ended its direction (EOF) while ``a``'s was still open.
    b_ended_first: bool = False


#: Shown each chunk that passes one way (dataplane.http_observer).
Tap = Callable[[bytes | memoryview], None]

_SPLICE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProxyError, EOFError)


async def splice(a: Duplex, b: Duplex, stats: Counter[str], on_error: Callable[[], None],
                 idle_timeout: float = 0.0, on_reply: Callable[[], None] | None = None,
                 taps: tuple[Tap, Tap] | None = None) -> Spliced:
    """Copy both directions with half-close; any error, or ``idle_timeout`` of silence, tears both down loudly.

    ``on_reply`` runs once, when the first bytes from ``b`` have reached ``a``.
    ``taps``: each chunk from ``a``, and from ``b``, is shown to these before it
    is passed on unchanged (the far end's HTTP observer); the direct paths,
    which never hold a chunk in Python, are then not used.
    """
    result = Spliced()
    #: Bumped on every chunk; the watchdog reads the clock, the pumps do not (a
    #: clock read per proxied message is a noticeable share of an agent's CPU:
    #: docs/dataplane.md, "Small costs").
    activity = 0
    finished = 0
    first_reply = on_reply

    async def pump(src: Duplex, dst: Duplex, key: str) -> None:
        nonlocal activity, finished

        def delivered(n: int) -> None:
            nonlocal activity, first_reply
            activity += 1
            stats[key] += n
            if first_reply is not None and src is b:
                first_reply()
                first_reply = None

        def fail(side: Duplex, exc: BaseException) -> None:
            if result.failed is None:
                result.failed = "b" if side is b else "a"
            stats["splice_errors"] += 1
            stats[f"splice_error.{type(exc).__name__}"] += 1
            nursery.cancel_scope.cancel()

        #: The end whose own fast path carries this direction, if one does.
        pumper: SocketPump | None = None
        tap = None if taps is None or watched else taps[0] if src is a else taps[1]
        try:
            if tap is None and isinstance(src, SocketPump) and isinstance(dst, RawSocketStream):
                pumper = src
                await src.pump_into(dst, delivered)  # the tunnel's reader writes into dst itself
            elif tap is None and isinstance(src, RawSocketStream) and isinstance(dst, SocketPump):
                pumper = dst
                await dst.pump_from(src, delivered, CHUNK)  # read straight into a record, sealed in place
            else:
                while True:
                    try:
                        data = bytes(await src.receive_some(CHUNK))
                    except _SPLICE_ERRORS as exc:
                        fail(src, exc)
                        return
                    if tap is not None:
                        tap(data)
                    if not data:
                        break
                    activity += 1
                    await dst.send_all(data)
                    delivered(len(data))
                await dst.send_eof()
        except _SPLICE_ERRORS as exc:
            if pumper is None:
                fail(dst, exc)  # the plain loop's reads fail above
            elif isinstance(exc, StreamResetError):
                fail(pumper, exc)  # a tunnel stream only ever fails by a reset (its peer's, or its session's end)
            else:
                fail(dst if pumper is src else src, exc)  # anything else is the socket's
            return
        if finished == 0 and src is b:
            result.b_ended_first = True
        finished += 1
        if finished == 2:
            done.set()  # stops the idle watchdog

    async def watchdog() -> None:
        # Silence is counted from the look that last saw new activity, so the
        # reset comes idle_timeout after the last byte, or up to two looks
        # (a quarter of idle_timeout) later: never early.
        seen = activity
        quiet_since = trio.current_time()
        while True:
            with trio.move_on_after(idle_timeout / _IDLE_LOOKS):
                await done.wait()
            if done.is_set():
                return
            now = trio.current_time()
            if activity != seen:
                seen, quiet_since = activity, now
            elif now - quiet_since >= idle_timeout:
                break
        if result.failed is None:
            result.failed = "idle"
        stats["idle_timeouts"] += 1
        nursery.cancel_scope.cancel()

    # Both directions done: the watchdog returns.  An event, not a cancel: trio
    # builds a description of the cancelling task and a Cancelled for the
    # watchdog, a measurable cost per proxied connection.
    done = trio.Event()
    # A tunnel stream shows its bytes to the taps itself, on its direct paths.
    watched = False
    if taps is not None and isinstance(a, TunnelStream) and isinstance(b, RawSocketStream):
        a.watch(taps[0], taps[1])
        watched = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, "bytes_out")
        nursery.start_soon(pump, b, a, "bytes_in")
        if idle_timeout > 0:
            nursery.start_soon(watchdog)
    if result.failed is not None:
        on_error()
    return result


@dataclass
class UpstreamListener:
    service: str
    listen: tuple[str, int]
    listeners: list[trio.SocketListener]
    options: UpstreamOptions = UpstreamOptions()
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stats: Counter[str] = field(default_factory=Counter)
    router: Router = field(default_factory=lambda: Router(""))
    #: http mode: kept connections to instances, and the retries the upstream may still make.
    pool: Pool = field(default_factory=Pool)
    budget: RetryBudget = field(default_factory=RetryBudget)
    #: The last protocol its service was known to speak (Proxy.protocol).
    protocol: str = "tcp"
    #: When a refusal by this agent's own intentions was last logged (see DENIED_LOG_EVERY).
    denied_logged_at: float = -math.inf


#: What a failed attempt may raise, retried elsewhere, here and by the HTTP layer (:class:`Denied` is
#: handled apart: it rules out a node).
ATTEMPT_ERRORS = (OSError, ProxyError, TunnelError, trio.BrokenResourceError, trio.ClosedResourceError,
                   trio.TooSlowError, ValueError)


class Proxy:
    def __init__(self, local_node: str, directory: InstanceDirectory, tunnels: TunnelOpener,
                 log: Callable[..., None] | None = None, authorizer: Authorizer | None = None,
                 info: Callable[..., None] | None = None, paths: PathView | None = None,
                 chains: ChainSource | None = None, rng: random.Random | None = None,
                 sink: RequestSink | None = None, protocols: Callable[[str], str | None] | None = None) -> None:
        self.local_node = local_node
        #: Where the HTTP layer reports each request it carried (agent/traffic.py).
        self.sink: RequestSink = sink or NoSink()
        #: A service's protocol ("tcp" or "http"), from the mesh-wide config and the registry; None
        #: while nothing says (an upstream then keeps the last it knew: see protocol()).
        self._protocols: Callable[[str], str | None] = protocols or (lambda service: "tcp")
        #: The mesh-wide splits, subsets and failover (None: every service is called plainly).
        self.chains = chains
        self._rng = rng or random.Random()
        self.directory = directory
        self.tunnels = tunnels
        self.authorizer: Authorizer = authorizer or _AllowAll()
        self.stats: Counter[str] = Counter()
        self.upstreams: dict[str, UpstreamListener] = {}
        #: Latency and paths to members, for locality and the routes view (None: no estimates).
        self.paths = paths
        self._nursery: trio.Nursery | None = None
        self.log: Callable[..., None] = log or (lambda *a, **k: None)
        self._info = info or (lambda *a, **k: None)

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- upstream listeners ----------------------------------------------------------------

    async def add_upstream(self, service: str, listen: tuple[str, int],
                           options: UpstreamOptions | None = None) -> UpstreamListener:
        if service in self.upstreams:
            raise UpstreamExists(f"an upstream for {service!r} already exists; remove it first")
        assert self._nursery is not None
        try:
            listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
        except OSError as exc:
            raise ProxyError(f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}") from None
        options = options or UpstreamOptions()
        up = UpstreamListener(service, listen, listeners, options, router=Router(service, options.routing),
                              budget=RetryBudget(options.http.budget))
        self.upstreams[service] = up

        async def serve() -> None:
            try:
                with up.scope:
                    async with trio.open_nursery() as nursery:
                        for listener in listeners:
                            nursery.start_soon(self._accept_loop, up, listener, nursery)
                        nursery.start_soon(self._keep_pool, up)
            finally:
                up.pool.close_all()

        self._nursery.start_soon(serve)
        return up

    async def _accept_loop(self, up: UpstreamListener, listener: trio.SocketListener,
                           nursery: trio.Nursery) -> None:
        """trio.serve_listeners, minus what a proxied connection does not need.

        Its per-connection wrapper closes each stream with aclose_forcefully (a
        cancel scope and a Cancelled) and builds a SocketStream the proxy only
        takes apart again; here the accepted socket becomes a RawSocketStream
        at once.  Running out of file descriptors or memory is handled as there:
        log it, pause briefly, go on; other accept errors end the upstream.
        """
        while True:
            try:
                sock, _ = await listener.socket.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                up.stats["accept_errors"] += 1
                self.log("proxy_accept_failed", service=up.service, error=os.strerror(exc.errno or 0))
                await trio.sleep(_ACCEPT_PAUSE)
                continue
            nursery.start_soon(self._serve_client, up, RawSocketStream.adopt(sock))

    def protocol(self, up: UpstreamListener) -> str:
        """The upstream's protocol now: its service's, or the last one known while the service has no
        instance left (a client of an http service is then answered 503, not reset)."""
        known = self._protocols(up.service)
        if known is not None:
            up.protocol = known
        return up.protocol

    def protocol_of(self, service: str) -> str:
        up = self.upstreams.get(service)
        return self.protocol(up) if up is not None else self._protocols(service) or "tcp"

    async def _keep_pool(self, up: UpstreamListener) -> None:
        """Close kept connections that idled too long, or whose instance left the catalog."""
        while True:
            await trio.sleep(POOL_IDLE_TIMEOUT)
            up.pool.sweep(trio.current_time())
            up.pool.forget({(e.node, e.instance_id) for e in self.directory.passing_endpoints(up.service)})

    def update_options(self, service: str, options: UpstreamOptions) -> None:
        """New settings for an open upstream: its connections from now on use them.

        A change of balancing or outlier settings starts its router afresh (what
        it learned was learned under the old ones); timeouts alone keep it.
        """
        up = self.upstreams[service]
        if options.routing != up.options.routing:
            up.router = Router(service, options.routing)
        if options.http.budget != up.options.http.budget:
            up.budget = RetryBudget(options.http.budget)
        up.options = options

    async def remove_upstream(self, service: str) -> None:
        up = self.upstreams.pop(service, None)
        if up is None:
            raise ProxyError(f"no upstream for {service!r}")
        up.scope.cancel()
        for listener in up.listeners:
            await listener.aclose()

    def rtt_to(self, node: str) -> float | None:
        if node == self.local_node:
            return 0.0
        est = self.paths.rtt_to(node) if self.paths is not None else None
        return None if est is None else est[0]

    def pick(self, up: UpstreamListener, exclude: frozenset[tuple[str, str]] = frozenset(),
             refusing: frozenset[str] = frozenset(), last_resort: bool = True,
             route: tuple[DiscoveryChain, Target] | None = None, now: float | None = None) -> Endpoint | None:
        """The router's choice among the passing instances not tried yet, on nodes that did not
        refuse this connection (dataplane.routing); within the connection's split target when the
        service has a discovery chain."""
        endpoints, failed_over = self.route_endpoints(up, route)
        if failed_over:
            up.stats["failovers"] += 1
        if refusing:  # excluded, not filtered out: the router must still see them listed
            exclude = exclude | {(e.node, e.instance_id) for e in endpoints if e.node in refusing}
        chosen = up.router.pick(trio.current_time() if now is None else now, endpoints, exclude, self.rtt_to,
                                last_resort)
        assert chosen is None or isinstance(chosen, Endpoint)
        return chosen

    def has_alternative(self, up: UpstreamListener, endpoint: Endpoint, tried: set[tuple[str, str]],
                        refusing: set[str], route: tuple[DiscoveryChain, Target] | None) -> bool:
        """Whether a failed attempt on ``endpoint`` could go on to an instance on another node: one not
        tried, on a node that did not refuse, that outlier detection has not ejected.  Only then is a
        new tunnel to ``endpoint``'s node waited for no longer than its RTT says (the attempt's caller
        also checks it has an attempt left); without one, the attempt waits out its connect timeout."""
        now = trio.current_time()
        endpoints, _ = self.route_endpoints(up, route)
        return any(e.node != endpoint.node and e.node not in refusing and (e.node, e.instance_id) not in tried
                   and up.router.outlier.available(now, (e.node, e.instance_id)) for e in endpoints)

    def route_endpoints(self, up: UpstreamListener, route: tuple[DiscoveryChain, Target] | None
                        ) -> tuple[list[Endpoint], bool]:
        """The passing instances a connection or request may use, and whether its target failed over."""
        if route is None:
            return self.directory.passing_endpoints(up.service), False
        chain, target = route
        resolved = chain.resolve(target, self.directory.passing_endpoints)
        return resolved.endpoints, resolved.failed_over

    async def _serve_client(self, up: UpstreamListener, client: RawSocketStream) -> None:
        up.stats["connections"] += 1
        if self.protocol(up) == "http":
            from dataplane import http_proxy  # loaded with the first http service (issue 30's lighter start)

            up.stats["http_connections"] += 1
            await http_proxy.serve(self, up, client)
            return
        await self.serve_l4(up, client)

    async def serve_l4(self, up: UpstreamListener, client: RawSocketStream, early: bytes = b"") -> None:
        """Carry one client connection as bytes; ``early``: what the HTTP layer already read of it."""
        refused = up.router.admit()
        if refused is not None:
            up.stats[f"overflow_{refused}"] += 1
            self.log("proxy_overflow", service=up.service, limit=refused)
            _reset(client)
            await _close(client)
            return
        if not self.allowed_here(up):
            _reset(client)
            await _close(client)
            return
        got = await self._connect_any(up, client, _Early(bytearray(early)))
        if got is None:
            _reset(client)
            await _close(client)
            return
        far, attempt, client_done = got
        up.stats["connected"] += 1
        replied = False

        def broken() -> None:
            _reset(client)
            if isinstance(far, RawSocketStream):
                _reset(far)

        def first_reply() -> None:
            nonlocal replied
            replied = True
            up.router.first_reply(trio.current_time(), attempt)

        failure: str | None = None
        clean = False
        try:
            end = await splice(client, far, up.stats, broken, up.options.idle_timeout, on_reply=first_reply)
            clean = end.failed is None
            if not replied:
                # The instance's side ended it before a byte of answer: its doing (or the path's).
                # A close after the client had finished sending may be the protocol; a reset never is.
                if end.b_ended_first and not client_done:
                    failure = routing.CLOSED_BEFORE_REPLY
                elif end.failed == "b":
                    failure = routing.RESET_BEFORE_REPLY
            if failure is not None:
                up.stats[f"instance_{failure}"] += 1
                self.log("proxy_instance_failed", service=up.service, node=attempt.key[0],
                          instance=attempt.key[1], error=failure)
        finally:
            up.router.closed(trio.current_time(), attempt, failure, clean)
            await _close(client)
            await _close(far)

    async def _connect_any(self, up: UpstreamListener, client: RawSocketStream,
                           early: _Early) -> tuple[Duplex, Attempt, bool] | None:
        """Connect an instance: the stream, its attempt, and whether the client had already ended
        its side; None (counted and logged) when the client must be reset.

        At most MAX_ATTEMPTS instances that fail; an agent that refuses (intentions) rules out its
        instances for this connection, and the router remembers it.  Instances on agents already
        known to refuse are asked only when nothing else is left, and then at most MAX_ATTEMPTS
        times, so that a caller every agent refuses is reset after a bounded wait.
        """
        tried: set[tuple[str, str]] = set()
        refusing: set[str] = set()
        router = up.router
        failures = asked_refusing = 0
        route = self.route_for(up)  # one split per connection, kept through its retries
        while failures < MAX_ATTEMPTS:
            endpoint = self.pick(up, frozenset(tried), frozenset(refusing), asked_refusing < MAX_ATTEMPTS, route)
            if endpoint is None:
                break
            key = (endpoint.node, endpoint.instance_id)
            tried.add(key)
            known_refusing = router.refuses(endpoint.node)
            attempt = router.attempt(trio.current_time(), key)

            def alternative(endpoint: Endpoint = endpoint, attempt_left: bool = failures + 1 < MAX_ATTEMPTS) -> bool:
                return attempt_left and self.has_alternative(up, endpoint, tried, refusing, route)

            try:
                far = await self._connect(up, endpoint, client, early, alternative)
            except _ClientGone:
                router.failed(trio.current_time(), attempt, instance_fault=False)
                up.stats["client_gone"] += 1
                return None
            except _Delivered as exc:
                router.failed(trio.current_time(), attempt, reason=exc.reason)
                up.stats["connect_failures"] += 1
                self.log("proxy_connect_failed", service=up.service, node=endpoint.node,
                          instance=endpoint.instance_id, error=str(exc))
                return None
            except Denied as exc:
                # Decided before the instance was connected: nothing reached it, so another
                # agent may be asked, and none of this one's instances will do.
                router.denied(trio.current_time(), attempt)
                refusing.add(endpoint.node)
                asked_refusing += known_refusing
                up.stats["refusals"] += 1
                self._info("proxy_denied", service=up.service, source=up.options.source, node=endpoint.node,
                           detail=str(exc))
                continue
            except ATTEMPT_ERRORS as exc:
                reason = routing.TIMEOUT if isinstance(exc, trio.TooSlowError) else routing.CONNECT_FAILED
                # A dial left at its RTT bound says nothing against the instance (DialAbandoned).
                router.failed(trio.current_time(), attempt, not isinstance(exc, DialAbandoned), reason)
                failures += 1
                up.stats["attempts_failed"] += 1
                self.log("proxy_connect_failed", service=up.service, node=endpoint.node,
                          instance=endpoint.instance_id, error=str(exc) or type(exc).__name__)
                continue
            except BaseException:
                router.failed(trio.current_time(), attempt, instance_fault=False)
                raise
            router.connected(trio.current_time(), attempt)
            up.stats["bytes_out"] += len(early.data)  # sent with the open, before the splice counts
            if len(tried) > 1:
                up.stats["retried"] += 1
            return far, attempt, early.eof
        if refusing:
            up.stats["denied"] += 1  # no instance left that this source may reach
        elif not tried:
            up.stats["no_instance"] += 1
            self.log("proxy_no_instance", service=up.service)
        else:
            up.stats["connect_failures"] += 1
        return None

    async def _connect(self, up: UpstreamListener, endpoint: Endpoint, client: RawSocketStream,
                       early: _Early, alternative: Callable[[], bool] | None = None) -> Duplex:
        timeout = up.options.connect_timeout
        source = up.options.source
        if endpoint.node == self.local_node:
            if not self._authorize(self.local_node, source, endpoint.service or up.service):
                raise Denied(f"intentions refuse {source or '(no source)'} -> {up.service}")
            with trio.fail_after(timeout):
                conn = await connect_tcp(endpoint.host, endpoint.port)
            try:
                if early.data:
                    await conn.send_all(bytes(early.data))
                if early.eof:
                    await conn.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await _close(conn)
                raise _Delivered(f"the instance broke off as the client's first bytes were sent: {exc}") from None
            except BaseException:
                await _close(conn)
                raise
            return conn
        # The far agent gives up connecting before we do, so that a slow instance is
        # normally answered "unavailable" (retried) rather than timed out (not: see below).
        header = encode_connect(endpoint.instance_id, source, timeout * FAR_CONNECT_SHARE)
        early.sent = False
        try:
            with trio.fail_after(timeout):
                stream = await self.tunnels.open_stream(endpoint.node, header, alternative=alternative)
                try:
                    status = await self._early_data(stream, client, early)
                except BaseException:
                    await _close(stream)
                    raise
        except trio.TooSlowError:
            if early.sent:
                # The far agent may connect the instance and pass the bytes on just as we give up.
                raise _Delivered("no answer within the connect timeout after the client's first bytes went out",
                                 routing.TIMEOUT) from None
            raise
        if status == bytes([STATUS_OK]):
            return stream
        await _close(stream)
        if status == bytes([STATUS_DENIED]):
            raise Denied(f"{endpoint.node} refuses {source or '(no source)'} -> {up.service} (intentions)")
        raise ProxyError(f"{endpoint.node} could not connect instance {endpoint.instance_id!r}")

    async def _early_data(self, stream: PeerStream, client: RawSocketStream, early: _Early) -> bytes:
        """Send the client's first bytes while the far end connects, and return its status byte.

        Pipelining spares the client a tunnel round trip.  A copy of what was
        sent is kept (at most EARLY_MAX bytes; past that the client waits) so
        another instance can be tried: the far end forwards nothing until it
        has sent OK.  A stream that breaks before its status once early data
        went out may have delivered it, so that is final (:class:`_Delivered`).
        """
        sent_any = bool(early.data)
        status: bytes | None = None
        failure: Exception | None = None
        gone: _ClientGone | None = None
        early.sent = bool(early.data) or early.eof
        try:
            if early.data:
                await stream.send_all(bytes(early.data))
            if early.eof:
                await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            failure = exc
        if failure is None:
            async with trio.open_nursery() as nursery:
                reading = trio.CancelScope()

                async def wait_status() -> None:
                    nonlocal status, failure
                    try:
                        status = await stream.receive_some(1)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        failure = exc
                        nursery.cancel_scope.cancel()
                        return
                    reading.cancel()

                nursery.start_soon(wait_status)
                try:
                    while status is None and not early.eof and len(early.data) < EARLY_MAX:
                        with reading:
                            try:
                                data = await client.receive_some(CHUNK)
                            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                                raise _ClientGone(f"client went away: {exc}") from None
                        if reading.cancelled_caught:
                            break  # the status came first: nothing was read
                        # Data read in the same instant the status arrived is
                        # still the client's: it must go out (or be kept for a
                        # retry), never be dropped.
                        reading = trio.CancelScope()
                        if not data:
                            early.eof = early.sent = True
                            await stream.send_eof()
                            break
                        early.data += data
                        sent_any = early.sent = True
                        await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    failure = exc
                    nursery.cancel_scope.cancel()
                except _ClientGone as exc:
                    gone = exc
                    nursery.cancel_scope.cancel()
        if gone is not None:
            raise gone
        if status is not None and status != bytes([STATUS_OK]):
            return status  # refused: whatever failed after it, early holds all for a retry
        if failure is not None:
            if sent_any:
                raise _Delivered("the stream broke after the request's first bytes were sent") from failure
            raise failure
        assert status is not None
        return status

    def route_for(self, up: UpstreamListener, request: tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None = None
                  ) -> tuple[DiscoveryChain, Target] | None:
        """The target for one connection (tcp) or one request (http: method, target, headers), when the
        service has a chain: the first service-router route that matches, else a split."""
        chain = self.chains.chain_for(up.service) if self.chains is not None else None
        if chain is None:
            return None
        if request is not None:
            routed = chain.route(*request)
            if routed is not None:
                up.stats[f"route.{routed}"] += 1
                return chain, routed
        target = chain.choose(self._rng)
        up.stats[f"split.{target}"] += 1
        return chain, target

    async def instance_conn(self, up: UpstreamListener, endpoint: Endpoint,
                            alternative: Callable[[], bool] | None = None) -> InstanceConn:
        """A kept connection to the instance for one HTTP request, or a new one.

        ``alternative()``: whether a failure would be retried on another node (:meth:`has_alternative`);
        asked only if a new tunnel must be dialled.

        Raises Denied when the instance's agent refuses the source, and the
        attempt errors when it cannot be connected; nothing is sent to the
        instance before it is returned, so either may be retried anywhere.
        """
        key = (endpoint.node, endpoint.instance_id)
        kept = up.pool.take(key, trio.current_time())
        if kept is not None:
            return kept
        timeout = up.options.connect_timeout
        source = up.options.source
        up.pool.opened += 1
        if endpoint.node == self.local_node:
            if not self._authorize(self.local_node, source, endpoint.service or up.service):
                raise Denied(f"intentions refuse {source or '(no source)'} -> {up.service}")
            with trio.fail_after(timeout):
                conn = await connect_tcp(endpoint.host, endpoint.port)
            return InstanceConn(key, conn, local=True)
        header = encode_connect(endpoint.instance_id, source, timeout * FAR_CONNECT_SHARE, http=True)
        with trio.fail_after(timeout):
            stream = await self.tunnels.open_stream(endpoint.node, header, alternative=alternative)
            try:
                status = await stream.receive_some(1)
            except BaseException:
                await _close(stream)
                raise
        if status == bytes([STATUS_OK]):
            return InstanceConn(key, cast(Kept, stream), local=False)
        await _close(stream)
        if status == bytes([STATUS_DENIED]):
            raise Denied(f"{endpoint.node} refuses {source or '(no source)'} -> {up.service} (intentions)")
        raise ProxyError(f"{endpoint.node} could not connect instance {endpoint.instance_id!r}")

    def allowed_here(self, up: UpstreamListener) -> bool:
        """The caller's side of the intentions: every agent holds the same mesh-wide rules, so a
        call they deny is refused at once, before it is balanced onto instances that would refuse
        it one by one.  The destination's agent still decides for itself (handle_stream)."""
        verdict = self.authorizer.authorize(self.local_node, up.options.source, up.service)
        if verdict.allowed:
            return True
        up.stats["denied"] += 1
        up.stats["denied_here"] += 1
        # Once per DENIED_LOG_EVERY per upstream: in http mode this runs per request, and a client
        # retrying a denied call in a loop must not flood the log (the counters keep every one).
        now = trio.current_time()
        if now >= up.denied_logged_at + DENIED_LOG_EVERY:
            up.denied_logged_at = now
            self._info("proxy_denied_here", service=up.service, source=up.options.source, reason=verdict.reason,
                       detail=f"intentions refuse {up.options.source or '(no source)'} -> {up.service}",
                       refused_so_far=up.stats["denied_here"])
        return False

    def _authorize(self, node: str, source: str | None, destination: str) -> bool:
        """The receiving side's decision, counted and logged once when it refuses."""
        verdict = self.authorizer.authorize(node, source, destination)
        if verdict.allowed:
            return True
        self.stats["intentions_denied"] += 1
        if verdict.reason == "unverified":
            self.stats["intentions_unverified"] += 1
        self._info("intention_denied", source_node=node, source_service=source, destination=destination,
                   reason=verdict.reason)
        return False

    # -- the far end: a peer opened a stream to one of our instances --------------------------

    async def handle_stream(self, peer: str, header: bytes, stream: PeerStream) -> None:
        self.stats["streams_in"] += 1
        try:
            req = decode_connect(header)
        except ProxyError as exc:
            self.stats["far_connect_failures"] += 1
            self.log("proxy_far_connect_failed", peer=peer, error=str(exc))
            await stream.aclose()  # resets the stream: the client sees a failure
            return
        endpoint = self.directory.local_endpoint(req.instance_id)
        if endpoint is None:
            self.stats["far_connect_failures"] += 1
            self.log("proxy_far_connect_failed", peer=peer, error=f"no local instance {req.instance_id!r}")
            await _answer(stream, STATUS_UNAVAILABLE)
            return
        if not self._authorize(peer, req.source, endpoint.service):
            await _answer(stream, STATUS_DENIED)
            return
        try:
            with trio.fail_after(req.connect_timeout):
                conn = await connect_tcp(endpoint.host, endpoint.port)
        except (OSError, trio.TooSlowError) as exc:
            self.stats["far_connect_failures"] += 1
            self.log("proxy_far_connect_failed", peer=peer, instance=req.instance_id,
                      error=str(exc) or type(exc).__name__)
            await _answer(stream, STATUS_UNAVAILABLE)
            return

        def broken() -> None:
            _reset(conn)

        observer = None
        if req.http:
            from dataplane.http_observer import ExchangeObserver

            def done(method: str, path: str, status: int, started: float, wall: float) -> None:
                self.sink.record(RequestRecord(INBOUND, endpoint.service, endpoint.instance_id, self.local_node,
                                               req.source, method, path, status, trio.current_time() - started,
                                               wall))

            observer = ExchangeObserver(done)
        try:
            await stream.send_all(bytes([STATUS_OK]))
            await splice(stream, conn, self.stats, broken,
                         taps=None if observer is None else (observer.requests, observer.responses))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.stats["splice_errors"] += 1
            _reset(conn)
        finally:
            await _close(conn)
            await stream.aclose()


async def _answer(stream: PeerStream, status: int) -> None:
    """A refusal: the status byte and a clean end, so the initiator reads why rather than a reset.

    The initiator may already have sent early data; closing with it unread
    would reset the stream and could destroy the status byte in flight, so
    the data is read and dropped until the initiator closes its side.
    """
    with trio.move_on_after(CONNECT_TIMEOUT):
        try:
            await stream.send_all(bytes([status]))
            await stream.send_eof()
            while await stream.receive_some(CHUNK):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await stream.aclose()


async def _close(s: Duplex) -> None:
    """Close at once, even in a cancelled scope.

    The proxy's own streams close synchronously: trio.aclose_forcefully's
    cancel scope, cancel and Cancelled cost a measurable share of an agent's
    CPU when connections come and go by the thousand.
    """
    if isinstance(s, (RawSocketStream, SocketPump)):
        s.close_now()
    elif isinstance(s, trio.abc.AsyncResource):
        await trio.aclose_forcefully(s)
    else:
        with trio.CancelScope(shield=True):
            await s.aclose()
