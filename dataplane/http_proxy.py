"""The calling agent's HTTP layer: one client connection, each request balanced on its own.

An L4 proxy sends everything a client connection carries to one instance, so
a client with one kept-alive connection (every HTTP client library, every
pool) loads one instance however many there are, and an instance that
answers 500 to everything looks healthy because its connections succeed.
For a service whose protocol is ``http`` the calling agent reads requests,
picks an instance per request with the same router as L4 (P2C over
peak-EWMA, weights, slow start, outlier ejection), and writes the request
again on a kept-alive connection to that instance (dataplane.http_pool).
The common request shape is read and written without h11
(dataplane.http_fastpath); anything else goes through h11, in the server
role towards the client and the client role towards the instance, one h11
connection per such request.  The instance's agent only watches the bytes go
by for its inbound figures (dataplane.http_observer).  A request of the common
path on a kept connection usually never reaches this module's task at all: the
reactor's callbacks carry it (dataplane.http_turns), and hand it back here, as
far as it got, whenever it needs waiting or a decision.

What the mesh owes the client, whatever fails:

* an answer, not a reset, while nothing of the response has been sent: 503
  when no instance can be reached (or the upstream's limits are full), 504
  when the request timeout passes, 502 when an instance breaks off before a
  complete response head, 403 when intentions refuse the call; each with a
  short plain body and an ``x-mesh-error`` header naming the reason.  Once
  the response has started, a failure resets the client (a truncated body
  must never look complete); a small answer is held until it is complete
  (plain_advance), so an instance dying in the middle of one is a retry or a
  502, not a reset;
* no request delivered twice unless the method allows it: a request is
  retried (on another instance when there is one) after a connect failure,
  which provably reached no instance, for any method; after a broken
  connection or a ``retry_on`` status only for idempotent methods (RFC 9110
  §9.2.2) whose body the agent still holds whole (at most RETRY_BUFFER: a
  body streamed beyond it is never replayed).  Every retry takes a token
  from the upstream's retry budget (dataplane.retry_budget), so retries
  never multiply an outage;
* anything that is not HTTP/1 framing this layer can re-frame goes through
  as bytes: ``Connection: Upgrade`` (WebSocket) and ``CONNECT`` switch the
  rest of the client connection to the L4 path from that request on, as
  does a first request line that is not HTTP/1 at all; a request that is
  HTTP/1 but malformed is answered 400 and reaches no instance.

The request timeout (Envoy's route timeout) runs from the end of the request
to the end of the response and covers retries; the upstream's idle timeout
still resets a connection silent for that long.

One module past 700 lines: a request's life (its client, its attempts, the
exchange on each, the answers the mesh gives for it) shares one state and one
set of outcomes (_Request, _Answer, _Retry, _Reset, _Failed), whichever path
reads it; split, each part would need the others' internals.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import h11
import httptools
import trio

from dataplane import routing
from dataplane.hop_by_hop import MESH_ERROR, request_headers, response_headers, wants_upgrade
from dataplane.http_fastpath import (
    RETRY_BUFFER,
    SLOW,
    PlainRequest,
    Response,
    SlowPath,
    answer_bytes,
    fields_of,
    forward_bytes,
    head_bytes,
    looks_like_http1,
    parse_request,
)
from dataplane.http_pool import InstanceConn, Kept
from dataplane.observed import INBOUND, OUTBOUND, RequestRecord
from dataplane.proxy import ATTEMPT_ERRORS, CHUNK, MAX_ATTEMPTS, Denied, Endpoint
from dataplane.rawsocket import RawSocketStream
from dataplane.reactor import Reactor
from dataplane.stream import TunnelStream
from dataplane.tunnel import DialAbandoned

if TYPE_CHECKING:
    from dataplane.discovery_chain import DiscoveryChain, Target
    from dataplane.proxy import Proxy, UpstreamListener

__all__ = ["serve"]

#: RFC 9110 §9.2.2.
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_IO_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

# Reasons the mesh names in x-mesh-error (and counts, and records).
NO_INSTANCE: Final = "no-passing-instances"
CONNECT_FAILED: Final = "connect-failed"
TIMEOUT: Final = "timeout"
UPSTREAM_RESET: Final = "upstream-reset"
BAD_RESPONSE: Final = "bad-response"
DENIED: Final = "denied"
OVERFLOW: Final = "overflow"
BAD_REQUEST: Final = "bad-request"


class _Client:
    """The client's connection: read into ``buf`` for the common path (dataplane.http_fastpath), and
    for a request that path leaves to h11, h11 in the server role (``h``, made for that request)."""

    __slots__ = ("stream", "h", "address", "raw", "eof", "stats", "buf")

    def __init__(self, stream: RawSocketStream, address: str, stats: Counter[str]) -> None:
        self.stream = stream
        #: The upstream's counters (bytes_out: from the client, bytes_in: to it, as in L4).
        self.stats = stats
        self.h: h11.Connection | None = None
        #: Received and not yet taken by a request.
        self.buf = bytearray()
        self.address = address
        #: The bytes of the current request from its first, kept until its head is parsed, so a
        #: request that must go as bytes (an upgrade) can be sent as it came.
        self.raw: bytearray | None = None
        self.eof = False

    async def receive(self) -> None:
        data = await self.stream.receive_some(CHUNK)
        self.stats["bytes_out"] += len(data)
        if data:
            self.buf += data
        else:
            self.eof = True

    async def event(self) -> h11.Event | type[h11.PAUSED]:
        h = self.h
        assert h is not None
        while True:
            ev = h.next_event()
            if ev is not h11.NEED_DATA:
                return ev  # type: ignore[return-value]  # narrowed: NEED_DATA is handled here
            if self.eof:
                raise h11.RemoteProtocolError("the client closed in the middle of a request", 400)
            data = await self.stream.receive_some(CHUNK)
            self.stats["bytes_out"] += len(data)
            if not data:
                self.eof = True
            elif self.raw is not None:
                self.raw += data
            h.receive_data(data)

    async def send(self, ev: h11.Event) -> None:
        assert self.h is not None
        data = self.h.send(ev)
        if data:
            await self.send_bytes(data)

    async def send_bytes(self, data: bytes | bytearray) -> None:
        self.stats["bytes_in"] += len(data)
        await _send(self.stream, data)


async def _send(stream: Kept, data: bytes | bytearray) -> None:
    """``send_all``, without its scheduling point and queue when the bytes can leave at once: a
    request or response held whole usually can, and this layer awaits its next read anyway."""
    if isinstance(stream, RawSocketStream):
        sent = stream.try_send(data)
        if sent < len(data):
            await stream.send_all(memoryview(data)[sent:])
        return
    if isinstance(stream, TunnelStream) and stream.try_send_whole(data):
        return
    await stream.send_all(data)


class _Answer(Exception):
    """The mesh answers this request itself (nothing of a response has reached the client)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason


class _Reset(Exception):
    """The response had started when it failed: the client is reset, never handed a short body."""


class _Retry(Exception):
    """This attempt failed in a way the request may be tried again for (on another instance)."""

    def __init__(self, answer: _Answer) -> None:
        super().__init__(str(answer))
        self.answer = answer


def _peer_host(stream: RawSocketStream) -> str:
    try:
        return str(stream.raw.getpeername()[0])
    except (OSError, IndexError):
        return "unknown"


async def serve(proxy: Proxy, up: UpstreamListener, client: RawSocketStream) -> None:
    """Carry one client connection's requests until it ends; hand it to the L4 path when it must."""
    c = _Client(client, _peer_host(client), up.stats)
    first = True
    handed_off = False
    turns = None
    reactor = getattr(proxy.tunnels, "reactor", None)  # a TunnelManager's (tests may hand in other openers)
    if isinstance(reactor, Reactor) and reactor.running:
        from dataplane.http_turns import Turns

        turns = Turns(proxy, up, c, reactor)
    try:
        while True:
            req = await _next_request(up, c) if turns is None else await turns.next()
            if req is None:
                return
            if isinstance(req, Call):
                if not await _request(proxy, up, c, req.r, req) or req.r.close:
                    return
                first = False
                continue
            if isinstance(req, PlainRequest):
                if not await _plain_request(proxy, up, c, req, None if turns is None else turns.take_picked()):
                    return
            else:
                go_on, handed_off = await _h11_request(proxy, up, c, first)
                if not go_on:
                    return
            first = False
    except _IO_ERRORS:
        up.stats["http_client_gone"] += 1
    except Exception as exc:  # a bug here must cost one connection, never the agent
        up.stats["http_internal_errors"] += 1
        proxy.log("http_internal_error", service=up.service, error=repr(exc), exc_info=True)
        client.reset()
    finally:
        if not handed_off:
            client.close_now()


async def _next_request(up: UpstreamListener, c: _Client) -> PlainRequest | SlowPath | None:
    """The client's next request, once it can be told which path carries it; None when the client
    is done, or was silent between requests for the idle timeout (RFC 9112 §9.6 lets a server close
    then)."""
    idle = up.options.idle_timeout
    with trio.move_on_after(idle if idle > 0 else math.inf):
        searched = [0]
        while True:
            req = parse_request(c.buf, searched)
            if req is not None:
                return req
            if c.eof:
                return SLOW if c.buf else None  # h11 tells an incomplete request's client so
            await c.receive()
    up.stats["idle_timeouts"] += 1
    return None


async def _plain_request(proxy: Proxy, up: UpstreamListener, c: _Client, req: PlainRequest,
                         first: Endpoint | None = None) -> bool:
    """A request of the common path; whether the connection goes on.  ``first``: the instance to try first."""
    del c.buf[:req.length]
    r = plain_state(req, forward_bytes(req, c.address), up.options.http.timeout)
    return await _request(proxy, up, c, r, first=first) and not r.close


def plain_state(req: PlainRequest, wire: bytes, timeout: float, now: float | None = None) -> _Request:
    """The state of a request of the common path, held whole (the task's and the reactor's turns'); ``wire``:
    the request as it goes to an instance (forward_bytes)."""
    r = _Request(req.method, req.target, None, timeout, True, now)
    r.wire = wire
    r.body = req.body
    r.complete = True
    r.close = req.close
    return r


async def _h11_request(proxy: Proxy, up: UpstreamListener, c: _Client, first: bool) -> tuple[bool, bool]:
    """A request the common path leaves to h11, from the bytes ``c`` holds; whether the connection
    goes on, and whether it was handed to the L4 path."""
    h = c.h = h11.Connection(h11.SERVER)
    # The bytes of the request from its first, kept until its head is parsed, so a request that must
    # go as bytes (an upgrade) can be sent as it came.
    c.raw = bytearray(c.buf)
    h.receive_data(bytes(c.buf))
    c.buf = bytearray()
    if c.eof:
        h.receive_data(b"")
    idle = up.options.idle_timeout
    ev: h11.Event | type[h11.PAUSED] | None = None
    bad: h11.RemoteProtocolError | None = None
    with trio.move_on_after(idle if idle > 0 else math.inf):
        try:
            ev = await c.event()
        except h11.RemoteProtocolError as exc:
            bad = exc
    if bad is not None:
        raw = bytes(c.raw)
        if first and not looks_like_http1(raw):
            up.stats["http_fallbacks"] += 1
            await proxy.serve_l4(up, c.stream, early=raw)
            return False, True
        up.stats["http_bad_requests"] += 1
        await _answer(c, up, _Answer(bad.error_status_hint, BAD_REQUEST, f"bad request: {bad}"))
        return False, False
    if ev is None:
        up.stats["idle_timeouts"] += 1
        return False, False
    if not isinstance(ev, h11.Request):
        return False, False  # ConnectionClosed: the client is done
    raw = bytes(c.raw)
    c.raw = None
    if _both_framings(ev):
        # RFC 9112 §6.3 lets a server take Transfer-Encoding over Content-Length, but a message
        # with both is the shape of request smuggling; refused, as Envoy does by default.
        up.stats["http_bad_requests"] += 1
        await _answer(c, up, _Answer(400, BAD_REQUEST, "bad request: both Content-Length and "
                                                       "Transfer-Encoding (RFC 9112 6.3)"))
        return False, False
    if ev.method == b"CONNECT" or wants_upgrade(list(ev.headers)):
        up.stats["http_fallbacks"] += 1
        await proxy.serve_l4(up, c.stream, early=raw)
        return False, True
    r = _Request(ev.method, ev.target, request_headers(list(ev.headers), c.address), up.options.http.timeout,
                 plain=False)
    if not await _request(proxy, up, c, r):
        return False, False
    if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
        return False, False  # h11's start_next_cycle would refuse: one side asked to close
    data, closed = h.trailing_data
    c.buf = bytearray(data)
    c.eof = c.eof or closed
    c.h = None
    return True, False


def _both_framings(ev: h11.Request) -> bool:
    names = {name for name, _ in ev.headers}
    return b"content-length" in names and b"transfer-encoding" in names


async def _answer(c: _Client, up: UpstreamListener, answer: _Answer, close: bool = False) -> bool:
    """Answer for the mesh; whether the client connection can carry another request."""
    up.stats[f"http_mesh_{answer.reason}"] += 1
    if c.h is None:  # a request of the common path, whole and unanswered
        keep = not close and answer.status not in (400, 431)
        try:
            await c.send_bytes(answer_bytes(answer.status, answer.reason, str(answer), keep))
        except _IO_ERRORS:
            return False
        return keep
    if c.h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # IDLE: h11 lets a server answer a bad request
        return False
    keep = c.h.their_state is h11.DONE and answer.status not in (400, 431)
    body = f"{answer}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
               (MESH_ERROR, answer.reason.encode())]
    if not keep:
        headers.append((b"connection", b"close"))
    try:
        await c.send(h11.Response(status_code=answer.status, headers=headers))
        await c.send(h11.Data(data=body))
        await c.send(h11.EndOfMessage())
    except (h11.LocalProtocolError, *_IO_ERRORS):
        return False
    return keep


class _Request:
    """One request's state across its attempts."""

    __slots__ = ("method", "target", "_headers", "wire", "plain", "close", "body", "complete", "started", "wall",
                 "status", "instance", "node", "mesh_error", "retries", "response_started", "deadline_scope",
                 "timeout")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] | None, timeout: float,
                 plain: bool, now: float | None = None) -> None:
        self.method = method
        self.target = target
        #: The fields as they go to an instance; a request of the common path has them from ``wire``.
        self._headers = headers
        #: A request of the common path, whole, as it goes to an instance (head and body).
        self.wire = b""
        #: Carried by the common path (dataplane.http_fastpath), not h11.
        self.plain = plain
        #: The client's connection ends after this exchange (its wish, or a body that ends with the
        #: instance's connection); the common path's to keep.
        self.close = False
        #: The common path's body as parsed (bytes); h11's path appends what it reads.
        self.body: bytes | bytearray = bytearray()
        #: The whole body is in ``body`` (so it can be sent again).
        self.complete = False
        self.started = trio.current_time() if now is None else now
        self.wall = time.time()
        self.status = 0
        self.instance = ""
        self.node = ""
        self.mesh_error: str | None = None
        self.retries = 0
        #: The response's head went to the client: from here on a failure is a reset.
        self.response_started = False
        self.deadline_scope: trio.CancelScope | None = None
        self.timeout = timeout

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        if self._headers is None:
            self._headers = fields_of(self.wire[:self.wire.find(b"\r\n\r\n") + 4])
        return self._headers

    def request_done(self) -> None:
        """The request is all sent or held: the request timeout starts (Envoy's route timeout)."""
        if self.deadline_scope is not None and self.timeout > 0:
            self.deadline_scope.deadline = trio.current_time() + self.timeout


class Call:
    """A request of the common path that the reactor's turns (dataplane.http_turns) sent on a kept
    connection; its answer read as far as ``st`` says.  Its task takes it over from there."""

    __slots__ = ("r", "ic", "attempt", "st", "reused")

    def __init__(self, r: _Request, ic: InstanceConn, attempt: routing.Attempt, reused: bool) -> None:
        self.r = r
        self.ic = ic
        self.attempt = attempt
        self.st = PlainRead()
        self.reused = reused


async def _prefetch(c: _Client, r: _Request) -> None:
    """Read the body that comes with the request, up to RETRY_BUFFER, so it can be sent again."""
    while len(r.body) <= RETRY_BUFFER:
        ev = await c.event()
        if isinstance(ev, h11.Data):
            r.body += ev.data
        elif isinstance(ev, h11.EndOfMessage):
            r.complete = True
            return
        else:
            raise h11.RemoteProtocolError("unexpected event in a request body", 400)


async def _request(proxy: Proxy, up: UpstreamListener, c: _Client, r: _Request, call: Call | None = None,
                   first: Endpoint | None = None) -> bool:
    """Carry one request to an instance and its response back; whether the connection goes on.  ``call``:
    the reactor's turns started it (and counted it); ``first``: they chose that instance for it."""
    opts = up.options.http
    if call is None:
        up.stats["http_requests"] += 1
    keep = True
    try:
        # A request held whole already has its deadline (the common path's always are).
        deadline = r.started + opts.timeout if r.complete and opts.timeout > 0 else math.inf
        with trio.CancelScope(deadline=deadline) as scope:
            r.deadline_scope = scope
            if c.h is not None and not c.h.they_are_waiting_for_100_continue:
                await _prefetch(c, r)
            if r.complete and deadline == math.inf:
                r.request_done()
            try:
                await _attempts(proxy, up, c, r, call, first)
            except _Answer as answer:
                r.status, r.mesh_error = answer.status, answer.reason
                keep = await _answer(c, up, answer, r.close)
        if scope.cancelled_caught:
            up.stats["http_timeouts"] += 1
            if r.response_started:
                raise _Reset("the request timeout passed while the response was being sent")
            r.status, r.mesh_error = 504, TIMEOUT
            keep = await _answer(c, up, _Answer(504, TIMEOUT, f"no complete answer from {up.service} within "
                                                f"{opts.timeout:g}s"), r.close)
    except h11.RemoteProtocolError as exc:
        up.stats["http_bad_requests"] += 1
        r.status, r.mesh_error = exc.error_status_hint, BAD_REQUEST
        keep = False
        await _answer(c, up, _Answer(exc.error_status_hint, BAD_REQUEST, f"bad request: {exc}"))
    except _Reset as exc:
        up.stats["http_resets"] += 1
        proxy.log("http_response_broken", service=up.service, instance=r.instance, error=str(exc))
        r.status = 0
        c.stream.reset()
        keep = False
    finally:
        _record(proxy, up, r)
    return keep


def _record(proxy: Proxy, up: UpstreamListener, r: _Request, now: float | None = None) -> None:
    latency = (trio.current_time() if now is None else now) - r.started
    method = r.method.decode("ascii", "replace")
    path = r.target.decode("ascii", "replace")
    rec = RequestRecord(OUTBOUND, up.service, r.instance, r.node, up.options.source, method, path, r.status,
                        latency, r.wall, r.mesh_error, r.retries)
    proxy.sink.record(rec)
    if r.node == proxy.local_node and r.mesh_error is None:
        # The instance is this agent's own: it also sees the request come in.
        proxy.sink.record(RequestRecord(INBOUND, up.service, r.instance, r.node, up.options.source, method,
                                        path, r.status, latency, r.wall, None, 0))


def _has_other(proxy: Proxy, up: UpstreamListener, tried: set[tuple[str, str]],
               route: tuple[DiscoveryChain, Target] | None) -> bool:
    now = trio.current_time()
    endpoints, _ = proxy.route_endpoints(up, route)
    return any((e.node, e.instance_id) not in tried and up.router.outlier.available(now, (e.node, e.instance_id))
               for e in endpoints)


async def _attempts(proxy: Proxy, up: UpstreamListener, c: _Client, r: _Request, call: Call | None = None,
                    first: Endpoint | None = None) -> None:
    """Instances until one answers, within the retry rules; raises _Answer when the mesh must.  ``call``:
    the first attempt, already under way in the reactor's turns (dataplane.http_turns), which made the
    checks before it and count it here as an attempt like any other; ``first``: the instance they
    chose for the first attempt and left to this task."""
    opts = up.options.http
    router = up.router
    route: tuple[DiscoveryChain, Target] | None = None
    if call is None:
        refused = router.admit()
        if refused is not None:
            up.stats[f"overflow_{refused}"] += 1
            raise _Answer(503, OVERFLOW, f"{up.service}: this agent's {refused} limit is reached")
        if not proxy.allowed_here(up):
            raise _Answer(403, DENIED, f"intentions refuse {up.options.source or '(no source)'} -> {up.service}")
        route = proxy.route_for(up, (r.method, r.target, r.headers))
        up.budget.request(trio.current_time())
    tried: set[tuple[str, str]] = set()
    refusing: set[str] = set()
    asked_refusing = 0
    attempts = 0
    last: _Answer | None = None
    idempotent = r.method in IDEMPOTENT
    paid = False

    def may_retry(body_sent: bool) -> bool:
        """Whether another attempt may follow this failed one; it takes a token from the budget."""
        nonlocal paid
        if attempts > opts.max_retries or (body_sent and not (idempotent and r.complete)):
            return False
        if not _has_other(proxy, up, tried, route):
            return False
        if not up.budget.try_retry(trio.current_time()):
            up.stats["http_retry_budget_exhausted"] += 1
            return False
        paid = True
        return True

    while True:
        st: PlainRead | None = None
        if call is not None:
            ic, attempt, st, reused, trial = call.ic, call.attempt, call.st, call.reused, False
            tried.add(attempt.key)
            call = None
        else:
            if attempts > 0 and not paid and not may_retry(body_sent=False):
                break
            paid = False
            if first is not None and route is None:
                endpoint: Endpoint | None = first
            else:
                endpoint = proxy.pick(up, frozenset(tried), frozenset(refusing), asked_refusing < MAX_ATTEMPTS,
                                      route)
            first = None
            if endpoint is None:
                break
            if attempts > 0:
                r.retries += 1
                up.stats["http_retries"] += 1
            key = (endpoint.node, endpoint.instance_id)
            # A half-open trial (dataplane.outlier): any 5xx it gets is retried elsewhere when the request
            # allows it, so a client does not pay for the mesh's look at an instance that was failing.
            trial = router.outlier.state(trio.current_time(), key) == "half-open"
            tried.add(key)
            r.instance, r.node = endpoint.instance_id, endpoint.node
            known_refusing = router.refuses(endpoint.node)
            attempt = router.attempt(trio.current_time(), key)

            def alternative(endpoint: Endpoint = endpoint, retry_left: bool = attempts < opts.max_retries) -> bool:
                """A failure could be retried elsewhere: a new tunnel is then waited for only its RTT bound."""
                return (retry_left and up.budget.can_retry(trio.current_time())
                        and proxy.has_alternative(up, endpoint, tried, refusing, route))

            try:
                ic = await proxy.instance_conn(up, endpoint, alternative)
            except Denied as exc:
                router.denied(trio.current_time(), attempt)
                refusing.add(endpoint.node)
                asked_refusing += known_refusing
                up.stats["refusals"] += 1
                last = _Answer(403, DENIED, str(exc))
                continue
            except ATTEMPT_ERRORS as exc:
                slow = isinstance(exc, trio.TooSlowError)
                router.failed(trio.current_time(), attempt, not isinstance(exc, DialAbandoned),
                              routing.TIMEOUT if slow else routing.CONNECT_FAILED)
                up.stats["attempts_failed"] += 1
                proxy.log("proxy_connect_failed", service=up.service, node=endpoint.node,
                          instance=endpoint.instance_id, error=str(exc) or type(exc).__name__)
                attempts += 1
                last = _Answer(503, CONNECT_FAILED, f"could not connect an instance of {up.service}: "
                                                    f"{str(exc) or type(exc).__name__}")
                continue  # it reached no instance: any method may go elsewhere
            except BaseException:
                router.failed(trio.current_time(), attempt, instance_fault=False)
                raise
            router.connected(trio.current_time(), attempt)
            # The request's latency sample starts as it goes out: a connect made for it (once per kept
            # connection) is not the instance's answer time, and would mark an instance slow for the
            # peak-EWMA's memory just for being new.
            attempt.started = trio.current_time()
            reused = ic.uses > 0
            ic.uses += 1
        attempts += 1
        try:
            await _exchange(proxy, up, c, r, ic, attempt, lambda: may_retry(body_sent=True), trial, reused, st)
        except _Retry as exc:
            last = exc.answer
            continue
        return
    if last is None:
        if refusing:
            raise _Answer(403, DENIED, f"intentions refuse {up.options.source or '(no source)'} -> {up.service}")
        up.stats["no_instance"] += 1
        proxy.log("proxy_no_instance", service=up.service)
        raise _Answer(503, NO_INSTANCE, f"no passing instance of {up.service}")
    raise last


async def _exchange(proxy: Proxy, up: UpstreamListener, c: _Client, r: _Request, ic: InstanceConn,
                    attempt: routing.Attempt, can_retry: Callable[[], bool], trial: bool, reused: bool,
                    st: PlainRead | None) -> None:
    """One request on one instance connection: raises _Retry, _Answer or _Reset when it fails.  ``st``:
    the request already went out in the reactor's turns, and its answer was read that far."""
    clean = False
    fault: str | None = None
    try:
        if st is None:  # the request goes out now (else the reactor's turns sent it, perhaps in part)
            if r.plain:
                out = r.wire
            else:
                h = ic.framer()
                out = h.send(h11.Request(method=r.method, target=r.target, headers=r.headers)) or b""
                if r.body:
                    out += h.send(h11.Data(data=bytes(r.body))) or b""
                if r.complete:
                    out += h.send(h11.EndOfMessage()) or b""
        else:
            out, st.unsent = st.unsent, b""
        if out:
            try:
                await _send(ic.stream, out)
            except _IO_ERRORS as exc:
                fault = None if reused else routing.RESET_BEFORE_REPLY
                raise _broken(r, can_retry, f"the connection to {r.instance} broke as the request went out: "
                                            f"{exc}") from None
        if r.plain:
            await _plain_response(up, c, r, ic, attempt, can_retry, reused, trial, st)
        elif r.complete:
            await _response(up, c, r, ic, attempt, can_retry, reused, trial)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stream_body, c, r, ic)
                await _response(up, c, r, ic, attempt, can_retry, reused, trial)
                nursery.cancel_scope.cancel()  # a full response before the body ended: the rest is not wanted
        clean = True
    except _Failed as exc:
        fault = exc.fault
        raise exc.outcome from None
    finally:
        now = trio.current_time()
        up.router.closed(now, attempt, fault, clean)
        if clean and ic.reusable():
            up.pool.give(ic, now)
        else:
            ic.stream.close_now()


class _Failed(Exception):
    """An attempt's failure, and whether it counts against the instance (a routing failure name)."""

    def __init__(self, outcome: _Retry | _Answer | _Reset, fault: str | None) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome
        self.fault = fault


def _broken(r: _Request, can_retry: Callable[[], bool], detail: str) -> _Retry | _Answer:
    answer = _Answer(502, UPSTREAM_RESET, detail)
    if not r.response_started and can_retry():
        return _Retry(answer)
    return answer


async def _stream_body(c: _Client, r: _Request, ic: InstanceConn) -> None:
    """The rest of a body larger than RETRY_BUFFER (or awaited behind 100-continue), as it comes."""
    while True:
        ev = await c.event()
        if isinstance(ev, h11.Data):
            await ic.stream.send_all(ic.framer().send(ev) or b"")
        elif isinstance(ev, h11.EndOfMessage):
            await ic.stream.send_all(ic.framer().send(ev) or b"")
            r.complete = True
            r.request_done()
            return
        else:
            raise h11.RemoteProtocolError("unexpected event in a request body", 400)


async def _receive(r: _Request, stream: Kept, can_retry: Callable[[], bool]) -> bytes | bytearray:
    """The instance's next bytes; a broken connection raised as the attempt's failure."""
    try:
        return await stream.receive_some(CHUNK)
    except _IO_ERRORS as exc:
        raise _receive_failure(r, exc, can_retry) from None


def _receive_failure(r: _Request, exc: BaseException, can_retry: Callable[[], bool]) -> _Failed:
    if r.response_started:
        return _Failed(_Reset(f"the connection to {r.instance} broke: {exc}"), routing.ANSWER_CUT_OFF)
    return _Failed(_broken(r, can_retry, f"the connection to {r.instance} broke: {exc}"), routing.RESET_BEFORE_REPLY)


def _closed_unanswered(up: UpstreamListener, r: _Request, can_retry: Callable[[], bool], reused: bool) -> _Failed:
    """Nothing came back.  On a kept connection this is most often the instance closing it just as
    the request went out (a keep-alive race), not a failing instance."""
    if reused:
        up.stats["http_stale_connections"] += 1
    return _Failed(_broken(r, can_retry, f"{up.service} instance {r.instance} closed the connection without "
                                         "answering"), None if reused else routing.CLOSED_BEFORE_REPLY)


def _broken_response(up: UpstreamListener, r: _Request, why: str) -> _Failed:
    """What the instance sent is not an HTTP response: a reset once the client has its start, else a 502
    that counts against the instance."""
    if r.response_started:
        return _Failed(_Reset(f"the response of {r.instance} broke off: {why}"), routing.ANSWER_CUT_OFF)
    up.stats["http_bad_responses"] += 1
    return _Failed(_Answer(502, BAD_RESPONSE, f"{up.service} instance {r.instance} sent a broken response: {why}"),
                   routing.BAD_RESPONSE)


def _final_head(up: UpstreamListener, r: _Request, attempt: routing.Attempt, status: int,
                can_retry: Callable[[], bool], trial: bool, now: float | None = None) -> None:
    """The instance's final answer is in: outlier detection counts it; a 5xx the request may be retried
    for (a retry_on status, or any answer to a half-open trial) raises the retry; else it is the
    answer (its head goes to the client when the caller sends it).  Whether to retry is asked first,
    before anything is counted: the reactor's turns (dataplane.http_turns) leave that question to
    the request's task, which then comes back here."""
    retry = status >= 500 and (status in up.options.http.retry_on or trial) and can_retry()
    up.router.answered(trio.current_time() if now is None else now, attempt, status < 500)
    if status >= 500:
        up.stats["http_5xx"] += 1
        if retry:
            raise _Failed(_Retry(_Answer(status, UPSTREAM_RESET, f"{up.service} instance {r.instance} "
                                                                  f"answered {status}")), None)
    r.status = status


async def _response(up: UpstreamListener, c: _Client, r: _Request, ic: InstanceConn,
                    attempt: routing.Attempt, can_retry: Callable[[], bool], reused: bool, trial: bool) -> None:
    """Carry the instance's response to the client whole, or raise _Failed."""
    h = ic.framer()
    stream = ic.stream
    got_bytes = False
    #: What is due to the client, sent when the instance makes us wait (or at the end): a small
    #: response goes out in one write, however many events h11 made of it.
    out = bytearray()
    client = c.h
    assert client is not None
    while True:
        try:
            ev = h.next_event()
        except h11.RemoteProtocolError as exc:
            raise _broken_response(up, r, str(exc)) from None
        if ev is h11.NEED_DATA:
            if out:
                await c.send_bytes(out)
                out.clear()
            data = await _receive(r, stream, can_retry)
            if data:
                got_bytes = True
            elif not got_bytes:
                raise _closed_unanswered(up, r, can_retry, reused)
            h.receive_data(bytes(data))
            continue
        if isinstance(ev, h11.Data):
            out += client.send(ev) or b""
            if len(out) >= CHUNK:
                await c.send_bytes(out)
                out.clear()
        elif isinstance(ev, h11.Response):
            status = ev.status_code
            _final_head(up, r, attempt, status, can_retry, trial)
            r.response_started = True
            out += client.send(h11.Response(status_code=status, headers=response_headers(list(ev.headers)),
                                            reason=ev.reason)) or b""
        elif isinstance(ev, h11.EndOfMessage):
            out += client.send(h11.EndOfMessage()) or b""
            await c.send_bytes(out)
            return
        elif isinstance(ev, h11.InformationalResponse):
            if ev.status_code == 100 and not client.they_are_waiting_for_100_continue:
                continue
            out += client.send(h11.InformationalResponse(status_code=ev.status_code,
                                                         headers=response_headers(list(ev.headers)),
                                                         reason=ev.reason)) or b""
        else:  # ConnectionClosed before the end: h11 raised above for a framed body, so this is a close
            raise _Failed(_Reset("the instance closed before the response ended"), routing.ANSWER_CUT_OFF)


class PlainRead:
    """How far the instance's answer to a request of the common path has been read; shared by the
    request's task (_plain_response) and the reactor's turns (dataplane.http_turns), which hand it on."""

    __slots__ = ("resp", "interim", "got_bytes", "out", "done", "error", "read_error", "unsent", "answered",
                 "head")

    def __init__(self) -> None:
        self.resp = Response()
        self.interim = 0
        self.got_bytes = False
        #: Due to the client and not sent yet.
        self.out = bytearray()
        #: The response is complete (``out`` may still hold its end).
        self.done = False
        #: What the turns met and the task raises in their place, as if it had met it itself.
        self.error: BaseException | None = None
        #: What reading the instance's connection raised in the turns (as _receive would meet it).
        self.read_error: BaseException | None = None
        #: The end of the request, which the instance's socket did not take at once.
        self.unsent = b""
        #: The final head went through _final_head.
        self.answered = False
        #: The final head, held back until the body is complete (plain_advance says when).
        self.head: bytes | None = None


def plain_feed(up: UpstreamListener, r: _Request, st: PlainRead, data: bytes | bytearray,
               reused: bool, can_retry: Callable[[], bool]) -> None:
    """The instance's next bytes (``b""``: its end) into the response; raises _Failed when they end
    the attempt."""
    resp = st.resp
    if not data:
        if resp.until_close:  # RFC 9112 §6.3 rule 8: the end of the connection ends the body
            resp.done = True
            st.out += resp.take_body()
            st.done = True
            return
        if not st.got_bytes:
            raise _closed_unanswered(up, r, can_retry, reused)
        if not r.response_started:  # a held answer (plain_advance): nothing reached the client
            raise _Failed(_broken(r, can_retry, f"{up.service} instance {r.instance} closed the connection "
                                                "before its answer ended"),
                          routing.ANSWER_CUT_OFF if st.answered else None)
        raise _broken_response(up, r, "the connection closed before the response ended")
    try:
        resp.feed(data)
    except httptools.HttpParserError as exc:
        raise _parse_failure(up, r, st, exc, reused, can_retry) from None
    st.got_bytes = True


def _parse_failure(up: UpstreamListener, r: _Request, st: PlainRead, exc: httptools.HttpParserError,
                   reused: bool, can_retry: Callable[[], bool]) -> _Failed:
    if reused and not st.got_bytes:
        # What a kept connection held before this request's answer: the rest of an earlier
        # response that claimed to have none (a body after a 204, say), arriving late.  The
        # connection is unfit, the instance not at fault: as a stale connection.
        up.stats["http_stale_connections"] += 1
        return _Failed(_broken(r, can_retry, f"a kept connection to {r.instance} held stray bytes: {exc}"), None)
    return _broken_response(up, r, str(exc))


def plain_advance(up: UpstreamListener, r: _Request, attempt: routing.Attempt, st: PlainRead,
                  can_retry: Callable[[], bool], trial: bool, now: float | None = None) -> None:
    """Turn what has been parsed into what is due to the client (``st.out``); sets ``st.done``.

    An answer with a Content-Length body of at most RETRY_BUFFER is held until it is complete, head
    and all: an instance that dies in the middle of it (killed between its head and its body, say)
    has then sent the client nothing, and the request may still be retried elsewhere, or answered
    502, instead of resetting a client whose answer had begun.  Larger and chunked bodies go on as
    they come."""
    resp = st.resp
    while st.interim < len(resp.interim):
        status, reason, fields = resp.interim[st.interim]
        st.interim += 1
        if status != 100:  # a 100 no client of this path waits for (it sent no Expect)
            st.out += head_bytes(status, reason, response_headers(fields))
    if resp.head_done and not st.answered:
        status = resp.status
        _final_head(up, r, attempt, status, can_retry, trial, now)
        st.answered = True
        if resp.until_close or r.close:
            r.close = True
            st.head = head_bytes(status, resp.reason, response_headers(resp.headers) + [(b"connection", b"close")])
        else:
            st.head = resp.raw_head or head_bytes(status, resp.reason, response_headers(resp.headers))
    if st.head is not None and (resp.done or resp.chunked or resp.length is None or resp.length > RETRY_BUFFER):
        st.out += st.head
        st.head = None
        r.response_started = True
    if r.response_started:
        st.out += resp.take_body()
    if resp.done:
        st.done = True


async def _plain_response(up: UpstreamListener, c: _Client, r: _Request, ic: InstanceConn,
                          attempt: routing.Attempt, can_retry: Callable[[], bool], reused: bool,
                          trial: bool, st: PlainRead | None = None) -> None:
    """_response for a request of the common path: the same outcomes, read by httptools.  ``st``: where
    the reactor's turns left it (dataplane.http_turns)."""
    if st is None:
        st = PlainRead()
    else:
        if isinstance(st.error, httptools.HttpParserError):
            raise _parse_failure(up, r, st, st.error, reused, can_retry)
        if st.error is not None:
            raise st.error
        if st.read_error is not None:
            raise _receive_failure(r, st.read_error, can_retry)
        plain_advance(up, r, attempt, st, can_retry, trial)
    while not st.done:
        if st.out:
            await c.send_bytes(st.out)
            st.out.clear()
        data = await _receive(r, ic.stream, can_retry)
        plain_feed(up, r, st, data, reused, can_retry)
        if data:
            plain_advance(up, r, attempt, st, can_retry, trial)
    await c.send_bytes(st.out)
    st.out.clear()
    if not st.resp.until_close:
        ic.clean = st.resp.keep_alive()
