"""Encrypted tunnels between agents: Noise_IK handshakes, one session per peer, many streams.

Every pair of agents shares at most one long-lived *session*: a TCP connection
that has run one Noise_IK handshake (:mod:`dataplane.noise`) and then carries
the records of a stream multiplexer (:mod:`dataplane.mux`).  Every proxied
connection is a *stream* on it, so a new proxied connection costs neither a
handshake nor a round trip.  Keys are renewed in band by a fresh handshake, so
a stolen key opens minutes of traffic at most and no stream waits for it; a
responder admits only keys that membership vouches for; and any failure kills
the session loudly, so a proxied connection is reset rather than silently
truncated.  This module is the trio driver that joins the two sans-I/O
machines to sockets; the few pure pieces (the handshake payloads) are plain
functions at the top.

See docs/dataplane.md, "Tunnels" (wire format, rekey, who may connect, one
session per pair, failure, tasks).
"""

from __future__ import annotations

import functools
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Final, Literal, Protocol

import nacl.bindings
import structlog
import trio

from dataplane import mux, relay
from dataplane.noise import MAX_MESSAGE, MAX_NONCE, TAGLEN, CipherState, HandshakeState, NoiseError
from dataplane.rawsocket import Fairness, RawSocketStream
from dataplane.reactor import Reactor

__all__ = [
    "MAGIC",
    "PREAMBLE",
    "VERSION",
    "PeerDirectory",
    "StreamHandler",
    "StreamResetError",
    "TunnelError",
    "TunnelManager",
    "TunnelStream",
    "decode_hello",
    "encode_hello",
    "tai64n",
]

MAGIC: Final = b"MESH"
#: 2: sessions rekey in band (tunnel control records); a version-1 agent would
#: take the first rekey record for a mux protocol violation, so the two must not pair.
VERSION: Final = 2
#: Sent unframed before message 1, and used as the Noise prologue.
PREAMBLE: Final = MAGIC + bytes([VERSION])

#: TAI64 labels count from 2^62; TAI was 10 s ahead of UTC in 1970 (as in WireGuard).
_TAI64_BASE: Final = 2**62 + 10
_NS: Final = 1_000_000_000
_HELLO_TS: Final = struct.Struct(">QI")
_MAX_NAME: Final = 255
#: Message 1 is 96 bytes of IK overhead plus the HELLO; anything longer is refused unread.
_MAX_MESSAGE1: Final = 96 + _HELLO_TS.size + _MAX_NAME

#: A mux PING with this payload means "I open no more streams on this session".
_DRAIN: Final = b"MESH-DRN"
_RTT_PING: Final = b"MESH-RTT"
_RECV_SIZE: Final = 65536
#: Ciphertext the writer gathers into one send_all (fewer syscalls, same fairness).
_WRITE_BATCH: Final = 256 * 1024
#: Where TunnelStream.pump_from reads a proxied socket: room for a mux header,
#: then a full record's data.  One for the agent: it is filled and sealed
#: without a scheduling point in between, so no two streams ever share it.
_SCRATCH: Final = memoryview(bytearray(mux.DEFAULT_MAX_RECORD))
_DIRECT_MAX: Final = len(_SCRATCH) - mux.HEADER_SIZE
#: How long a closing session may spend flushing its last records.
_FLUSH_TIMEOUT: Final = 1.0
#: How long a dead session's stream handlers get to notice before they are cancelled.
_HANDLER_GRACE: Final = 5.0

# Session control records (docs/dataplane.md, "Rekey").  A decrypted
# transport message whose first byte is _CONTROL_MIN or more is for the session
# itself and never reaches the mux: mux frame types are 0..7 and dataplane.mux
# reserves 0x80..0xFF for this layer.
_CONTROL_MIN: Final = 0x80
_REKEY_INIT: Final = 0xF0
_REKEY_REPLY: Final = 0xF1
_REKEY_SWITCH: Final = 0xF2
#: Prologue of a rekey handshake, followed by the previous handshake's hash (Noise §6, §11.2).
_REKEY_PROLOGUE: Final = PREAMBLE + b" rekey "
#: The session's responder renews on time only this much later than its initiator
#: would, as a fallback: normally one side starts and no INITs cross.
_RESPONDER_REKEY_SLACK: Final = 1.1

#: WireGuard's REKEY_AFTER_TIME (paper §6.1): renew the keys every two minutes...
DEFAULT_REKEY_AFTER_TIME: Final = 120.0
#: ...or after this many messages under one key, whichever comes first.
DEFAULT_REKEY_AFTER_MESSAGES: Final = 2**20
#: WireGuard's REJECT_AFTER_TIME: a key still in use this long after it began
#: means rekeying failed, and the session is closed loudly.
DEFAULT_REJECT_AFTER_TIME: Final = 180.0
#: The hard cap on mux records under one key (WireGuard's REJECT_AFTER_MESSAGES),
#: 16 times the rekey point and far below Noise's 2^64-1 (§5.1), so a rekey that
#: never completes ends the session long before a nonce could repeat.
DEFAULT_REJECT_AFTER_MESSAGES: Final = 2**24
#: Handshakes the listener runs at once; excess connections are closed unread.
DEFAULT_MAX_HANDSHAKES: Final = 256
#: The replay table (last HELLO timestamp per initiator key) is pruned of keys
#: that are no longer members when it reaches twice its size after the last
#: pruning, and never below this many entries.
_REPLAY_TABLE_MIN: Final = 256

#: Why a responder refused a connection: each is a ``handshakes_failed_<reason>`` counter.
REFUSAL_REASONS: Final = (
    "bad_magic", "bad_version", "bad_handshake", "name_mismatch", "unknown_key", "replay", "timeout", "io_error",
    "busy",
)  # fmt: skip
_STAT_KEYS: Final = (
    "handshakes_ok", *(f"handshakes_failed_{r}" for r in REFUSAL_REASONS), "dials_failed",
    "sessions_open", "sessions_opened", "sessions_closed", "sessions_failed", "duplicate_sessions",
    "streams_opened", "streams_accepted", "streams_refused", "bytes_in", "bytes_out",
    "decrypt_failures", "protocol_errors", "handler_errors", "rekeys", "rekey_collisions", "rekey_failures",
    "direct_dials_failed", "relayed_dials",
)  # fmt: skip
#: Relays tried, best first, before a dial gives up.
_MAX_RELAYS_TRIED: Final = 2


# -- errors -------------------------------------------------------------------------


class TunnelError(Exception):
    """A stream could not be opened: no route to the peer, a failed dial, or we are not running."""


class StreamResetError(trio.BrokenResourceError):
    """The stream was reset by the peer (``code`` is its mux ResetCode) or its session died
    (``code`` is None); either way the data it carried is incomplete."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class _Refused(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class _Truncated(Exception):
    """The TCP connection ended in the middle of a message."""


class _TooLong(Exception):
    """A length prefix announced more than the caller accepts here."""


# -- the pure part: handshake payloads ------------------------------------------------


def tai64n(unix_ns: int) -> bytes:
    """A TAI64N label for a Unix time in nanoseconds (12 bytes, big-endian)."""
    secs, nanos = divmod(unix_ns, _NS)
    return _HELLO_TS.pack(_TAI64_BASE + secs, nanos)


def encode_hello(unix_ns: int, name: str) -> bytes:
    """The payload of message 1: TAI64N timestamp, then the initiator's name."""
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= _MAX_NAME:
        raise ValueError(f"node name must be 1..{_MAX_NAME} bytes of UTF-8")
    return tai64n(unix_ns) + raw


def decode_hello(payload: bytes) -> tuple[int, str]:
    """(unix nanoseconds, name) from a message-1 payload; ValueError if malformed."""
    if len(payload) < _HELLO_TS.size + 1 or len(payload) > _HELLO_TS.size + _MAX_NAME:
        raise ValueError("hello payload has a bad length")
    label, nanos = _HELLO_TS.unpack_from(payload)
    if nanos >= _NS:
        raise ValueError("hello timestamp has more than 10^9 nanoseconds")
    name = payload[_HELLO_TS.size :].decode("utf-8")  # UnicodeDecodeError is a ValueError
    return (label - _TAI64_BASE) * _NS + nanos, name


def _raw(transport: trio.abc.Stream) -> trio.abc.Stream:
    """A TCP transport is driven by non-blocking syscalls (dataplane.rawsocket); others as they are."""
    if isinstance(transport, trio.SocketStream):
        return RawSocketStream.adopt(transport)
    return transport


def _framed(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


# -- interfaces -----------------------------------------------------------------------


class PeerDirectory(Protocol):
    """What the tunnel layer may ask membership; the agent implements it, read-only."""

    def member_for_key(self, static_public: bytes) -> str | None:
        """Name of the alive or suspect member holding this tunnel key, else None."""
        ...

    def tunnel_peer(self, name: str) -> tuple[tuple[str, int], bytes] | None:
        """((host, port), static public key) of a member we may dial, else None."""
        ...


#: ``on_stream(peer_name, header, stream)``: serve a stream the peer opened.
StreamHandler = Callable[[str, bytes, "TunnelStream"], Awaitable[None]]


# -- framed reading -------------------------------------------------------------------


class _Window:
    """A buffer whose live bytes are ``[_start, _end)``: the tunnel's receive and send buffers.

    Bytes are added at the end and taken from the start; when the tail is too
    short, the live bytes move to the front, or into a larger buffer.
    """

    __slots__ = ("_buf", "_end", "_start", "_view")

    def __init__(self, size: int) -> None:
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def _relocate(self, size: int) -> None:
        """Move the live bytes to the front, into a new buffer of ``size`` bytes if that differs."""
        held = self._end - self._start
        if size != len(self._buf):
            buf = bytearray(size)
            buf[:held] = self._view[self._start : self._end]
            self._buf, self._view = buf, memoryview(buf)
        elif held:
            self._view[:held] = self._view[self._start : self._end]
        self._start, self._end = 0, held


class _Reader(_Window):
    """Length-prefixed messages from a byte stream, with a buffer that survives the handshake.

    A RawSocketStream receives straight into the buffer's free tail
    (``receive_into``), and a message is handed out as a view of it
    (``read_view``), which the session decrypts in place: a transport message
    costs no allocation and no copy before the cipher.  When the tail is too
    short, the unread bytes (less than one message) move to the front.

    The buffer starts small, which is all that the handshake and request /
    response traffic need, and grows to CAPACITY the first time a receive fills
    all the room it had (the socket holds more: a bulk transfer), so that an
    agent with sessions to many peers does not hold a large buffer for each.
    """

    __slots__ = ("_fair", "_stream")

    INITIAL: Final = 16 * 1024
    #: Four maximal framed messages: after a move to the front, a receive always
    #: has room for a whole message and more.
    CAPACITY: Final = 4 * (2 + MAX_MESSAGE)

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._fair = Fairness()
        super().__init__(self.INITIAL)

    async def _fill(self, n: int) -> bool:
        """At least ``n`` unread bytes (n <= 2 + MAX_MESSAGE); False if the stream ended first."""
        while self._end - self._start < n:
            tail = self._tail(n)
            stream = self._stream
            if isinstance(stream, RawSocketStream):
                # RawSocketStream.receive_into, inlined: two coroutine frames
                # less per message on the tunnel's busiest path.
                while True:
                    if stream.emptied:
                        self._fair.waited()
                        await stream.wait_readable()
                    received = stream.try_receive_into(tail)
                    if received is not None:
                        break
                got = received
                if self._fair.due():
                    await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                chunk = await stream.receive_some(min(_RECV_SIZE, len(tail)))
                got = len(chunk)
                tail[:got] = chunk
            if not got:
                return False
            self._received(got, len(tail))
        return True

    def _tail(self, n: int) -> memoryview:
        """The free tail, with room for ``n`` unread bytes in all (the rest of a
        message) and for a receive worth its syscall."""
        held = self._end - self._start
        size = len(self._buf)
        want = max(n - held, size // 4)
        if size - self._end < want:
            self._relocate(size if size - held >= want else self.CAPACITY)
        return self._view[self._end :]

    def _received(self, got: int, room: int) -> None:
        """``got`` bytes arrived in a tail of ``room``."""
        self._end += got
        if got == room and len(self._buf) < self.CAPACITY:
            self._relocate(self.CAPACITY)  # the socket had more than we had room for

    def receive_now(self, stream: RawSocketStream) -> int | None:
        """One non-blocking receive into the free tail, for the reactor's path
        (``_Session._on_readable``): what it got, 0 at the end, None if nothing."""
        start = self._start
        need = 2  # a length prefix; then the whole message it announces
        if self._end - start >= 2:
            need += (self._buf[start] << 8) | self._buf[start + 1]
        tail = self._tail(need)
        got = stream.try_receive_into(tail)
        if got:
            self._received(got, len(tail))
        return got

    def ready_view(self) -> memoryview | None:
        """The next message if it is all buffered (as ``read_view`` returns it), else None."""
        start = self._start
        if self._end - start < 2:
            return None
        n = (self._buf[start] << 8) | self._buf[start + 1]
        if self._end - start < 2 + n:
            return None
        self._start = start + 2 + n
        return self._view[start + 2 : start + 2 + n]

    async def read_exactly(self, n: int) -> bytes:
        """``n`` bytes, or fewer if the stream ended first."""
        await self._fill(n)
        got = min(n, self._end - self._start)
        data = bytes(self._view[self._start : self._start + got])
        self._start += got
        return data

    async def read_view(self, limit: int = MAX_MESSAGE) -> memoryview | None:
        """The next message as a view of the buffer, valid until the next read; None
        on a clean end of stream between messages."""
        # _fill only when the buffer is short: most messages of a busy session
        # are already there, and an await of a coroutine is not free.
        if self._end - self._start < 2 and not await self._fill(2):
            if self._end > self._start:
                raise _Truncated
            return None
        start = self._start
        n = (self._buf[start] << 8) | self._buf[start + 1]
        if n > limit:
            raise _TooLong
        if self._end - start < 2 + n:
            if not await self._fill(2 + n):
                raise _Truncated
            start = self._start  # _fill may have moved the unread bytes to the front
        self._start = start + 2 + n
        return self._view[start + 2 : start + 2 + n]

    async def read_message(self, limit: int = MAX_MESSAGE) -> bytes | None:
        """The next message as bytes of its own; None on a clean end of stream between messages."""
        view = await self.read_view(limit)
        return None if view is None else bytes(view)


class _Outbox(_Window):
    """Sealed transport messages the kernel has not taken yet, in wire order.

    The cipher writes each message straight into the free tail
    (``CipherState.encrypt_framed_into``) and sends go from a view of the
    head, so a sealed byte is never copied in Python.  A bytearray grown with
    ``+=`` and cut with ``del`` would not do: CPython resizes it to the exact
    size both ways, so it copies all it holds at every append, which in a bulk
    transfer costs more than the cipher (docs/dataplane.md, "Copies").

    The buffer starts small and grows once to CAPACITY when a message does
    not fit (a bulk transfer), as _Reader's does.  When the tail is too short
    the unsent bytes move to the front; the writer gathers at most
    _WRITE_BATCH plus one message, so at CAPACITY that always makes room and
    the move is rare.
    """

    __slots__ = ()

    INITIAL: Final = 16 * 1024
    CAPACITY: Final = 4 * _WRITE_BATCH

    def __init__(self) -> None:
        super().__init__(self.INITIAL)

    def __len__(self) -> int:
        return self._end - self._start

    def seal(self, cipher: CipherState, plaintext: bytes | memoryview) -> None:
        """Append ``plaintext`` as one framed transport message under ``cipher``."""
        need = 2 + len(plaintext) + TAGLEN  # length prefix, ciphertext, tag
        if len(self._buf) - self._end < need:
            self._make_room(need)
        self._end += cipher.encrypt_framed_into(self._view[self._end :], plaintext)

    def _make_room(self, need: int) -> None:
        held = self._end - self._start
        size = len(self._buf)
        if held + need > size or (held + need > size // 2 and size < self.CAPACITY):
            size = max(self.CAPACITY, held + need)
        self._relocate(size)

    def pending(self) -> memoryview:
        """The unsent bytes, valid until the next ``seal`` or ``sent``."""
        return self._view[self._start : self._end]

    def sent(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0

    def take(self) -> bytes:
        """All the unsent bytes, as bytes of their own (for transports that keep what they are given)."""
        data = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        return data


# -- streams --------------------------------------------------------------------------


class TunnelStream(trio.abc.HalfCloseableStream):
    """One proxied connection inside a session, with trio's stream semantics.

    * ``send_all`` waits while the stream's send buffer is full (the peer's
      reader is slow, or the session is busy): backpressure, never unbounded memory.
    * ``receive_some`` returns data, hands the credit back to the peer, and
      returns ``b""`` only after the peer's ``send_eof``.
    * ``send_eof`` half-closes; ``aclose`` resets the stream unless ``send_eof``
      was called first and no received data was left unread.
    * Failure of the stream or its session raises :class:`StreamResetError`.
    """

    def __init__(self, session: _Session, stream_id: int, header: bytes, *, local: bool) -> None:
        self._session = session
        self.stream_id = stream_id
        self.header = header
        self.peer = session.peer
        #: True if we opened it, False if the peer did.
        self.local = local
        #: Received data not yet read: the mux's chunks, as they came.
        self._buf: deque[bytes | memoryview] = deque()
        #: Set while pump_into runs: the socket the reader may write into directly.
        self._sink: RawSocketStream | None = None
        self._delivered: Callable[[int], None] | None = None
        self._sink_busy = False
        self._buffered = 0
        self._fair = Fairness()
        self._eof_received = False
        self._eof_sent = False
        self._closed = False
        self._failure: tuple[str, int | None] | None = None
        self._recv_event = trio.Event()
        self._send_event = trio.Event()
        self._receiving = False
        self._sending = False

    def __repr__(self) -> str:
        return f"<TunnelStream {self.peer}#{self.stream_id}>"

    # -- called by the session ----------------------------------------------------

    def _fail(self, reason: str, code: int | None) -> None:
        if self._failure is None:
            self._failure = (reason, code)
        self._buf.clear()
        self._buffered = 0
        self._recv_event.set()
        self._send_event.set()

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
        straight into the sink's socket (``_deliver``), so a proxied byte costs no
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

    def _deliver(self, data: bytes | memoryview) -> bytes | memoryview:
        """The reader's fast path: write into the sink now; what is left must be queued."""
        assert self._sink is not None and self._delivered is not None
        try:
            n = self._sink.try_send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return data  # pump_into meets the error itself when it sends this
        if n:
            self._session.mux.consumed(self.stream_id, n)
            self._delivered(n)
        return data[n:] if n < len(data) else b""

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

    async def pump_from(self, source: RawSocketStream, delivered: Callable[[int], None], chunk: int) -> None:
        """Copy everything ``source`` receives into this stream, then half-close it.

        The mirror of ``pump_into``.  While nothing is queued on the session,
        each read lands in a buffer behind room for the mux header and is sealed
        and sent from there (``_Session.send_direct``): no bytes object per read,
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
        reactor = session.manager.reactor
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
        # From the read to the send, nothing yields: _SCRATCH is ours.
        n = source.try_receive_into(_SCRATCH[mux.HEADER_SIZE : mux.HEADER_SIZE + min(room, _DIRECT_MAX)])
        if n:
            self._session.send_direct(self, _SCRATCH[: mux.HEADER_SIZE + n])
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
            self._session.local_close(self)
        self._buf.clear()
        self._buffered = 0


# -- sessions -------------------------------------------------------------------------


class _Session:
    """One encrypted connection to a peer and the streams on it (docs/dataplane.md, "Tunnels")."""

    def __init__(
        self,
        manager: TunnelManager,
        peer: str,
        *,
        initiator: bool,
        transport: trio.abc.Stream,
        reader: _Reader,
        send_cipher: CipherState,
        recv_cipher: CipherState,
        peer_static: bytes,
        handshake_hash: bytes,
    ) -> None:
        self.manager = manager
        self.peer = peer
        self.initiator = initiator
        #: Name of the agent that dialled: what the duplicate tie-break compares.
        self.initiator_name = manager.name if initiator else peer
        self.transport = transport
        self._reader = reader
        self._send_cipher = send_cipher
        self._recv_cipher = recv_cipher
        #: The peer's static key, proven by the outer handshake; every rekey must prove it again.
        self._peer_static = peer_static
        #: The last handshake's transcript hash: the next rekey's prologue binds to it.
        self._hs_hash = handshake_hash
        # Rekey state (docs/dataplane.md, "Rekey"): "idle"; "initiated" (our INIT is
        # out, _rekey_hs waits for the REPLY); "switching" (we read the REPLY, our
        # SWITCH is queued and the writer changes our send key right after it);
        # "awaiting_switch" (we answered an INIT, the writer changes our send key
        # right after the REPLY, _next_recv waits for the peer's SWITCH).
        self._rekey_state: Literal["idle", "initiated", "switching", "awaiting_switch"] = "idle"
        self._rekey_hs: HandshakeState | None = None
        self._next_recv: CipherState | None = None
        #: Control records to send ahead of mux records, each with the send key to use after it.
        self._control_out: deque[tuple[bytes, CipherState | None]] = deque()
        self._key_changed = trio.Event()
        self.rekeys = 0
        self.mux = mux.Session(initiator=initiator)
        self.streams: dict[int, TunnelStream] = {}
        #: Streams whose send_all waits for room in the mux send buffer.
        self.blocked: set[TunnelStream] = set()
        #: Streams whose pump_from waits for the peer's credit (woken by WindowOpened).
        self.awaiting_credit: set[TunnelStream] = set()
        #: Streams that sent EOF: forgotten by the mux once both FINs are out.
        self._finishing: set[int] = set()
        self.created = trio.current_time()
        self.last_busy = self.created
        #: When the current send / receive keys came into use (the key-age limits).
        self._send_since = self.created
        self._recv_since = self.created
        self.rtt: float | None = None
        #: The member whose stream carries this session, when it is relayed (dataplane.relay).
        self.via: str | None = None
        self._ping_sent: float | None = None
        self.draining = False
        self.drain_sent = False
        self.drain_received = False
        self._drain_started = 0.0
        self.dead = False
        self.reason = ""
        self._closing = False
        self._kick = trio.Event()
        #: Encrypted bytes not yet taken by the kernel (see _write).
        self._out = _Outbox()
        #: The transport when it is a plain socket: the reactor's and try_send's fast paths.
        self._raw = transport if isinstance(transport, RawSocketStream) else None
        self._try_send = self._raw.try_send if self._raw is not None else None
        #: The writer task waits for the socket: only it may send until it is writable again.
        self._writer_waiting = False
        #: Set once _out drains below _WRITE_BATCH, for pump_from waiting on a full one.
        self._out_room: trio.Event | None = None
        self._io: trio.Nursery | None = None
        self._handlers: trio.Nursery | None = None
        self.log = manager.log.bind(peer=peer, role="initiator" if initiator else "responder")

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, first_record: bytes | None) -> None:
        """The session's whole life; returns once it is closed and its handlers are done."""
        try:
            async with trio.open_nursery() as handlers:
                self._handlers = handlers
                try:
                    async with trio.open_nursery() as io:
                        self._io = io
                        if self.initiator:
                            # The responder registers us only once a record decrypts: send one now.
                            self._ping_sent = trio.current_time()
                            self.mux.ping(_RTT_PING)
                        if first_record is not None:
                            self._handle_plaintext(first_record)
                        if self.dead:
                            if self._closing:
                                io.start_soon(self._write_loop)  # flush, then it ends the scope
                            else:
                                io.cancel_scope.cancel()
                        else:
                            io.start_soon(self._read_loop)
                            io.start_soon(self._write_loop)
                            io.start_soon(self._idle_loop)
                            io.start_soon(self._key_loop)
                except Exception as exc:
                    # A bug here must cost one session, never the agent.
                    self.log.error("tunnel_session_crashed", error=repr(exc))
                    self._terminate("internal_error", error=True)
                self._terminate("closed", error=False)
                self._io = None
                await trio.aclose_forcefully(self.transport)
                handlers.cancel_scope.deadline = trio.current_time() + _HANDLER_GRACE
        finally:
            self._terminate("closed", error=False)
            self._io = None
            await trio.aclose_forcefully(self.transport)

    def _terminate(self, reason: str, *, error: bool, flush: bool = False) -> None:
        """End the session: fail every stream on it, unregister, stop the I/O tasks."""
        if self.dead:
            return
        self.dead = True
        self.reason = reason
        self.manager._forget(self)
        for st in list(self.streams.values()):
            st._fail(f"tunnel to {self.peer} failed: {reason}", None)
        self.streams.clear()
        self.blocked.clear()
        self.awaiting_credit.clear()
        self._wake_out_room()
        self._finishing.clear()
        if error:
            self.manager.stats["sessions_failed"] += 1
            self.log.warning("tunnel_session_failed", reason=reason)
        else:
            self.manager.stats["sessions_closed"] += 1
            self.log.debug("tunnel_session_closed", reason=reason)
        if self._io is None:
            return
        if flush:
            # Let the writer send what is queued (a DRAIN, or the mux's final GOAWAY).
            self._closing = True
            self._kick.set()
            scope = self._io.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + _FLUSH_TIMEOUT)
        else:
            self._io.cancel_scope.cancel()

    def start_drain(self, reason: str) -> None:
        """Open no more streams here; close once the peer agrees and the streams are done."""
        if self.dead:
            return
        self.draining = True
        self.manager._deactivate(self)
        if not self.drain_sent:
            self.drain_sent = True
            self._drain_started = trio.current_time()
            self.mux.ping(_DRAIN)
            self._kick.set()
            self.log.debug("tunnel_session_draining", reason=reason)
        self._maybe_finish_drain()

    def _maybe_finish_drain(self) -> None:
        if (
            not self.dead
            and self.drain_sent
            and self.drain_received
            and not self.streams
            and self.mux.stream_count == 0
        ):
            self._terminate("drained", error=False, flush=True)

    # -- used by TunnelStream -------------------------------------------------------

    def open_stream(self, header: bytes) -> TunnelStream:
        sid = self.mux.open_stream(header)
        st = TunnelStream(self, sid, header, local=True)
        self.streams[sid] = st
        self.last_busy = trio.current_time()
        self.manager.stats["streams_opened"] += 1
        self._kick.set()
        return st

    def writable(self, st: TunnelStream) -> int:
        try:
            return self.mux.writable(st.stream_id)
        except mux.MuxError:
            # Unreachable while the stream object is live (a reset or a dead session
            # marks it failed first); fail loudly rather than spin.
            st._fail("stream no longer open", None)
            raise StreamResetError("stream no longer open") from None

    def send(self, stream_id: int, data: bytes | memoryview) -> None:
        self.mux.send(stream_id, data)
        self._write()

    def consumed(self, stream_id: int, n: int) -> None:
        if not self.dead:
            self.mux.consumed(stream_id, n)
            if self.mux.has_output():  # credit is returned in batches: most reads owe nothing
                self._write()

    def close_stream(self, st: TunnelStream) -> None:
        try:
            self.mux.close(st.stream_id)
        except mux.MuxError:
            st._fail("stream no longer open", None)
            raise StreamResetError("stream no longer open") from None
        self._finishing.add(st.stream_id)
        self._write()

    def local_close(self, st: TunnelStream) -> None:
        if self.dead or self.streams.get(st.stream_id) is not st:
            return
        if not self.mux.is_open(st.stream_id):
            self._remove(st)
        elif not st._eof_sent or st._buf:
            # The application gave up on the stream: the peer must see a reset,
            # never a clean end of a stream that was cut short.
            self.mux.reset(st.stream_id, mux.ResetCode.CANCEL)
            self._kick.set()
            self._remove(st)
        # Otherwise our FIN is queued and only the peer's direction is open; the
        # stream is forgotten once its FIN arrives, or reset if data does.

    def _remove(self, st: TunnelStream) -> None:
        if self.streams.get(st.stream_id) is st:
            del self.streams[st.stream_id]
        self._finishing.discard(st.stream_id)
        self.blocked.discard(st)
        self.awaiting_credit.discard(st)
        self.last_busy = trio.current_time()
        self._maybe_finish_drain()

    # -- the I/O tasks --------------------------------------------------------------

    async def _read_loop(self) -> None:
        reactor = self.manager.reactor
        raw = self._raw
        while True:
            if raw is not None and reactor.running:
                while (ready := self._reader.ready_view()) is not None:  # left by an earlier read
                    if not self._open(ready):
                        return
                # Each readable moment is handled by _on_readable in the reactor's
                # task; this one wakes for what only it does: the end of the
                # stream, an error, or the reactor's own end.
                try:
                    await raw.wait_readable_in(reactor, self._on_readable)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._terminate(f"receive failed ({exc.__class__.__name__})", error=bool(self.streams))
                    return
                if self.dead:
                    return
            try:
                msg = await self._reader.read_view()
            except _Truncated:
                self._terminate("truncated", error=True)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._terminate(f"receive failed ({exc.__class__.__name__})", error=bool(self.streams))
                return
            if msg is None:
                # The peer closed.  Harmless if nothing was in flight; otherwise
                # the streams on it fail (in _terminate) rather than end quietly.
                busy = bool(self.streams) or self.mux.stream_count > 0
                self._terminate("peer closed the connection", error=busy)
                return
            if not self._open(msg):
                return

    def _on_readable(self) -> bool:
        """The read loop's work for one readable moment of the transport, run by
        the reactor: read once, then handle every message now complete.  False
        when the read loop's task must act (the end of the stream, or the session's)."""
        reader = self._reader
        assert self._raw is not None  # _read_loop waits in the reactor only then
        got = reader.receive_now(self._raw)
        if got is None:
            return True
        if not got:
            return False  # the task's read_view meets the end again, and tells a clean one from a cut
        while (msg := reader.ready_view()) is not None:
            if not self._open(msg):
                return False
        return True

    def _open(self, msg: memoryview) -> bool:
        """Decrypt one transport message and handle it; False if the session ended."""
        self.manager.stats["bytes_in"] += len(msg) + 2
        try:
            # A view of a buffer the next decrypt reuses: handled (and what is
            # kept of it copied) before the next message is read.
            record = self._recv_cipher.decrypt_view(msg)
        except NoiseError as exc:
            self.manager.stats["decrypt_failures"] += 1
            self._terminate(f"decrypt failed ({exc.reason})", error=True)
            return False
        return self._handle_plaintext(record)

    def _handle_plaintext(self, record: bytes | memoryview) -> bool:
        """Route one decrypted transport message: a session control record or a mux record."""
        if self.dead:
            return False
        if record and record[0] >= _CONTROL_MIN:
            return self._handle_control(record)
        # The hard cap (WireGuard's REJECT_AFTER_MESSAGES): the peer kept sending mux
        # records on a key that should long have been replaced.  The peer enforces the
        # same cap on itself, so only a broken peer gets here.
        if self._recv_cipher.nonce > self.manager.reject_after_messages:
            self._key_failure("peer exceeded the message limit of one key")
            return False
        return self._handle_record(record)

    def _handle_record(self, record: bytes | memoryview) -> bool:
        if self.dead:
            return False
        sid = self.mux.receive_data(record)
        if sid:  # one DATA frame, already accounted: most records
            self._on_data(sid, record[mux.HEADER_SIZE :])
            if self.mux.has_output():  # a credit update the delivery released
                self._write()
            return not self.dead
        try:
            events = self.mux.receive(record)
        except mux.ProtocolError as exc:
            self.manager.stats["protocol_errors"] += 1
            self._terminate(f"protocol error ({exc.reason})", error=True, flush=True)
            return False
        for ev in events:
            self._dispatch(ev)
        if self.mux.has_output():  # a PONG, a reset, or data that fresh credit lets out
            self._write()
        self._maybe_finish_drain()
        return not self.dead

    def _on_data(self, sid: int, data: bytes | memoryview) -> None:
        """Hand a stream its data: straight into its sink socket when one is set and keeping up."""
        st = self.streams.get(sid)
        if st is None or st._closed:
            # Data for a stream the application closed: reset it, as TCP would.
            self.mux.reset(sid, mux.ResetCode.CANCEL)
            if st is not None:
                self._remove(st)
            return
        # ``data`` is a view of the decrypt buffer: what is kept must be copied.
        if st._sink is not None and not st._buf and not st._sink_busy:
            data = st._deliver(data)
            if not data:
                return
        st._buf.append(bytes(data))
        st._buffered += len(data)
        st._recv_event.set()

    def _dispatch(self, ev: mux.Event) -> None:
        if isinstance(ev, mux.Data):
            self._on_data(ev.stream_id, ev.data)
        elif isinstance(ev, mux.StreamOpened):
            self._accept_stream(ev.stream_id, ev.header)
        elif isinstance(ev, mux.StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st._eof_received = True
                st._recv_event.set()
                if not self.mux.is_open(ev.stream_id):
                    self._remove(st)
        elif isinstance(ev, mux.StreamReset):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st._fail(f"stream reset by {self.peer} (code {ev.code})", ev.code)
                self._remove(st)
        elif isinstance(ev, mux.Ping):
            if ev.opaque == _DRAIN:
                self.drain_received = True
                self.start_drain("peer is draining")
        elif isinstance(ev, mux.Pong):
            if ev.opaque == _RTT_PING and self._ping_sent is not None:
                self.rtt = trio.current_time() - self._ping_sent
                self._ping_sent = None
        elif isinstance(ev, mux.GoAway):
            self.drain_received = True
            self.start_drain(f"peer sent GOAWAY {ev.code}")
        elif isinstance(ev, mux.WindowOpened):
            # Queued data needs nothing here (the writer is kicked after every
            # record); a pump_from waiting for credit is woken.
            st = self.streams.get(ev.stream_id)
            if st is not None and st in self.awaiting_credit:
                self.awaiting_credit.discard(st)
                st._send_event.set()

    def _accept_stream(self, sid: int, header: bytes) -> None:
        handler = self.manager.on_stream
        if handler is None or self._handlers is None:
            self.mux.reset(sid, mux.ResetCode.REFUSED)
            self.manager.stats["streams_refused"] += 1
            return
        st = TunnelStream(self, sid, header, local=False)
        self.streams[sid] = st
        self.last_busy = trio.current_time()
        self.manager.stats["streams_accepted"] += 1
        self._handlers.start_soon(self._run_handler, handler, st)

    async def _run_handler(self, handler: StreamHandler, st: TunnelStream) -> None:
        try:
            await handler(self.peer, st.header, st)
        except Exception as exc:
            # A failing handler costs its stream (reset below), not the session.
            self.manager.stats["handler_errors"] += 1
            self.log.warning("tunnel_handler_failed", stream=st.stream_id, error=repr(exc))
        finally:
            st.close_now()

    def _gather(self) -> bool:
        """Encrypt what is ready into ``_out``, up to _WRITE_BATCH; False if the session just failed.

        Encryption happens only here, in wire order, so a key switch queued with
        a control record lands exactly after that record.  Synchronous, so a
        cancellation can never split a record.
        """
        out = self._out
        produced = False
        try:
            while len(out) < _WRITE_BATCH:
                if self._control_out:
                    control, next_send = self._control_out.popleft()
                    out.seal(self._send_cipher, control)
                    if next_send is not None:
                        self._switch_send(next_send)
                    continue
                record = self.mux.next_record()
                if record is None:
                    break
                produced = True
                if not self._seal_record(record):
                    return False
        except NoiseError as exc:  # unreachable below the hard cap; fail loudly all the same
            self._terminate(f"encrypt failed ({exc.reason})", error=True)
            return False
        if produced:
            self._after_drain()
        return True

    def _seal_record(self, record: bytes | memoryview) -> bool:
        """Encrypt one mux record into ``_out``, within the key's message limits; False if that ended the session."""
        cipher = self._send_cipher
        if cipher.nonce >= self.manager.reject_after_messages:
            self._key_failure(f"{self.manager.reject_after_messages} messages on one key and no rekey")
            return False
        self._out.seal(cipher, record)
        if cipher.nonce >= self.manager.rekey_after_messages:
            self.start_rekey("messages")
        return True

    def direct_room(self, st: TunnelStream) -> int:
        """How many bytes ``send_direct`` takes for ``st`` now (0: use ``send``; see mux.direct_room)."""
        if self.dead or self._control_out or len(self._out) >= _WRITE_BATCH:
            return 0
        return self.mux.direct_room(st.stream_id)

    def send_direct(self, st: TunnelStream, record: memoryview) -> None:
        """Seal ``record`` (8 spare bytes, then at most ``direct_room`` bytes of data) and send it now.

        The whole of a proxied chunk's way from its socket to the tunnel's:
        no queue, no copy, no hand-off to another task.
        """
        self.mux.seal_direct(st.stream_id, record)
        try:
            if not self._seal_record(record):
                return
        except NoiseError as exc:  # as in _gather
            self._terminate(f"encrypt failed ({exc.reason})", error=True)
            return
        if self._control_out or self._try_send is None or self._writer_waiting:
            self._write()  # a rekey to send as well, or the writer task's turn
        elif self._send_now() and self._out:
            self._kick.set()  # the kernel is full: the writer task waits for it
        # Else all is out, and nothing can have been queued meanwhile
        # (direct_room saw to it): _write's look at the queues would find none.

    def _send_failed(self, exc: Exception) -> None:
        self._terminate(f"send failed ({exc.__class__.__name__})", error=True)

    def _send_now(self) -> bool:
        """Hand ``_out`` to the kernel without waiting; False if the transport broke."""
        try:
            n = self._try_send(self._out.pending()) if self._try_send is not None else 0
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failed(exc)
            return False
        if n:
            self._out.sent(n)
            self.manager.stats["bytes_out"] += n
            if self._out_room is not None and len(self._out) < _WRITE_BATCH:
                self._wake_out_room()
        return True

    def out_full(self) -> bool:
        """Whether ``_out`` holds a full batch the kernel has not taken: a direct sender should wait."""
        return len(self._out) >= _WRITE_BATCH and not self.dead

    async def wait_out_room(self) -> None:
        """Until ``_out`` has drained below a batch, or the session ended."""
        if self._out_room is None:
            self._out_room = trio.Event()
        await self._out_room.wait()

    def _wake_out_room(self) -> None:
        if self._out_room is not None:
            self._out_room.set()
            self._out_room = None

    def _write(self) -> None:
        """Send what is ready now, from the calling task: no hand-off to the writer task.

        A stream's ``send_all`` and the reader's credit and control replies land
        here, so a request leaves in the same scheduler turn that read it.  Only
        what the kernel does not take at once is left to the writer task, which
        waits for the socket; bytes always leave from the front of ``_out``, so the
        order on the wire is the order of encryption whichever task sends.

        This holds however many streams are open.  Handing writes to the writer
        task instead, so that the streams sending in one scheduler turn share a
        record and a syscall (like TCP autocorking), makes every request wait a
        scheduler turn in each agent, and the agents then sit idle between turns
        (docs/dataplane.md, "Sending inline").
        Batching still happens where it pays: what the kernel refuses piles up in
        ``_out`` and leaves in one send when the socket drains.
        """
        if self._try_send is None or self.dead or self._writer_waiting:
            self._kick.set()
            return
        while self._gather() and self._out and self._send_now():
            if self._out:
                self._kick.set()  # the kernel is full: the writer task waits for it
                return
            if not (self._control_out or self.mux.has_output()):
                return
            # _gather stopped at _WRITE_BATCH and the kernel took it all: go on

    async def _write_loop(self) -> None:
        while True:
            if not self._gather():
                return
            if self._out:
                if self._try_send is not None:
                    if not self._send_now():
                        return
                    if self._out:
                        self._writer_waiting = True
                        try:
                            await self.transport.wait_send_all_might_not_block()
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                            self._send_failed(exc)
                            return
                        finally:
                            self._writer_waiting = False
                    continue
                out = self._out.take()
                self._wake_out_room()
                try:
                    await self.transport.send_all(out)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._send_failed(exc)
                    return
                self.manager.stats["bytes_out"] += len(out)
                continue
            if self._closing:
                assert self._io is not None
                self._io.cancel_scope.cancel()
                return
            await self._kick.wait()
            self._kick = trio.Event()

    def _after_drain(self) -> None:
        """The mux send buffers shrank: wake writers that can go on, forget finished streams."""
        for st in list(self.blocked):
            if st._failure is not None or st._closed or not self.mux.is_open(st.stream_id):
                ready = True
            else:
                ready = self.mux.writable(st.stream_id) > 0
            if ready:
                self.blocked.discard(st)
                st._send_event.set()
        for sid in list(self._finishing):
            if not self.mux.is_open(sid):
                self._finishing.discard(sid)
                done = self.streams.get(sid)
                if done is not None:
                    self._remove(done)

    # -- rekey --------------------------------------------------------------------------

    def start_rekey(self, reason: str) -> bool:
        """Begin replacing this session's keys; False if a rekey is already under way.

        The INIT is an IK message 1 (Noise §7.5) sent as a control record under
        the current key, ahead of any queued mux record; mux records keep going
        out under the current key until the REPLY arrives, so no stream waits.
        """
        if self.dead or self._rekey_state != "idle":
            return False
        hs = HandshakeState.initiator(self.manager._static_private, self._peer_static, prologue=self._rekey_prologue())
        init = hs.write_message(b"")
        self._rekey_hs = hs
        self._rekey_state = "initiated"
        self._control_out.append((bytes([_REKEY_INIT]) + init, None))
        self._kick.set()
        self.log.debug("tunnel_rekey_started", reason=reason)
        return True

    def _rekey_prologue(self) -> bytes:
        # Noise §6 / §11.2 channel binding: the new handshake hashes the previous
        # one's transcript, so its messages are valid only as the next step of this
        # very session (they already travel under its keys; this makes the chain
        # explicit and costs nothing).
        return _REKEY_PROLOGUE + self._hs_hash

    def _handle_control(self, record: bytes | memoryview) -> bool:
        kind, body = record[0], bytes(record[1:])
        try:
            if kind == _REKEY_INIT:
                self._on_rekey_init(body)
            elif kind == _REKEY_REPLY:
                self._on_rekey_reply(body)
            elif kind == _REKEY_SWITCH and not body:
                self._on_rekey_switch()
            else:
                raise NoiseError(f"unknown control record {kind:#x}")
        except NoiseError as exc:
            self._key_failure(f"rekey failed: {exc.reason}")
            return False
        self._kick.set()
        return True

    def _on_rekey_init(self, body: bytes) -> None:
        if self._rekey_state == "initiated":
            # Both sides started at once.  The session initiator's rekey wins, on
            # both ends and with no extra message: the initiator ignores the
            # responder's INIT, and the responder drops its own handshake and
            # answers (its INIT precedes the REPLY on the wire, so the initiator
            # still has its own handshake pending when it reads that INIT).
            self.manager.stats["rekey_collisions"] += 1
            if self.initiator:
                return
            self._rekey_hs = None
        elif self._rekey_state != "idle":
            raise NoiseError(f"rekey INIT while {self._rekey_state}")
        hs = HandshakeState.responder(self.manager._static_private, prologue=self._rekey_prologue())
        hs.read_message(body)
        # Same static keys as the outer handshake, so a thief of the current traffic
        # keys alone can neither answer nor forge a rekey (unlike with NN).
        if hs.remote_static != self._peer_static:
            raise NoiseError("rekey INIT from another static key")
        reply = hs.write_message(b"")
        next_send, next_recv = hs.split()
        self._hs_hash = hs.handshake_hash
        self._next_recv = next_recv
        self._rekey_state = "awaiting_switch"
        # The REPLY is our switch point: everything we send after it uses the new key.
        self._control_out.append((bytes([_REKEY_REPLY]) + reply, next_send))

    def _on_rekey_reply(self, body: bytes) -> None:
        hs = self._rekey_hs
        if self._rekey_state != "initiated" or hs is None:
            raise NoiseError(f"rekey REPLY while {self._rekey_state}")
        hs.read_message(body)
        next_send, next_recv = hs.split()
        self._hs_hash = hs.handshake_hash
        self._rekey_hs = None
        # The peer switched right after its REPLY, so the next message is under the new key.
        self._recv_cipher = next_recv
        self._recv_since = trio.current_time()
        self._rekey_state = "switching"
        # Our switch point: the SWITCH goes under the old key, everything after it under the new.
        self._control_out.append((bytes([_REKEY_SWITCH]), next_send))
        self._rekeyed()

    def _on_rekey_switch(self) -> None:
        if self._rekey_state != "awaiting_switch" or self._next_recv is None:
            raise NoiseError(f"rekey SWITCH while {self._rekey_state}")
        self._recv_cipher = self._next_recv
        self._next_recv = None
        self._recv_since = trio.current_time()
        self._rekey_state = "idle"
        self._key_changed.set()
        self._rekeyed()

    def _switch_send(self, cipher: CipherState) -> None:
        self._send_cipher = cipher
        self._send_since = trio.current_time()
        if self._rekey_state == "switching":
            self._rekey_state = "idle"
        self._key_changed.set()

    def _rekeyed(self) -> None:
        # Counted once per rekey on each side: by its initiator on the REPLY, by
        # its responder on the SWITCH.
        self.rekeys += 1
        self.manager.stats["rekeys"] += 1
        self.log.debug("tunnel_rekeyed", rekeys=self.rekeys)

    def _key_failure(self, reason: str) -> None:
        self.manager.stats["rekey_failures"] += 1
        self._terminate(reason, error=True)

    async def _key_loop(self) -> None:
        """Time-based rekey, and the hard limit on a key's age (WireGuard paper §6.2).

        Only the session's initiator renews on time as a rule (the responder waits
        10 % longer, as a fallback), as WireGuard leaves time-based renewal to the
        initiator of the current session: the usual rekey is then one INIT, never two.
        """
        manager = self.manager
        rekey_after = manager.rekey_after_time * (1.0 if self.initiator else _RESPONDER_REKEY_SLACK)
        while True:
            now = trio.current_time()
            oldest = min(self._send_since, self._recv_since)
            if now - oldest >= manager.reject_after_time:
                self._key_failure(f"keys older than {manager.reject_after_time:g} s: rekey did not complete")
                return
            wake = oldest + manager.reject_after_time
            if self._rekey_state == "idle":
                due = self._send_since + rekey_after
                if now >= due:
                    self.start_rekey("time")
                    continue
                wake = min(wake, due)
            self._key_changed = trio.Event()
            with trio.move_on_at(wake):
                await self._key_changed.wait()

    async def _idle_loop(self) -> None:
        timeout = self.manager.idle_timeout
        tick = max(0.01, min(timeout / 4, 5.0))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if self.streams or self.mux.stream_count:
                self.last_busy = now
                continue
            if now - self.last_busy >= timeout:
                self.start_drain("idle")
            if self.drain_sent and not self.drain_received and now - self._drain_started >= timeout:
                # The peer never answered our DRAIN and nothing uses the session.
                self._terminate("drain timed out", error=False, flush=True)
                return

    def view(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "initiator": self.initiator_name,
            "streams": len(self.streams),
            "draining": self.draining,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "age_s": round(trio.current_time() - self.created, 1),
            "rekeys": self.rekeys,
            "via": self.via,
            "key_age_s": round(trio.current_time() - min(self._send_since, self._recv_since), 1),
        }


class _Dial:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


# -- the manager ----------------------------------------------------------------------


class TunnelManager:
    """All of this agent's tunnels: accepts them, dials them, keeps one session per peer.

    Run :meth:`serve` in a nursery (with an empty listener list for an agent
    that only dials); :meth:`open_stream` needs it running.  ``stats`` may be
    any mutable mapping of counters (the agent's own, so they show up in its
    API); the keys used are pre-created at zero.

    Key lifetime (docs/dataplane.md, "Rekey"): a session renews its keys after
    ``rekey_after_messages`` records under one key or ``rekey_after_time``
    seconds, whichever comes first, and is closed loudly if a key reaches
    ``reject_after_messages`` records or ``reject_after_time`` seconds anyway.
    The defaults are WireGuard's times and a message count far below Noise's
    nonce bound; tests shrink them.  Peers enforce the message cap on each
    other, so every agent of a cluster must use the same limits.

    ``max_handshakes`` caps the handshakes in progress on the listeners (a
    flood of half-open connections costs each excess one a closed socket,
    counted as ``handshakes_failed_busy``).  ``connect(host, port)`` opens the
    transport of a dial; tests substitute memory streams.
    """

    def __init__(
        self,
        name: str,
        static_private: bytes,
        directory: PeerDirectory,
        *,
        on_stream: StreamHandler | None = None,
        clock: Callable[[], float] = time.time,
        handshake_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        rekey_after_messages: int = DEFAULT_REKEY_AFTER_MESSAGES,
        rekey_after_time: float = DEFAULT_REKEY_AFTER_TIME,
        reject_after_messages: int = DEFAULT_REJECT_AFTER_MESSAGES,
        reject_after_time: float = DEFAULT_REJECT_AFTER_TIME,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        connect: Callable[[str, int], Awaitable[trio.abc.Stream]] = trio.open_tcp_stream,
        stats: MutableMapping[str, int] | None = None,
        log: Any = None,
        relays: Callable[[str], list[str]] | None = None,
        direct_connect_timeout: float = 2.0,
        direct_retry_after: float = 30.0,
        use_reactor: bool = True,
        idle_hook: bool = True,
    ) -> None:
        if not 1 <= len(name.encode("utf-8")) <= _MAX_NAME:
            raise ValueError(f"node name must be 1..{_MAX_NAME} bytes of UTF-8")
        if len(static_private) != 32:
            raise ValueError("static_private must be 32 bytes")
        # A few control records may follow the last mux record of a key; keep them
        # all well inside the nonces Noise allows (§5.1).
        if not 1 <= rekey_after_messages < reject_after_messages <= MAX_NONCE // 2:
            raise ValueError("need 1 <= rekey_after_messages < reject_after_messages <= 2^63")
        if not 0 < rekey_after_time < reject_after_time:
            raise ValueError("need 0 < rekey_after_time < reject_after_time")
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be positive")
        self.name = name
        self._static_private = bytes(static_private)
        self.static_public: bytes = nacl.bindings.crypto_scalarmult_base(self._static_private)
        self.directory = directory
        self.on_stream = on_stream
        self._clock = clock
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.rekey_after_messages = rekey_after_messages
        self.rekey_after_time = rekey_after_time
        self.reject_after_messages = reject_after_messages
        self.reject_after_time = reject_after_time
        self.max_handshakes = max_handshakes
        self._connect = connect
        #: Members that may relay to a peer, best first (dataplane.relay); None: never relay.
        self.relays = relays
        self.direct_connect_timeout = direct_connect_timeout
        self.direct_retry_after = direct_retry_after
        #: Peers whose direct dial failed, and until when we go straight to a relay.
        self._direct_failed: dict[str, float] = {}
        self._handshakes = 0
        self.stats: MutableMapping[str, int] = {} if stats is None else stats
        for key in _STAT_KEYS:
            self.stats.setdefault(key, 0)
        self.log: Any = log if log is not None else structlog.get_logger("mesh.tunnel").bind(node=name)
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        self._active: dict[str, _Session] = {}
        self._sessions: set[_Session] = set()
        self._pending: dict[str, _Dial] = {}
        #: Last accepted HELLO timestamp per initiator key (WireGuard's replay defence).
        self._last_hello: dict[bytes, int] = {}
        self._prune_hellos_at = _REPLAY_TABLE_MIN
        self._last_sent_ts = 0
        #: Where the sessions' readers and the proxied sockets' pumps wait while
        #: serve runs (dataplane.reactor); without it, each waits in trio itself.
        self.reactor = Reactor(idle_hook=idle_hook)
        self.use_reactor = use_reactor

    # -- running ----------------------------------------------------------------------

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener] = (),
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept tunnels on ``listeners`` and host every session until cancelled or :meth:`aclose`."""
        if self._nursery is not None or self._stopped.is_set():
            raise RuntimeError("TunnelManager.serve may run only once")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.use_reactor:
                    await nursery.start(self.reactor.run)
                    self.log.debug("tunnel_reactor", mode=self.reactor.mode)
                if listeners:
                    await nursery.start(trio.serve_listeners, self.handle_connection, list(listeners))
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for sess in list(self._sessions):
                sess._terminate("tunnel manager stopped", error=False)
            for dial in self._pending.values():
                dial.error = "tunnel manager stopped"
                dial.done.set()
            self._pending.clear()
            self._stopped.set()

    async def aclose(self) -> None:
        """Close every session and stop :meth:`serve`."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await self._stopped.wait()
        else:
            await trio.lowlevel.checkpoint()

    # -- outgoing ---------------------------------------------------------------------

    async def open_stream(self, peer: str, header: bytes = b"", *, direct_only: bool = False) -> TunnelStream:
        """A new stream to ``peer`` carrying ``header`` in its OPEN.

        Reuses the session to ``peer`` or dials one (concurrent callers share the
        dial).  Raises :class:`TunnelError` if no session can be had.
        ``direct_only``: the session must not itself run through a relay (a
        relay's own session must be direct, or relays could chain).
        """
        if len(header) > mux.MAX_OPEN_HEADER:
            raise ValueError(f"stream header of {len(header)} bytes exceeds {mux.MAX_OPEN_HEADER}")
        if peer == self.name:
            raise TunnelError("cannot open a tunnel to ourselves")
        await trio.lowlevel.checkpoint()
        for _ in range(3):  # a session may start draining between the dial and our open
            if self._nursery is None:
                raise TunnelError("tunnel manager is not running")
            sess = self._active.get(peer)
            if sess is None:
                dial = self._pending.get(peer)
                if dial is None:
                    dial = self._pending[peer] = _Dial()
                    self._nursery.start_soon(self._dial_task, peer, dial, not direct_only)
                await dial.done.wait()
                sess = self._active.get(peer)
                if sess is None:
                    raise TunnelError(dial.error or f"tunnel to {peer} closed right after it opened")
            if direct_only and sess.via is not None:
                raise TunnelError(f"the tunnel to {peer} is relayed through {sess.via}")
            try:
                return sess.open_stream(header)
            except mux.TooManyStreamsError as exc:
                raise TunnelError(f"tunnel to {peer}: {exc}") from None
            except mux.MuxError:
                sess.start_drain("cannot open streams")
        raise TunnelError(f"tunnel to {peer} keeps closing")

    async def _dial_task(self, peer: str, dial: _Dial, allow_relay: bool = True) -> None:
        sess: _Session | None = None
        try:
            sess = await self._dial(peer, allow_relay)
            self._register(sess)
        except TunnelError as exc:
            dial.error = str(exc)
            self.stats["dials_failed"] += 1
            self.log.info("tunnel_dial_failed", peer=peer, error=str(exc))
        finally:
            if self._pending.get(peer) is dial:
                del self._pending[peer]
            dial.done.set()
        if sess is not None:
            await sess.run(None)

    async def _transport(self, peer: str, host: str, port: int,
                         allow_relay: bool) -> tuple[trio.abc.Stream, str | None]:
        """A byte stream to ``peer``'s tunnel port: dialled directly, or through a relay when that fails.

        After a failed direct dial we go straight to a relay for
        ``direct_retry_after`` seconds, so every new session does not first
        wait out a dead route; then the direct route is tried again.
        """
        relays = self.relays(peer) if (allow_relay and self.relays is not None) else []
        now = trio.current_time()
        direct_error = ""
        if not relays or self._direct_failed.get(peer, 0.0) <= now:
            timeout = self.direct_connect_timeout if relays else self.handshake_timeout
            try:
                with trio.fail_after(timeout):
                    transport = _raw(await self._connect(host, port))
                self._direct_failed.pop(peer, None)
                return transport, None
            except trio.TooSlowError:
                direct_error = f"no answer from {host}:{port} in {timeout:g}s"
            except OSError as exc:
                direct_error = f"{host}:{port}: {exc.strerror or exc}"
            if not relays:
                raise TunnelError(f"cannot reach {peer} at {direct_error}")
            self._direct_failed[peer] = now + self.direct_retry_after
            self.stats["direct_dials_failed"] += 1
            self.log.info("tunnel_direct_failed", peer=peer, error=direct_error, relays=relays[:3])
        errors = [direct_error] if direct_error else []
        for via in relays[:_MAX_RELAYS_TRIED]:
            try:
                stream = await self.open_stream(via, relay.encode_relay(peer), direct_only=True)
            except TunnelError as exc:
                errors.append(f"via {via}: {exc}")
                continue
            try:
                await relay.connect_through(stream)
            except relay.RelayError as exc:
                await trio.aclose_forcefully(stream)
                errors.append(f"via {via}: {exc}")
                continue
            self.stats["relayed_dials"] += 1
            return stream, via
        raise TunnelError(f"cannot reach {peer} directly or through a relay: {'; '.join(errors)}")

    async def _dial(self, peer: str, allow_relay: bool = True) -> _Session:
        target = self.directory.tunnel_peer(peer)
        if target is None:
            raise TunnelError(f"no tunnel route to {peer!r}: not a live member with a tunnel key")
        (host, port), key = target
        try:
            with trio.fail_after(self.handshake_timeout + self.direct_connect_timeout):
                transport, via = await self._transport(peer, host, port, allow_relay)
                try:
                    hs = HandshakeState.initiator(self._static_private, key, prologue=PREAMBLE)
                    msg1 = hs.write_message(encode_hello(self._next_timestamp(), self.name))
                    await transport.send_all(PREAMBLE + _framed(msg1))
                    reader = _Reader(transport)
                    msg2 = await reader.read_message()
                    if msg2 is None:
                        raise TunnelError(f"{peer} refused the handshake")
                    name = hs.read_message(msg2).decode("utf-8")
                    if name != peer:
                        raise TunnelError(f"dialled {peer!r} but the key's holder says it is {name!r}")
                    handshake_hash = hs.handshake_hash
                    send_cipher, recv_cipher = hs.split()
                except BaseException:
                    await trio.aclose_forcefully(transport)
                    raise
        except trio.TooSlowError:
            raise TunnelError(f"handshake with {peer} timed out") from None
        except NoiseError as exc:
            raise TunnelError(f"handshake with {peer} failed: {exc.reason}") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TunnelError(f"cannot reach {peer} at {host}:{port}: {exc}") from None
        except (_Truncated, _TooLong, UnicodeDecodeError):
            raise TunnelError(f"malformed handshake reply from {peer}") from None
        self.stats["handshakes_ok"] += 1
        self.log.debug("tunnel_handshake_ok", peer=peer, role="initiator")
        sess = _Session(
            self, peer, initiator=True, transport=transport, reader=reader,
            send_cipher=send_cipher, recv_cipher=recv_cipher, peer_static=key, handshake_hash=handshake_hash,
        )  # fmt: skip
        sess.via = via
        return sess

    def _next_timestamp(self) -> int:
        """Wall-clock nanoseconds, strictly increasing within this process."""
        now = int(self._clock() * _NS)
        self._last_sent_ts = max(now, self._last_sent_ts + 1)
        return self._last_sent_ts

    # -- incoming ---------------------------------------------------------------------

    async def handle_connection(self, transport: trio.abc.Stream) -> None:
        """Responder side of one TCP connection: handshake, then the session's life."""
        transport = _raw(transport)
        if self._nursery is None:
            await trio.aclose_forcefully(transport)
            return
        if self._handshakes >= self.max_handshakes:
            # Half-open connections each hold a task and a socket for up to
            # handshake_timeout: past the cap, refuse at once rather than queue.
            self.stats["handshakes_failed_busy"] += 1
            await trio.aclose_forcefully(transport)
            return
        accepted: tuple[_Session, bytes] | None = None
        self._handshakes += 1
        try:
            accepted = await self._accept(transport)
        finally:
            self._handshakes -= 1
            if accepted is None:
                await trio.aclose_forcefully(transport)
        if accepted is None:
            return
        sess, first_record = accepted
        self._register(sess)
        await sess.run(first_record)

    async def _accept(self, transport: trio.abc.Stream) -> tuple[_Session, bytes] | None:
        reason, detail = "", ""
        try:
            with trio.fail_after(self.handshake_timeout):
                return await self._respond(transport)
        except _Refused as exc:
            reason, detail = exc.reason, exc.detail
        except trio.TooSlowError:
            reason = "timeout"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason, detail = "io_error", exc.__class__.__name__
        self.stats[f"handshakes_failed_{reason}"] += 1
        self.log.info("tunnel_handshake_refused", reason=reason, detail=detail)
        return None

    async def _respond(self, transport: trio.abc.Stream) -> tuple[_Session, bytes]:
        reader = _Reader(transport)
        preamble = await reader.read_exactly(len(PREAMBLE))
        if not MAGIC.startswith(preamble[: len(MAGIC)]):
            raise _Refused("bad_magic")
        if len(preamble) < len(PREAMBLE):
            raise _Refused("bad_handshake", "closed during the preamble")
        if preamble[len(MAGIC)] != VERSION:
            raise _Refused("bad_version", f"version {preamble[len(MAGIC)]}")
        try:
            msg1 = await reader.read_message(limit=_MAX_MESSAGE1)
        except (_Truncated, _TooLong):
            raise _Refused("bad_handshake", "malformed message 1") from None
        if msg1 is None:
            raise _Refused("bad_handshake", "closed before message 1")
        hs = HandshakeState.responder(self._static_private, prologue=PREAMBLE)
        try:
            payload = hs.read_message(msg1)
        except NoiseError as exc:
            raise _Refused("bad_handshake", exc.reason) from None
        remote = hs.remote_static
        assert remote is not None  # set by a message 1 that verified
        peer = self.directory.member_for_key(remote)
        if peer is None or peer == self.name:
            raise _Refused("unknown_key", remote.hex()[:16])
        try:
            ts, claimed = decode_hello(payload)
        except ValueError:
            raise _Refused("bad_handshake", "malformed hello") from None
        if claimed != peer:
            raise _Refused("name_mismatch", f"key of {peer!r} claims to be {claimed!r}")
        last = self._last_hello.get(remote)
        if last is not None and ts <= last:
            raise _Refused("replay", f"from {peer}: timestamp not newer than the last accepted")
        self._last_hello[remote] = ts
        self._prune_hellos()
        await transport.send_all(_framed(hs.write_message(self.name.encode("utf-8"))))
        handshake_hash = hs.handshake_hash
        send_cipher, recv_cipher = hs.split()
        # Key confirmation: only the holder of message 1's ephemeral key can produce this.
        try:
            first = await reader.read_message()
        except (_Truncated, _TooLong):
            raise _Refused("bad_handshake", "malformed first record") from None
        if first is None:
            raise _Refused("bad_handshake", "closed before the first record")
        try:
            record = recv_cipher.decrypt_with_ad(b"", first)
        except NoiseError:
            raise _Refused("bad_handshake", "first record did not decrypt") from None
        self.stats["handshakes_ok"] += 1
        self.stats["bytes_in"] += len(first) + 2
        self.log.debug("tunnel_handshake_ok", peer=peer, role="responder")
        sess = _Session(
            self, peer, initiator=False, transport=transport, reader=reader,
            send_cipher=send_cipher, recv_cipher=recv_cipher, peer_static=remote, handshake_hash=handshake_hash,
        )  # fmt: skip
        return sess, record

    def _prune_hellos(self) -> None:
        """Keep the replay table bounded: forget the keys of agents that are no longer members.

        Safe because a key that is not a member is refused before its timestamp
        matters, and should it rejoin, a replayed message 1 still cannot finish
        the handshake (the session registers only once a record decrypts).  The
        threshold doubles with what survives, so scans are amortised to O(1) per handshake.
        """
        if len(self._last_hello) < self._prune_hellos_at:
            return
        for key in list(self._last_hello):
            if self.directory.member_for_key(key) is None:
                del self._last_hello[key]
        self._prune_hellos_at = max(_REPLAY_TABLE_MIN, 2 * len(self._last_hello))

    # -- the session table --------------------------------------------------------------

    def _register(self, sess: _Session) -> None:
        self._sessions.add(sess)
        self.stats["sessions_opened"] += 1
        self.stats["sessions_open"] = len(self._sessions)
        if self._nursery is None:
            sess._terminate("tunnel manager stopped", error=False)
            return
        current = self._active.get(sess.peer)
        if current is None:
            self._active[sess.peer] = sess
            return
        # Two live sessions to one peer (both dialled at once): both ends keep the same one.
        if current.initiator_name != sess.initiator_name:
            winner = current if current.initiator_name < sess.initiator_name else sess
        else:
            winner = sess  # the same side dialled again: it has given up on the old one
        loser = sess if winner is current else current
        self._active[sess.peer] = winner
        self.stats["duplicate_sessions"] += 1
        self.log.debug("tunnel_duplicate_session", peer=sess.peer, kept_initiator=winner.initiator_name)
        loser.start_drain("duplicate session")

    def _deactivate(self, sess: _Session) -> None:
        if self._active.get(sess.peer) is sess:
            del self._active[sess.peer]

    def _forget(self, sess: _Session) -> None:
        self._deactivate(sess)
        self._sessions.discard(sess)
        self.stats["sessions_open"] = len(self._sessions)

    # -- control and views --------------------------------------------------------------

    def drop_peer(self, peer: str, reason: str = "dropped") -> int:
        """Kill every session to ``peer`` now (e.g. membership declared it dead).

        Its streams fail loudly.  Returns how many sessions were closed.
        """
        doomed = [s for s in self._sessions if s.peer == peer]
        for sess in doomed:
            sess._terminate(reason, error=True)
        return len(doomed)

    def rekey(self, peer: str) -> bool:
        """Renew the keys of the session to ``peer`` now; False if there is none or one is under way."""
        sess = self._active.get(peer)
        return sess is not None and sess.start_rekey("requested")

    def sessions_view(self) -> list[dict[str, Any]]:
        """One dict per live session, active or draining, for the API."""
        return sorted((s.view() for s in self._sessions), key=lambda v: (v["peer"], v["draining"]))

    def active_peers(self) -> list[str]:
        return sorted(self._active)

    def route_to(self, peer: str) -> list[str] | None:
        """The members our session to ``peer`` passes through (``[]``: direct; None: no session yet)."""
        sess = self._active.get(peer)
        if sess is None:
            return None
        return [] if sess.via is None else [sess.via]

    def relayed(self, peer: str) -> bool:
        """True while the direct route to ``peer`` is known broken (we go through a relay)."""
        return self._direct_failed.get(peer, 0.0) > trio.current_time()
