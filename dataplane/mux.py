"""A sans-I/O stream multiplexer: many proxied connections over one encrypted session.

(Over 700 lines because its send and receive halves keep one set of per-stream
books -- credit, FIN, reset -- that can only be checked when read together.)

Between a pair of agents there is one long-lived session; every proxied TCP
connection is a stream on it, so a new connection costs neither a handshake nor
a round trip.  This module is only the state machine, in the h11 style: it
never touches a socket, a clock or an event loop.  The caller feeds it the
decrypted records it received and asks it for the next record to encrypt and
send; everything else (waiting, timeouts, the cipher) is the caller's business.

The wire format (records, frames, codes) is :mod:`dataplane.frames`'s.

Stream ids follow yamux ("Stream ID" in yamux spec.md): the session initiator
opens odd ids, the responder even ids; 0 is the session itself.  As in RFC 9113
§5.1.1 ids only grow, so "never opened" and "already closed" are told apart by
comparing with the highest id seen.  OPEN needs no answer: the opener may send
DATA right behind it, in the same record.

Flow control is per stream and credit-based, as in yamux ("Flow Control") and
RFC 9113 §5.2 / §6.9: each direction of a new stream starts with
``initial_window`` bytes of credit; DATA spends it; the receiver hands it back
with WINDOW_UPDATE once the application has consumed at least half a window.
There is deliberately no session-level window: one stream's stalled reader only
exhausts that stream's credit.  A stream whose reader keeps up gets a larger
window (receive-window auto-tuning, as quic-go and libp2p's yamux do), up to
``max_window`` and within a ``growth_budget`` shared by the session's streams,
so a bulk transfer is not held back by credit while what a session can make
us buffer stays bounded.  The growth travels as a larger WINDOW_UPDATE, which
any peer accepts: nothing to negotiate.  Both ends must be configured with the same
``initial_window`` and ``max_streams`` (they are not negotiated; a peer that
exceeds ours is treated as a protocol violation).

API
---
``Session(initiator, initial_window=1 MiB, max_record=65519, max_streams=1024, send_buffer=None,
max_window=8 MiB, growth_budget=32 MiB)``

Local actions:

* ``open_stream(header: bytes = b"") -> int`` -- new stream id; the OPEN is queued.
* ``writable(stream_id) -> int`` -- how many more bytes ``send`` accepts now.  The
  per-stream send buffer is limited to ``send_buffer`` (default: the window) so
  a writer facing a slow reader waits instead of growing our memory.  It grows
  as ``next_record`` drains the buffer: wake waiting writers after each record.
* ``send(stream_id, data)`` -- queue data; more than ``writable`` raises
  :class:`FlowControlError`.
* ``direct_room(stream_id) -> int`` and ``seal_direct(stream_id, record)`` --
  when nothing is queued anywhere, a DATA record built in the caller's own
  buffer (8 spare bytes, then the data) instead of queued data: the wire is
  the same as ``send`` + ``next_record`` would make, without a copy.
* ``close(stream_id)`` -- half-close (FIN after the queued data).
* ``reset(stream_id, code=ResetCode.CANCEL)`` -- abort both directions; idempotent.
* ``consumed(stream_id, n)`` -- the application delivered ``n`` received bytes
  to its consumer; credit goes back to the peer (batched).  Never calling it is
  what stops a fast sender from making us buffer without bound.
* ``ping(opaque: bytes)`` (8 bytes) and ``go_away(code=GoAwayCode.NORMAL)``.

I/O:

* ``receive(record: bytes) -> list[Event]`` -- events in wire order:
  :class:`StreamOpened`, :class:`Data`, :class:`StreamEnded`,
  :class:`StreamReset`, :class:`WindowOpened`, :class:`Ping`, :class:`Pong`,
  :class:`GoAway`.  A peer's protocol violation raises :class:`ProtocolError`
  (``reason`` names it); the session is then dead except that ``next_record``
  yields one last GOAWAY(PROTOCOL_ERROR) record worth sending before closing.
  Benign races (frames for a stream we just reset, a WINDOW_UPDATE for a stream
  that just ended) are ignored and counted.
* ``receive_data(record) -> int`` -- the fast path of ``receive`` for a record
  that is one DATA frame: its stream id (the data is ``record[HEADER_SIZE:]``),
  or 0 with nothing done for any other record.
* ``next_record() -> bytes | None`` -- control frames first, then one turn per
  ready stream in round-robin order (at most one chunk each per turn), packed
  up to ``max_record`` bytes; ``None`` when nothing can be sent now.

State: ``stream_count``, ``is_open(stream_id)``, ``failed`` (the ProtocolError
reason, or None), ``goaway_received``, ``counters`` (a dict of ints for stats).
Helpers, from :mod:`dataplane.frames`: ``encode_frame`` and ``decode_record`` (framing only,
for tests and tools).
A stream is forgotten once both sides have sent FIN (ours after its queued data
was emitted) or either side reset it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final

from dataplane.frames import (
    DATA,
    HEADER,
    HEADER_SIZE,
    MAX_OPEN_HEADER,
    MAX_STREAM_ID,
    PING_LEN,
    U32,
    Frame,
    FrameType,
    GoAwayCode,
    ProtocolError,
    ResetCode,
    decode_record,
    encode_frame,
    iter_frames,
)

__all__ = [
    "DEFAULT_MAX_RECORD",
    "DEFAULT_WINDOW",
    "HEADER_SIZE",
    "MAX_OPEN_HEADER",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "MIN_RECORD",
    "Data",
    "Event",
    "FlowControlError",
    "Frame",
    "FrameType",
    "GoAway",
    "GoAwayCode",
    "MuxError",
    "Ping",
    "Pong",
    "ProtocolError",
    "ResetCode",
    "Session",
    "StreamClosedError",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "TooManyStreamsError",
    "WindowOpened",
    "decode_record",
    "encode_frame",
    "take_chunks",
]

#: RFC 9113 §6.9.1: a flow-control window may not exceed 2^31 - 1.
MAX_WINDOW: Final = (1 << 31) - 1
#: Per-stream window: what one stream may have in flight, and so what a slow
#: reader can make the receiving agent hold for it.  Four times yamux's 256 KiB,
#: at which a single bulk stream stalls on credit (docs/dataplane.md, "Windows and records").
DEFAULT_WINDOW: Final = 1024 * 1024
#: How far a stream's window may grow while its reader keeps up: the tunnel's
#: own TCP buffers hold more than the initial window, so without growth a bulk
#: stream is paced by the credit loop, not by the agents (docs/dataplane.md,
#: "Windows and records").
DEFAULT_MAX_WINDOW: Final = 8 * 1024 * 1024
#: The most that growth adds to one session's windows, all streams together: what
#: a session can make us buffer is at most streams x initial_window + this.
DEFAULT_GROWTH_BUDGET: Final = 32 * 1024 * 1024
#: The largest Noise transport message is 65,535 bytes including the 16-byte
#: AEAD tag (Noise section 3); full-size records mean 4x fewer cipher calls,
#: length prefixes and dispatches per byte than 16 KiB ones (docs/dataplane.md,
#: "Windows and records").
DEFAULT_MAX_RECORD: Final = 65535 - 16
#: A record must always fit the largest control frame (an OPEN with a full header).
MIN_RECORD: Final = HEADER_SIZE + MAX_OPEN_HEADER
#: Below this much room left in a record, a larger chunk waits for the next
#: record rather than going out as a sliver that costs a header for little data.
_MIN_FRAGMENT: Final = 256


# -- errors -----------------------------------------------------------------------


class MuxError(Exception):
    """Misuse of the session by the local application, or a dead session."""


class StreamClosedError(MuxError):
    """The stream is unknown, reset, or already half-closed by us.

    Expected in normal operation: a peer's RST can overtake a local writer.
    """


class FlowControlError(MuxError):
    """``send`` was handed more than ``writable`` allows: the caller must wait."""


class TooManyStreamsError(MuxError):
    """Opening one more stream would exceed ``max_streams``; wait for one to end."""


# -- events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    stream_id: int
    header: bytes


@dataclass(frozen=True, slots=True)
class Data:
    """Stream bytes, as a view of the record given to ``receive``: valid as long as
    that record is, so a caller that reuses its record buffer copies what it keeps
    (the tunnel writes most of it straight into a socket and copies the rest)."""

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed: no more data will arrive, we may still send."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer granted send credit: queued data of this stream can move again."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class Ping:
    """Informational: the PONG is already queued."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAway:
    """The peer opens no more streams and refuses ours; existing streams go on."""

    code: int


Event = StreamOpened | Data | StreamEnded | StreamReset | WindowOpened | Ping | Pong | GoAway


def take_chunks(queue: deque[bytes | memoryview], n: int, out: list[bytes | memoryview]) -> None:
    """Move the first ``n`` bytes of a queue of chunks to ``out``, as views: no byte is copied.

    The queue must hold at least ``n`` bytes; a chunk split in two leaves its
    tail at the head of the queue.  (The tunnel's receive side uses it too.)
    """
    while n:
        chunk = queue[0]
        if len(chunk) <= n:
            queue.popleft()
            out.append(chunk)
            n -= len(chunk)
        else:
            view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
            out.append(view[:n])
            queue[0] = view[n:]
            n = 0


# -- state ------------------------------------------------------------------------


class _Stream:
    __slots__ = (
        "id", "local", "open_sent", "dead",
        "send_credit", "queue", "queued", "fin_queued", "fin_sent", "scheduled",
        "recv_credit", "unconsumed", "pending_credit", "fin_received", "window",
    )  # fmt: skip

    def __init__(self, stream_id: int, local: bool, window: int) -> None:
        self.id = stream_id
        self.local = local  # we opened it
        # A peer-opened stream is known to both sides from the start; ours only
        # once its OPEN has gone out, and no DATA may precede that.
        self.open_sent = not local
        self.dead = False
        # Sending side.
        self.send_credit = window
        # Queued data as the chunks send() was given (a slice of the first one
        # once part of it went out): appending and taking never copy, unlike a
        # bytearray whose front is cut while its end grows.
        self.queue: deque[bytes | memoryview] = deque()
        self.queued = 0
        self.fin_queued = False
        self.fin_sent = False
        self.scheduled = False
        # Receiving side: recv_credit + unconsumed + pending_credit == window.
        self.recv_credit = window
        self.unconsumed = 0
        self.pending_credit = 0
        self.fin_received = False
        # The receive window: it grows while the reader keeps up (Session.consumed).
        self.window = window

    def sendable(self) -> bool:
        if not self.open_sent or self.fin_sent or self.dead:
            return False
        if self.queued:
            return self.send_credit > 0
        return self.fin_queued  # FIN consumes no credit (yamux, RFC 9113 §6.9)


_COUNTERS: Final = (
    "records_in", "records_out", "frames_in", "frames_out", "data_bytes_in", "data_bytes_out",
    "streams_opened_local", "streams_opened_remote", "streams_closed", "streams_reset_local",
    "streams_reset_remote", "streams_refused", "window_updates_in", "window_updates_out",
    "pings_in", "pongs_in", "ignored_after_reset", "ignored_after_close", "windows_grown",
)  # fmt: skip


class Session:
    """One end of a multiplexed session; see the module docstring for the contract."""

    def __init__(
        self,
        initiator: bool,
        initial_window: int = DEFAULT_WINDOW,
        max_record: int = DEFAULT_MAX_RECORD,
        max_streams: int = 1024,
        send_buffer: int | None = None,
        max_window: int | None = None,
        growth_budget: int = DEFAULT_GROWTH_BUDGET,
    ) -> None:
        if not 1 <= initial_window <= MAX_WINDOW:
            raise ValueError(f"initial_window must be in [1, {MAX_WINDOW}]")
        if max_window is None:
            max_window = max(initial_window, DEFAULT_MAX_WINDOW)
        if not initial_window <= max_window <= MAX_WINDOW:
            raise ValueError(f"max_window must be in [initial_window, {MAX_WINDOW}]")
        if growth_budget < 0:
            raise ValueError("growth_budget must not be negative")
        if max_record < MIN_RECORD:
            raise ValueError(f"max_record must be at least {MIN_RECORD}")
        if max_streams < 1:
            raise ValueError("max_streams must be positive")
        if send_buffer is not None and send_buffer < 1:
            raise ValueError("send_buffer must be positive")
        self.initiator = initiator
        self.initial_window = initial_window
        self.max_record = max_record
        self.max_streams = max_streams
        self.send_buffer = initial_window if send_buffer is None else send_buffer
        self.max_window = max_window
        #: What growth may still add to this session's windows (returned as streams end).
        self.growth_left = growth_budget
        self._max_chunk = max_record - HEADER_SIZE
        self._next_id = 1 if initiator else 2
        self._peer_parity = 0 if initiator else 1
        self._peer_highest = 0
        self._streams: dict[int, _Stream] = {}
        self._local_count = 0
        self._remote_count = 0
        # Frames that jump the data queue; an OPEN entry carries its stream so
        # that a stream reset before its OPEN left is never announced at all.
        self._control: deque[tuple[_Stream | None, bytes]] = deque()
        # Peer-triggered control frames (PONG, refusals) are capped so a peer
        # that pings without reading cannot grow this queue without bound
        # (the "ping flood", CVE-2019-9512).
        self._control_limit = 4 * max_streams + 256
        self._ready: deque[_Stream] = deque()
        # Ids we reset lately: the peer may still have frames for them in flight
        # (RFC 9113 §5.4.2 / §6.4 "closed" state).  Bounded, oldest forgotten first.
        self._recently_reset: dict[int, None] = {}
        self._recently_reset_limit = 2 * max_streams + 64
        self._goaway_sent = False
        self._goaway_received = False
        self._failed: str | None = None
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    # -- introspection ------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def failed(self) -> str | None:
        """The reason of the ProtocolError that killed the session, if any."""
        return self._failed

    @property
    def goaway_received(self) -> bool:
        return self._goaway_received

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # -- local actions ------------------------------------------------------------

    def open_stream(self, header: bytes = b"") -> int:
        self._check_alive()
        if self._goaway_sent or self._goaway_received:
            raise MuxError("session is going away: open streams on a new session")
        if len(header) > MAX_OPEN_HEADER:
            raise ValueError(f"OPEN header of {len(header)} bytes exceeds {MAX_OPEN_HEADER}")
        if self._local_count >= self.max_streams:
            raise TooManyStreamsError(f"{self._local_count} streams open, max_streams is {self.max_streams}")
        sid = self._next_id
        if sid > MAX_STREAM_ID:
            # RFC 9113 §5.1.1: ids cannot be reused; a new session is needed.
            raise MuxError("stream ids exhausted: open streams on a new session")
        self._next_id += 2
        st = _Stream(sid, local=True, window=self.initial_window)
        self._streams[sid] = st
        self._local_count += 1
        self._control.append((st, encode_frame(FrameType.OPEN, sid, bytes(header))))
        self.counters["streams_opened_local"] += 1
        return sid

    def writable(self, stream_id: int) -> int:
        st = self._sending_stream(stream_id)
        return max(0, self.send_buffer - st.queued)

    def has_output(self) -> bool:
        """Whether ``next_record`` may have something to send (a cheap test; False is exact)."""
        return bool(self._control) or bool(self._ready)

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        st = self._sending_stream(stream_id)
        room = self.send_buffer - st.queued
        if len(data) > room:
            raise FlowControlError(
                f"stream {stream_id}: {len(data)} bytes offered, only {max(0, room)} writable; wait for writable()"
            )
        if data:
            # bytes are immutable, so they (and views of them: a large send cut to
            # the room there is) are kept as given; anything else is copied now,
            # since the caller may reuse its buffer.
            if isinstance(data, bytes) or (isinstance(data, memoryview) and isinstance(data.obj, bytes)):
                st.queue.append(data)
            else:
                st.queue.append(bytes(data))
            st.queued += len(data)
            self._schedule(st)

    def direct_room(self, stream_id: int) -> int:
        """How many bytes ``seal_direct`` takes for this stream now; 0 when its data must queue.

        Data may skip the queue only when nothing would be overtaken: no
        control frame pending, no stream waiting for its turn, nothing of this
        stream's own queued; and only as much as the peer's credit allows.  So
        the wire carries exactly what ``send`` + ``next_record`` would have
        produced, in the same order, minus the queueing and the copy.
        """
        st = self._direct_stream(stream_id)
        return 0 if st is None else min(st.send_credit, self._max_chunk)

    def _direct_stream(self, stream_id: int) -> _Stream | None:
        """The stream, if its data may skip the queue now (credit aside); see ``direct_room``."""
        if self._control or self._ready or self._failed is not None:
            return None
        st = self._streams.get(stream_id)
        if st is None or st.queued or st.fin_queued or not st.open_sent:
            return None
        return st

    def out_of_credit(self, stream_id: int) -> bool:
        """Whether the stream has nothing queued and no credit: its next data waits for a WINDOW_UPDATE."""
        st = self._streams.get(stream_id)
        return st is not None and st.send_credit == 0 and not st.queued and not st.fin_queued

    def seal_direct(self, stream_id: int, record: bytearray | memoryview) -> None:
        """Make ``record`` -- 8 spare bytes, then the data -- a one-frame DATA record
        and account for it as sent: the caller encrypts and sends it now.

        The zero-copy path for a proxy that reads a socket straight into a
        buffer behind room for the header.  The data must fit ``direct_room``.
        """
        n = len(record) - HEADER_SIZE
        st = self._direct_stream(stream_id)
        if st is None or not 0 < n <= min(st.send_credit, self._max_chunk):
            raise FlowControlError(f"stream {stream_id}: {n} bytes cannot skip the queue now; see direct_room()")
        st.send_credit -= n
        HEADER.pack_into(record, 0, DATA, stream_id, n >> 16, n & 0xFFFF)
        counters = self.counters
        counters["data_bytes_out"] += n
        counters["records_out"] += 1
        counters["frames_out"] += 1

    def close(self, stream_id: int) -> None:
        st = self._sending_stream(stream_id)
        st.fin_queued = True
        self._schedule(st)

    def reset(self, stream_id: int, code: int = ResetCode.CANCEL) -> None:
        """Abort the stream both ways; a no-op for a stream already gone (races are normal)."""
        self._check_alive()
        if not 0 <= code <= 0xFFFFFFFF:
            raise ValueError("reset code must fit in a u32")
        st = self._streams.get(stream_id)
        if st is None:
            return
        if st.open_sent:
            self._control.append((None, encode_frame(FrameType.RST, stream_id, U32.pack(code))))
            self._remember_reset(stream_id)
        self.counters["streams_reset_local"] += 1
        self._forget(st)

    def consumed(self, stream_id: int, n: int) -> None:
        self._check_alive()
        if n < 0:
            raise ValueError("consumed a negative number of bytes")
        st = self._streams.get(stream_id)
        if st is None:
            return  # it ended or was reset meanwhile: nobody needs the credit
        if n > st.unconsumed:
            raise MuxError(f"stream {stream_id}: consumed {n} bytes but only {st.unconsumed} were delivered")
        st.unconsumed -= n
        if st.fin_received:
            return  # the peer sends no more, so credit would be wasted frames
        st.pending_credit += n
        # yamux "Flow Control": only send an update once half the window is
        # consumed, so a reader taking small bites costs one frame per half window.
        if st.pending_credit >= max(1, st.window // 2):
            increment = st.pending_credit
            if not st.unconsumed and st.window < self.max_window and self.growth_left:
                # The reader has taken everything delivered so far, so the window
                # and not the reader is what paces this stream: double it.  A
                # reader that lags holds unconsumed bytes here and never grows.
                extra = min(st.window, self.max_window - st.window, self.growth_left)
                self.growth_left -= extra
                st.window += extra
                increment += extra
                self.counters["windows_grown"] += 1
            self._control.append((None, encode_frame(FrameType.WINDOW_UPDATE, stream_id, U32.pack(increment))))
            st.recv_credit += increment
            st.pending_credit = 0
            self.counters["window_updates_out"] += 1

    def ping(self, opaque: bytes) -> None:
        """Queue a PING; the caller matches the PONG's opaque bytes to time a round trip."""
        self._check_alive()
        if len(opaque) != PING_LEN:
            raise ValueError(f"ping payload must be {PING_LEN} bytes")
        self._control.append((None, encode_frame(FrameType.PING, 0, bytes(opaque))))

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Stop opening streams both ways; existing streams finish normally."""
        self._check_alive()
        if not 0 <= code <= 0xFFFFFFFF:
            raise ValueError("goaway code must fit in a u32")
        if not self._goaway_sent:
            self._goaway_sent = True
            self._control.append((None, encode_frame(FrameType.GOAWAY, 0, U32.pack(code))))

    # -- output -------------------------------------------------------------------

    def next_record(self) -> bytes | None:
        out: list[bytes | memoryview] = []
        frames = 0
        room = self.max_record
        # Control frames first: credit and resets unblock the peer, and an
        # OPEN must precede its stream's data.
        while self._control:
            st, frame = self._control[0]
            if len(frame) > room:
                return self._finish(out, frames)
            self._control.popleft()
            if st is not None:  # an OPEN
                if st.dead:
                    continue
                st.open_sent = True
                self._schedule(st)
            out.append(frame)
            room -= len(frame)
            frames += 1
        # Then one turn per ready stream, round robin: a turn is at most one
        # chunk, so a bulk stream cannot starve the others (yamux and RFC 9113
        # §5.3 leave scheduling to the sender; this is plain fair queueing).
        while self._ready and room > HEADER_SIZE:
            st = self._ready.popleft()
            st.scheduled = False
            if not st.sendable():
                continue
            if st.queued:
                want = min(st.queued, st.send_credit, self._max_chunk)
                fits = room - HEADER_SIZE
                if fits < want and fits < _MIN_FRAGMENT and frames:
                    # Its turn is not over: it goes first in the next record.
                    self._ready.appendleft(st)
                    st.scheduled = True
                    break
                n = min(want, fits)
                out.append(HEADER.pack(DATA, st.id, n >> 16, n & 0xFFFF))
                take_chunks(st.queue, n, out)
                st.queued -= n
                st.send_credit -= n
                room -= HEADER_SIZE + n
                frames += 1
                self.counters["data_bytes_out"] += n
            if not st.queued and st.fin_queued and room >= HEADER_SIZE:
                out.append(encode_frame(FrameType.FIN, st.id))
                room -= HEADER_SIZE
                frames += 1
                st.fin_sent = True
                self._maybe_forget(st)
            self._schedule(st)
        return self._finish(out, frames)

    def _finish(self, out: list[bytes | memoryview], frames: int) -> bytes | None:
        if not out:
            return None
        self.counters["records_out"] += 1
        self.counters["frames_out"] += frames
        return b"".join(out)  # the record's one copy

    # -- input --------------------------------------------------------------------

    def receive_data(self, record: bytes | memoryview) -> int:
        """``receive`` for the commonest record, one DATA frame: its stream id, or 0.

        When ``record`` is exactly one DATA frame for an open stream, within its
        credit, this accounts for it as ``receive`` would and returns the stream
        id; the data is ``record[HEADER_SIZE:]``.  For anything else -- other
        frames, several frames, any error or race -- it changes nothing and
        returns 0: hand the record to ``receive``, which applies every rule.
        (Stream id 0 is never a DATA stream.)  No event objects, no frame loop.
        """
        n = len(record) - HEADER_SIZE
        if n <= 0 or record[0] != DATA or self._failed is not None:
            return 0
        _, sid, hi, lo = HEADER.unpack_from(record)
        if (hi << 16) | lo != n:
            return 0
        st = self._streams.get(sid)
        if st is None or not st.open_sent or st.fin_received or n > st.recv_credit:
            return 0
        st.recv_credit -= n
        st.unconsumed += n
        counters = self.counters
        counters["records_in"] += 1
        counters["frames_in"] += 1
        counters["data_bytes_in"] += n
        return int(sid)

    def receive(self, record: bytes | memoryview) -> list[Event]:
        self._check_alive()
        try:
            return self._receive(record)
        except ProtocolError as exc:
            self._fail(exc.reason)
            raise

    def _receive(self, record: bytes | memoryview) -> list[Event]:
        events: list[Event] = []
        self.counters["records_in"] += 1
        for ftype, sid, payload in iter_frames(record):
            self.counters["frames_in"] += 1
            if ftype is FrameType.DATA:
                st = self._receiving_stream(sid, ftype)
                if st is None:
                    continue
                if st.fin_received:
                    # RFC 9113 §5.1 half-closed (remote): only WINDOW_UPDATE and RST may follow.
                    raise ProtocolError("stream_closed", f"DATA after FIN on stream {sid}")
                n = len(payload)
                if n > st.recv_credit:
                    # RFC 9113 §6.9.1 / yamux: a sender must not exceed the window.
                    raise ProtocolError("flow_control", f"{n} bytes on stream {sid} with {st.recv_credit} of credit")
                st.recv_credit -= n
                st.unconsumed += n
                self.counters["data_bytes_in"] += n
                events.append(Data(sid, payload))
            elif ftype is FrameType.WINDOW_UPDATE:
                (increment,) = U32.unpack(payload)
                if increment == 0:
                    raise ProtocolError("zero_window_increment", f"stream {sid}")  # RFC 9113 §6.9
                st = self._receiving_stream(sid, ftype)
                if st is None:
                    continue
                if st.send_credit + increment > MAX_WINDOW:
                    raise ProtocolError("flow_control", f"window of stream {sid} overflows 2^31-1")  # RFC 9113 §6.9.1
                st.send_credit += increment
                self.counters["window_updates_in"] += 1
                if not st.fin_queued:
                    events.append(WindowOpened(sid))
                self._schedule(st)
            elif ftype is FrameType.OPEN:
                opened = self._accept(sid, bytes(payload))
                if opened is not None:
                    events.append(opened)
            elif ftype is FrameType.FIN:
                st = self._receiving_stream(sid, ftype)
                if st is None:
                    continue
                if st.fin_received:
                    raise ProtocolError("stream_closed", f"second FIN on stream {sid}")
                st.fin_received = True
                events.append(StreamEnded(sid))
                self._maybe_forget(st)
            elif ftype is FrameType.RST:
                (code,) = U32.unpack(payload)
                st = self._receiving_stream(sid, ftype)
                if st is None:
                    continue
                self.counters["streams_reset_remote"] += 1
                self._forget(st)
                events.append(StreamReset(sid, code))
            elif ftype is FrameType.PING:
                self._control_from_peer(encode_frame(FrameType.PONG, 0, bytes(payload)))
                self.counters["pings_in"] += 1
                events.append(Ping(bytes(payload)))
            elif ftype is FrameType.PONG:
                self.counters["pongs_in"] += 1
                events.append(Pong(bytes(payload)))
            else:  # GOAWAY
                (code,) = U32.unpack(payload)
                self._goaway_received = True
                events.append(GoAway(code))
        return events

    def _accept(self, sid: int, header: bytes) -> StreamOpened | None:
        if sid & 1 != self._peer_parity:
            raise ProtocolError("bad_stream_id", f"peer opened stream {sid} of our parity")  # yamux "Stream ID"
        if sid <= self._peer_highest:
            # RFC 9113 §5.1.1: a new stream id must exceed every id the peer used.
            raise ProtocolError("bad_stream_id", f"stream {sid} reused (highest was {self._peer_highest})")
        self._peer_highest = sid
        if self._goaway_sent:
            # The peer had not seen our GOAWAY yet: refuse, so it may retry elsewhere.
            self._control_from_peer(encode_frame(FrameType.RST, sid, U32.pack(ResetCode.REFUSED)))
            self._remember_reset(sid)
            self.counters["streams_refused"] += 1
            return None
        if self._remote_count >= self.max_streams:
            # Both ends share max_streams and forget a stream in the same frame
            # order, so a correct peer never gets here (cf. RFC 9113 §5.1.2).
            raise ProtocolError("too_many_streams", f"peer has {self._remote_count} open, max is {self.max_streams}")
        self._streams[sid] = _Stream(sid, local=False, window=self.initial_window)
        self._remote_count += 1
        self.counters["streams_opened_remote"] += 1
        return StreamOpened(sid, header)

    def _receiving_stream(self, sid: int, ftype: FrameType) -> _Stream | None:
        """The live stream a peer frame is for, None for a benign race, else ProtocolError."""
        st = self._streams.get(sid)
        if st is not None:
            if not st.open_sent:
                raise ProtocolError("idle_stream", f"{ftype.name} on stream {sid} before its OPEN was sent")
            return st
        if sid in self._recently_reset:
            # RFC 9113 §5.4.2: frames the peer sent before it saw our RST.
            self.counters["ignored_after_reset"] += 1
            return None
        highest = self._peer_highest if sid & 1 == self._peer_parity else self._next_id - 2
        if sid > highest:
            # RFC 9113 §5.1 "idle": only an OPEN may name a stream not yet opened.
            raise ProtocolError("idle_stream", f"{ftype.name} on never-opened stream {sid}")
        if ftype is FrameType.WINDOW_UPDATE or ftype is FrameType.RST:
            # The peer may return credit or reset after its FIN, racing our FIN
            # (RFC 9113 §5.1 "closed": WINDOW_UPDATE / RST_STREAM must be ignored).
            self.counters["ignored_after_close"] += 1
            return None
        raise ProtocolError("stream_closed", f"{ftype.name} on closed stream {sid}")

    # -- helpers ------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise MuxError(f"session failed: {self._failed}")

    def _sending_stream(self, stream_id: int) -> _Stream:
        self._check_alive()
        st = self._streams.get(stream_id)
        if st is None:
            raise StreamClosedError(f"stream {stream_id} is not open")
        if st.fin_queued:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        return st

    def _schedule(self, st: _Stream) -> None:
        if not st.scheduled and st.sendable():
            st.scheduled = True
            self._ready.append(st)

    def _control_from_peer(self, frame: bytes) -> None:
        if len(self._control) >= self._control_limit:
            raise ProtocolError("control_flood", f"{len(self._control)} control frames pending")
        self._control.append((None, frame))

    def _remember_reset(self, sid: int) -> None:
        self._recently_reset[sid] = None
        if len(self._recently_reset) > self._recently_reset_limit:
            del self._recently_reset[next(iter(self._recently_reset))]

    def _maybe_forget(self, st: _Stream) -> None:
        if st.fin_sent and st.fin_received:
            self.counters["streams_closed"] += 1
            self._forget(st)

    def _forget(self, st: _Stream) -> None:
        # A scheduled entry may linger in _ready; the dead flag makes it a no-op.
        st.dead = True
        st.queue.clear()
        st.queued = 0
        self.growth_left += st.window - self.initial_window
        del self._streams[st.id]
        if st.local:
            self._local_count -= 1
        else:
            self._remote_count -= 1

    def _fail(self, reason: str) -> None:
        self._failed = reason
        for st in list(self._streams.values()):
            self._forget(st)
        self._ready.clear()
        self._control.clear()
        # The caller should send this last record before closing the transport.
        self._control.append((None, encode_frame(FrameType.GOAWAY, 0, U32.pack(GoAwayCode.PROTOCOL_ERROR))))
