"""The common request shape carried in the reactor's turns: a request in, its answer out, no task woken.

Why: in ``tcp`` mode the calling agent's bytes never wake a task.  A client's
request is read, sealed and sent from the reactor's callback for the client's
socket, and the answer goes from the session's reader straight into the
client's socket (dataplane.stream's direct paths).  The HTTP layer's task, by
contrast, was woken twice per request: once for the client's request, once
for the instance's answer, each a trip through trio's scheduler and a chain of
coroutines resumed.  Those trips were most of what ``http`` mode cost beyond
``tcp`` mode.

So a request of the common path (dataplane.http_fastpath) that needs no
waiting is carried here, in the reactor's callbacks: the client's socket is
readable, the request is parsed, an instance is chosen by the same router, a
kept connection to it is taken from the pool and the request is sent on it at
once; the answer is read as the session's reader delivers it
(TunnelStream.read_by), or, from an instance on this node, as its socket's own
watch in the reactor reads it (Reactor.watch), re-framed, and sent to the
client at once; the connection goes back to the pool and the request is
recorded.  The task that owns the client connection stays parked in the
reactor all along.

Everything else is the task's, and nothing is decided twice:

* before a request goes out, anything that would need a wait or a decision
  of the slow path (no kept connection to the chosen instance, a half-open
  trial, a discovery chain, intentions that refuse, full limits, a send that
  would queue) leaves the request unsent in the client's buffer, and the task
  carries it as it always did, to the instance already chosen;
* once it went out, anything but the plain course of the answer (a status the
  request may be retried for, bytes that are no HTTP, the connection's end, a
  client that does not take the answer at once, a timeout, the client's end,
  a local instance's socket that took only part of the request) hands the
  request over to the task (a ``Call``), as far as it got: the task
  goes on from there in dataplane.http_proxy with its retries, answers and
  counting, the first attempt counted as one.

Callbacks never raise into the session's reader: what goes wrong there is kept
in the call and raised in the task, as if it had met it itself.
"""

from __future__ import annotations

import math
from time import perf_counter
from typing import TYPE_CHECKING, cast

import httptools
import trio

from dataplane.http_fastpath import MAX_HEAD, SLOW, PlainRequest, SlowPath, forward_bytes, parse_request
from dataplane.http_proxy import Call, _Client, _next_request, _record, plain_advance, plain_state
from dataplane.rawsocket import RawSocketStream
from dataplane.stream import WHOLE_MAX, TunnelStream

if TYPE_CHECKING:
    from dataplane.proxy import Endpoint, Proxy, UpstreamListener
    from dataplane.reactor import Reactor

__all__ = ["Turns"]


def clock_offset(clock: trio.abc.Clock) -> float | None:
    """What trio's SystemClock adds to perf_counter(), so the clock can be read with no Python call at
    all; None for any other clock (a test's MockClock), or one that does not read so."""
    offset = getattr(clock, "offset", None)
    if type(clock).__name__ != "SystemClock" or not isinstance(offset, float):
        return None
    return offset if abs(offset + perf_counter() - clock.current_time()) < 0.001 else None


def _never() -> bool:
    return False


def _release(call: Call) -> None:
    """The callbacks stop reading the call's connection: the task may read it, or the pool keep it."""
    stream = call.ic.stream
    if isinstance(stream, TunnelStream):
        stream.read_by(None)
    else:
        cast(RawSocketStream, stream).unwatch()


class Turns:
    """One client connection's requests, carried in the reactor's callbacks while they can be."""

    __slots__ = ("proxy", "up", "c", "reactor", "view", "searched", "call", "ready", "picked", "handing",
                 "active", "closing", "clock", "offset")

    def __init__(self, proxy: Proxy, up: UpstreamListener, c: _Client, reactor: Reactor) -> None:
        self.proxy = proxy
        self.up = up
        self.c = c
        self.reactor = reactor
        self.view = memoryview(bytearray(MAX_HEAD))
        self.searched = [0]
        #: The request under way in the callbacks.
        self.call: Call | None = None
        #: A complete request the callbacks leave to the task.
        self.ready: PlainRequest | SlowPath | None = None
        #: The instance they chose for it, which the task then tries first: choosing again would
        #: take a second turn of round robin, and starve the instance the first one fell on.
        self.picked: Endpoint | None = None
        #: The callbacks want the task to take the request under way.
        self.handing = False
        #: When the connection last carried a request to its end (its idle timeout runs from there).
        self.active = trio.current_time()
        #: The last request asked for the connection's end.
        self.closing = False
        #: trio.current_time without its calls of indirection: the callbacks read it for every request,
        #: as ``offset + perf_counter()`` when they can (clock_offset), else by calling this.
        clock = trio.lowlevel.current_clock()
        self.clock = clock.current_time
        self.offset = clock_offset(clock)

    def take_picked(self) -> Endpoint | None:
        """The instance chosen for the request ``next`` just returned, if the callbacks chose one."""
        picked, self.picked = self.picked, None
        return picked

    async def next(self) -> Call | PlainRequest | SlowPath | None:
        """Park in the reactor while its callbacks carry the client's requests; what the task must
        carry next: a request they started and hand over, one they leave to it (as
        ``_next_request`` returns them), or None when the connection is done.

        The park's deadline is never moved by the callbacks (moving a cancel scope's deadline costs
        more than the rest of a request's turn): it is the idle timeout's, or the soonest a request
        started meanwhile could time out, whichever comes first; a wake-up that finds nothing due
        parks again."""
        c = self.c
        idle = self.up.options.idle_timeout
        timeout = self.up.options.http.timeout
        try:
            while True:
                now = trio.current_time()
                call = self.call
                if call is not None:
                    due = call.r.started + timeout if timeout > 0 else math.inf
                    if self.handing or now >= due or not self.reactor.running:
                        self.call = None
                        self.handing = False
                        self.up.stats["http_handed_over"] += 1
                        _release(call)
                        return call
                    deadline = due  # between requests the idle timeout, during one the request's
                else:
                    req, self.ready = self.ready, None
                    if req is None and not self.closing:
                        req = parse_request(c.buf, self.searched)
                    if req is not None:
                        self.searched[0] = 0
                        return req
                    if self.closing:
                        return None
                    if c.eof:
                        return SLOW if c.buf else None  # h11 tells an incomplete request's client so
                    deadline = self.active + idle if idle > 0 else math.inf
                    if now >= deadline:
                        self.up.stats["idle_timeouts"] += 1
                        return None
                    if not self.reactor.running:
                        return await _next_request(self.up, c)
                    if timeout > 0:
                        deadline = min(deadline, now + timeout)
                with trio.move_on_at(deadline):
                    await c.stream.wait_readable_in(self.reactor, self.on_client)
        except BaseException:
            if self.call is not None:
                self._abandon()
            raise

    # -- in the reactor -------------------------------------------------------------------------

    def on_client(self) -> bool:
        """The client's socket is readable: read, and start what can be started; False wakes the task."""
        c = self.c
        n = c.stream.try_receive_into(self.view)
        if n is None:
            return True
        if n == 0:
            c.eof = True
            self.handing = self.call is not None
            return False
        c.stats["bytes_out"] += n
        c.buf += self.view[:n]
        if self.call is not None:
            # Pipelined behind the request under way: kept for after its answer, up to a head's worth.
            if len(c.buf) <= MAX_HEAD:
                return True
            self.handing = True
            return False
        req = parse_request(c.buf, self.searched)
        if req is None:
            return True
        if isinstance(req, PlainRequest) and self._start(req):
            return not self.handing  # (sent in part: the task sends the rest)
        self.ready = req
        return False

    def _start(self, req: PlainRequest) -> bool:
        """Send ``req`` on a kept connection now (all of it, or on a local instance's socket at least
        a part), or nothing and False (the module docstring says when)."""
        proxy, up, c = self.proxy, self.up, self.c
        router = up.router
        opts = up.options
        if router.refusal() is not None:
            return False  # the task refuses it, and counts it
        if proxy.chains is not None and proxy.chains.chain_for(up.service) is not None:
            return False
        if not proxy.authorizer.authorize(proxy.local_node, opts.source, up.service).allowed:
            return False
        out = forward_bytes(req, c.address)
        if len(out) > WHOLE_MAX:
            return False  # decided before the pick: a pick made twice would skew round robin
        offset = self.offset
        now = offset + perf_counter() if offset is not None else self.clock()
        endpoint = proxy.pick(up, now=now)
        if endpoint is None:
            return False
        self.picked = endpoint
        key = (endpoint.node, endpoint.instance_id)
        if router.picked_state == "half-open":
            return False
        ic = up.pool.take(key, now)
        if ic is None:
            return False
        stream = ic.stream
        unsent = b""
        if isinstance(stream, TunnelStream):
            if not stream.try_send_whole(out):
                up.pool.restore(ic)
                return False
        elif isinstance(stream, RawSocketStream):  # an instance on this node
            try:
                sent = stream.try_send(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                sent = 0  # the task's take finds it unfit (at_rest) and closes it
            if not sent:
                up.pool.restore(ic)
                return False
            unsent = out[sent:]  # the task sends the rest (below)
        else:
            up.pool.restore(ic)
            return False
        self.picked = None
        del c.buf[:req.length]
        self.searched[0] = 0
        r = plain_state(req, out, opts.http.timeout, now)
        r.instance, r.node = endpoint.instance_id, endpoint.node
        up.stats["http_requests"] += 1
        up.budget.request(now)
        attempt = router.attempt(now, key)
        router.connected(now, attempt)
        call = self.call = Call(r, ic, attempt, reused=ic.uses > 0)
        ic.uses += 1
        if isinstance(stream, TunnelStream):
            stream.read_by(self)
        elif unsent:
            call.st.unsent = unsent
            self.handing = True  # the task waits for the instance's socket to take the rest
        else:
            stream.watch_in(self.reactor, self.on_local, self.on_local_end)
        return True

    def on_chunk(self, data: memoryview | bytes) -> bool:
        """The instance's answer, as the session's reader delivers it (TunnelStream.read_by)."""
        call = self.call
        if call is None:
            return False
        self._answer(call, data)
        return True

    def on_end(self) -> None:
        """The instance's connection ended or failed under the request: the task finds out which."""
        if self.call is not None:
            self._hand_over()

    def on_local(self) -> bool:
        """A local instance's socket is readable (RawSocketStream.watch_in): read its answer."""
        call = self.call
        if call is None:
            return False
        n = cast(RawSocketStream, call.ic.stream).try_receive_into(self.view)
        if n is None:
            return True
        if n == 0:
            return False  # the end: on_local_end hands it over, and the task reads the end again
        self._answer(call, self.view[:n])
        return True

    def on_local_end(self, error: BaseException | None) -> None:
        """The local instance's watch ended by itself: its end, an error reading it, or the reactor's."""
        call = self.call
        if call is None:
            return
        if error is not None:
            call.st.read_error = error
        self._hand_over()

    def _answer(self, call: Call, data: memoryview | bytes) -> None:
        """The instance's next bytes: on to the client if the answer runs its plain course."""
        up, r, st = self.up, call.r, call.st
        try:
            try:
                st.resp.feed(data)
            except httptools.HttpParserError as exc:
                st.error = exc  # the task tells a stale connection from a broken answer
                self._hand_over()
                return
            st.got_bytes = True
            resp = st.resp
            if (resp.head_done and not st.answered and resp.status >= 500
                    and resp.status in up.options.http.retry_on):
                self._hand_over()  # whether to retry is the task's to decide (and to pay for)
                return
            offset = self.offset
            now = offset + perf_counter() if offset is not None else self.clock()
            plain_advance(up, r, call.attempt, st, _never, False, now)
            if st.out:
                n = self.c.stream.try_send(st.out)
                self.c.stats["bytes_in"] += n
                del st.out[:n]
                if st.out:
                    self._hand_over()  # the client is slow to take it: the task waits for it
                    return
        except Exception as exc:
            st.error = exc
            self._hand_over()
            return
        if st.done:
            self._finish(call, now)

    # -- ends -----------------------------------------------------------------------------------

    def _hand_over(self) -> None:
        call = self.call
        assert call is not None
        self.handing = True
        _release(call)
        self.reactor.wake(self.c.stream.raw)

    def _finish(self, call: Call, now: float) -> None:
        """The answer went out whole: the connection goes back to the pool, the request is recorded."""
        ic = call.ic
        ic.clean = call.st.resp.keep_alive()
        if not ic.reusable():
            self._hand_over()  # the task closes it, out of the session's reader
            return
        _release(call)
        self.call = None
        up = self.up
        up.router.closed(now, call.attempt, None, True)
        up.pool.keep(ic, now)
        _record(self.proxy, up, call.r, now)
        up.stats["http_in_turns"] += 1
        self.active = now
        if call.r.close or self.c.buf:
            self.closing = call.r.close
            self.reactor.wake(self.c.stream.raw)

    def _abandon(self) -> None:
        """The task is leaving (cancelled, or the client failed) with a request under way here."""
        call = self.call
        assert call is not None
        self.call = None
        _release(call)
        self.up.router.closed(trio.current_time(), call.attempt, None, False)
        call.ic.stream.close_now()
        _record(self.proxy, self.up, call.r)

