"""A stream of a tunnel session: one proxied connection, with trio's stream semantics.

The session hands a stream what the peer sent (``on_data``, ``on_eof``,
``fail``) and wakes its waiting sender (``wake_sender``); the stream asks the
session for room and credit and hands it what to send.  Its two pumps are the
proxy's fast paths between a tunnel and a raw socket (docs/dataplane.md,
"Copies" and "The reactor").
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

import trio

from dataplane import mux
from dataplane.rawsocket import Fairness, RawSocketStream, SocketPump

if TYPE_CHECKING:
    from dataplane.session import TunnelSession

__all__ = ["SCRATCH_SIZE", "WHOLE_MAX", "ChunkReader", "StreamResetError", "TunnelStream", "new_scratch"]

#: The scratch buffer pump_from reads a proxied socket into: room for a mux
#: header, then a full record's data.
SCRATCH_SIZE: Final = mux.DEFAULT_MAX_RECORD
_DIRECT_MAX: Final = SCRATCH_SIZE - mux.HEADER_SIZE
#: The most ``try_send_whole`` sends.
WHOLE_MAX: Final = _DIRECT_MAX


def new_scratch() -> memoryview:
    """A scratch buffer for the streams of one trio run.  They may share it: a stream fills
    it and seals it into the session's send buffer with no scheduling point in between, so
    no two streams ever hold it at once."""
    return memoryview(bytearray(SCRATCH_SIZE))


class StreamResetError(trio.BrokenResourceError):
    """The stream was reset by the peer (``code`` is its mux ResetCode) or its session died
    (``code`` is None); either way the data it carried is incomplete."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ChunkReader(Protocol):
    """Who reads a stream in the session's reader (TunnelStream.read_by)."""

    def on_chunk(self, data: memoryview | bytes) -> bool:
        """Take ``data`` (a view the session reuses: what is kept is copied); False to decline it."""

    def on_end(self) -> None:
        """The stream ended or failed: the next ``receive_some`` tells which."""


class TunnelStream(SocketPump):
    """One proxied connection inside a session, with trio's stream semantics.

    * ``send_all`` waits while the stream's send buffer is full (the peer's
      reader is slow, or the session is busy): backpressure, never unbounded memory.
    * ``receive_some`` returns data, hands the credit back to the peer, and
      returns ``b""`` only after the peer's ``send_eof``.
    * ``send_eof`` half-closes; ``aclose`` resets the stream unless ``send_eof``
      was called first and no received data was left unread.
    * Failure of the stream or its session raises :class:`StreamResetError`.
    """

    def __init__(self, session: TunnelSession, stream_id: int, header: bytes, *, local: bool) -> None:
        self._session = session
        #: Where pump_from reads its source: the manager's, shared by all its streams.
        self._scratch = session.scratch
        self.stream_id = stream_id
        self.header = header
        self.peer = session.peer
        #: True if we opened it, False if the peer did.
        self.local = local
        #: Received data not yet read: the mux's chunks, as they came.
        self._buf: deque[bytes | memoryview] = deque()
        #: Set while pump_into runs: the socket the reader may write into directly.
        self._sink: RawSocketStream | None = None
        #: Set while the reactor's turns read this stream (read_by).
        self._reader: ChunkReader | None = None
        self._delivered: Callable[[int], None] | None = None
        self._sink_busy = False
        self._buffered = 0
        self._fair = Fairness()
        self._eof_received = False
        self._eof_sent = False
        #: Shown every byte received, and every byte pump_from reads for the stream (watch()).
        self._tap_in: Callable[[bytes | memoryview], None] | None = None
        self._tap_out: Callable[[bytes | memoryview], None] | None = None
        self._closed = False
        self._failure: tuple[str, int | None] | None = None
        self._recv_event = trio.Event()
        self._send_event = trio.Event()
        self._receiving = False
        self._sending = False

    def __repr__(self) -> str:
        return f"<TunnelStream {self.peer}#{self.stream_id}>"

    # -- called by the session ----------------------------------------------------

    def fail(self, reason: str, code: int | None) -> None:
        """The stream was reset (``code``: the peer's ResetCode) or its session died (None)."""
        if self._failure is None:
            self._failure = (reason, code)
        self._buf.clear()
        self._buffered = 0
        self._recv_event.set()
        self._send_event.set()
        if self._reader is not None:
            self._reader.on_end()

    def on_data(self, data: bytes | memoryview) -> bool:
        """Take data the peer sent: straight into the sink socket when one is set and
        keeping up, else queued for the reader; False if the application closed the
        stream (the session resets it, as TCP would).

        ``data`` is a view of the session's decrypt buffer: what is kept is copied.
        Credit goes back to the peer only for bytes the socket accepted, so a slow
        client still slows the sender.
        """
        if self._closed:
            return False
        if self._tap_in is not None:
            self._tap_in(data)
        reader = self._reader
        if reader is not None and not self._buf and reader.on_chunk(data):
            self._session.mux.consumed(self.stream_id, len(data))
            return True
        sink = self._sink
        if sink is not None and not self._buf and not self._sink_busy:
            try:
                n = sink.try_send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                n = 0  # pump_into meets the error itself when it sends this
            if n:
                self._session.mux.consumed(self.stream_id, n)
                assert self._delivered is not None
                self._delivered(n)
                if n == len(data):
                    return True
                data = data[n:]
        self._buf.append(bytes(data))
        self._buffered += len(data)
        self._recv_event.set()
        return True

    def on_eof(self) -> None:
        """The peer half-closed: ``receive_some`` returns ``b""`` once the data is read."""
        self._eof_received = True
        self._recv_event.set()
        if self._reader is not None:
            self._reader.on_end()

    def wake_sender(self) -> None:
        """Room in the send buffer, or the peer's credit, for a sender the session holds waiting."""
        self._send_event.set()

    def read_by(self, reader: ChunkReader | None) -> None:
        """Hand what arrives from now on to ``reader`` (None: to ``receive_some`` again), in the session's
        reader, as it arrives: the reactor's turns of the HTTP layer read answers so
        (dataplane.http_turns), waking no task.  What the reader declines is kept for ``receive_some``
        as usual, and so is all that follows it, in order."""
        self._reader = reader

    def unusable(self) -> bool:
        """Closed by the application, or failed: no sender on it will wait for room again."""
        return self._closed or self._failure is not None

    def watch(self, received: Callable[[bytes | memoryview], None] | None,
              sent: Callable[[bytes | memoryview], None] | None) -> None:
        """Show each byte received from now on (and what is held unread now) to ``received``, and
        each byte ``pump_from`` reads for this stream to ``sent``, as they pass, unchanged.

        The far end's HTTP observer watches this way, so its streams keep the
        direct paths (the taps see the very views those paths send from, and
        must not keep them).  Taps must not raise.
        """
        self._tap_in, self._tap_out = received, sent
        if received is not None:
            for chunk in self._buf:
                received(chunk)

    def at_rest(self) -> bool:
        """Open both ways with nothing received unread: a kept stream that may carry another request
        (the HTTP layer's pool asks before reusing one; a peer that ended it meanwhile shows here)."""
        return not (self._closed or self._failure is not None or self._eof_received or self._eof_sent or self._buf)

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this tunnel stream was closed")
        if self._failure is not None:
            raise StreamResetError(*self._failure)

    # -- trio.abc.ReceiveStream -----------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            # A cancel point always, a scheduling point only when it waits or every
            # YIELD_EVERY calls (dataplane.rawsocket says why).  Between the cancel
            # point and the return all is synchronous, so a reset that lands
            # meanwhile can never turn into a short read.
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                self._raise_if_unusable()
                if self._buf:
                    data = self._take(max_bytes)
                    self._session.consumed(self.stream_id, len(data))
                    await self._fair.quick()
                    return data
                if self._eof_received:
                    await self._fair.quick()
                    return b""
                self._recv_event = trio.Event()
                self._fair.waited()
                await self._recv_event.wait()
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        """Up to ``max_bytes`` of the received chunks; a lone chunk that fits is handed over uncopied."""
        buf = self._buf
        first = buf[0]
        if len(buf) == 1 and isinstance(first, bytes) and (max_bytes is None or len(first) <= max_bytes):
            buf.clear()
            self._buffered = 0
            return first
        limit = self._buffered if max_bytes is None else min(max_bytes, self._buffered)
        parts: list[bytes | memoryview] = []
        mux.take_chunks(buf, limit, parts)
        self._buffered -= limit
        return b"".join(parts)

    async def pump_into(self, sink: RawSocketStream, delivered: Callable[[int], None]) -> None:
        """Copy everything this stream receives into ``sink``, then half-close it.

        While the sink keeps up, the session's reader writes each arriving chunk
        straight into the sink's socket (``on_data``), so a proxied byte costs no
        hand-off from the reader task to this one; this task only carries what
        the socket did not take at once, and the end of the stream.  Credit goes
        back to the peer only for bytes the socket accepted, so a slow client
        still slows the sender.  ``delivered(n)`` is called for every n bytes
        handed to the sink.  Raises like ``receive_some`` and ``sink.send_all``.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        self._sink = sink
        self._delivered = delivered
        try:
            while True:
                await trio.lowlevel.checkpoint_if_cancelled()
                self._raise_if_unusable()
                if self._buf:
                    data = self._take(None)
                    # Until this is out, arriving data queues behind it (order).
                    self._sink_busy = True
                    try:
                        await sink.send_all(data)
                    finally:
                        self._sink_busy = False
                    self._session.consumed(self.stream_id, len(data))
                    delivered(len(data))
                    continue
                if self._eof_received:
                    await sink.send_eof()
                    return
                self._recv_event = trio.Event()
                await self._recv_event.wait()
        finally:
            self._sink = None
            self._delivered = None
            self._receiving = False

    # -- trio.abc.SendStream --------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await self._send_all(data)
        finally:
            self._sending = False

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        with memoryview(data) as whole:
            view = whole.cast("B")
            while view:
                self._check_sendable()
                room = self._session.writable(self)
                if room == 0:
                    waited = True
                    self._fair.waited()
                    await self._wait_writable()
                    continue
                if room >= len(view) and len(view) == len(whole) and isinstance(data, bytes):
                    self._session.send(self.stream_id, data)  # kept as is: no copy
                else:
                    self._session.send(self.stream_id, view[:room])
                view = view[room:]
        if not waited:
            await self._fair.quick()

    def try_send_whole(self, data: bytes | bytearray | memoryview) -> bool:
        """Send all of ``data`` now as one record by the direct path (no queue, no scheduling
        point) and True, or nothing and False: then ``send_all`` is the way.

        For a message a caller holds whole (an HTTP request): the direct path's
        rules hold (dataplane.mux.direct_room), so the wire carries what
        ``send_all`` would have sent, in the same order.
        """
        n = len(data)
        if (self._sending or self._closed or self._failure is not None or self._eof_sent or not n
                or n > _DIRECT_MAX or self._session.direct_room(self) < n):
            return False
        scratch = self._scratch
        scratch[mux.HEADER_SIZE : mux.HEADER_SIZE + n] = data
        if self._tap_out is not None:
            self._tap_out(scratch[mux.HEADER_SIZE : mux.HEADER_SIZE + n])
        self._session.send_direct(self, scratch[: mux.HEADER_SIZE + n])
        return True

    async def pump_from(self, source: RawSocketStream, delivered: Callable[[int], None], chunk: int) -> None:
        """Copy everything ``source`` receives into this stream, then half-close it.

        The mirror of ``pump_into``.  While nothing is queued on the session,
        each read lands in a buffer behind room for the mux header and is sealed
        and sent from there (``TunnelSession.send_direct``): no bytes object per read,
        no queue, no copy, and the cipher reads what the kernel just wrote, still
        in cache.  Otherwise up to ``chunk`` bytes are read and queued as
        ``send_all`` would, so credit, send-buffer limits and the fair turns of
        streams are what they always were.  ``delivered(n)`` is called for every
        n bytes taken from ``source``.  Raises like ``source.receive_some`` and
        ``send_all``.
        """
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        session = self._session
        reactor = session.reactor
        step = functools.partial(self._direct_step, source, delivered)
        try:
            while True:
                # As RawSocketStream._receive does: after a read that emptied the
                # socket, wait for readiness instead of a receive that would fail.
                if source.emptied:
                    self._fair.waited()
                    # A cancel point too.  In the reactor, _direct_step does the
                    # direct path's work without waking this task.
                    if reactor.running:
                        await source.wait_readable_in(reactor, step)
                    else:
                        await source.wait_readable()
                else:
                    await trio.lowlevel.checkpoint_if_cancelled()
                self._raise_if_unusable()
                # After an EOF sent early (the proxy's first bytes), only the
                # source's own end may follow, which the queued path handles.
                room = 0 if self._eof_sent else session.direct_room(self)
                if room:
                    n = self._send_read(source, delivered, room)
                    if n is None:
                        continue
                    if not n:
                        break
                    if self._fair.due():
                        await trio.lowlevel.cancel_shielded_checkpoint()
                elif session.out_full():
                    # The kernel lags: wait for it rather than read more and queue
                    # it (TCP's own backpressure then reaches the source).
                    self._fair.waited()
                    await session.wait_out_room()
                elif not self._eof_sent and session.mux.out_of_credit(self.stream_id):
                    # Wait for the peer's credit too rather than read ahead into
                    # the queue, so that the stream stays on the direct path.
                    self._fair.waited()
                    await self._wait_writable(session.awaiting_credit)
                else:
                    data = await source.receive_some(chunk)
                    if not data:
                        break
                    if self._tap_out is not None:
                        self._tap_out(data)
                    await self._send_all(data)
                    delivered(len(data))
        finally:
            self._sending = False
        await self.send_eof()

    def _direct_step(self, source: RawSocketStream, delivered: Callable[[int], None]) -> bool:
        """pump_from's direct path for one readable moment of its source, run by
        the reactor (dataplane.reactor); False when the pump's task must act:
        no room on the direct path, the source's end, or the stream's."""
        if self._closed or self._failure is not None or self._eof_sent:
            return False
        room = self._session.direct_room(self)
        return bool(room) and self._send_read(source, delivered, room) != 0

    def _send_read(self, source: RawSocketStream, delivered: Callable[[int], None], room: int) -> int | None:
        """Read up to ``room`` (a ``direct_room``) bytes of ``source`` into a record and
        send it at once; the count read, 0 at the source's end, None if it had nothing."""
        # From the read to the send, nothing yields: the scratch buffer is ours.
        scratch = self._scratch
        n = source.try_receive_into(scratch[mux.HEADER_SIZE : mux.HEADER_SIZE + min(room, _DIRECT_MAX)])
        if n:
            if self._tap_out is not None:
                self._tap_out(scratch[mux.HEADER_SIZE : mux.HEADER_SIZE + n])  # before it is sealed in place
            self._session.send_direct(self, scratch[: mux.HEADER_SIZE + n])
            delivered(n)
        return n

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            while not (self._closed or self._failure or self._eof_sent) and self._session.writable(self) == 0:
                await self._wait_writable()
        finally:
            self._sending = False

    async def _wait_writable(self, waiters: set[TunnelStream] | None = None) -> None:
        """Until the session wakes this stream from ``waiters`` (default: ``blocked``,
        room in the send buffer; ``awaiting_credit``: the peer's credit)."""
        waiters = self._session.blocked if waiters is None else waiters
        self._send_event = trio.Event()
        waiters.add(self)
        try:
            await self._send_event.wait()
        finally:
            waiters.discard(self)

    def _check_sendable(self) -> None:
        self._raise_if_unusable()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was already called on this stream")

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._eof_sent and not self._closed:
            return
        self._raise_if_unusable()
        self._eof_sent = True
        self._session.close_stream(self)

    # -- trio.abc.AsyncResource -----------------------------------------------------

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """Synchronous ``aclose`` (usable in ``finally`` blocks and cancelled scopes)."""
        if self._closed:
            return
        self._closed = True
        self._recv_event.set()
        self._send_event.set()
        if self._failure is None:
            self._session.local_close(self, clean=self._eof_sent and not self._buf)
        self._buf.clear()
        self._buffered = 0

