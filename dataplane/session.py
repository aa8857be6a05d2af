"""A tunnel session: one encrypted connection to a peer, the streams on it, and its I/O tasks.

(Over 700 lines because the read path, the write path and the session's life
share its state and end it together; split up, each part would reach into the others.)

It joins the sans-I/O pieces to a transport: the Noise keys of
:mod:`dataplane.handshake` and :mod:`dataplane.rekey` seal and open records,
:mod:`dataplane.mux` multiplexes the streams (:mod:`dataplane.stream`) over
them, and :mod:`dataplane.buffers` holds the bytes in between.  Any failure
kills the whole session loudly, so a proxied connection is reset rather than
silently truncated (docs/dataplane.md, "Tunnels").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, Protocol

import trio

from dataplane import mux
from dataplane.buffers import WRITE_BATCH, Outbox, Reader, Truncated
from dataplane.handshake import Established
from dataplane.noise import CipherState, NoiseError
from dataplane.rawsocket import RawSocketStream
from dataplane.reactor import Reactor
from dataplane.rekey import CONTROL_MIN, RESPONDER_REKEY_SLACK, Rekey, Step
from dataplane.stream import StreamResetError, TunnelStream

__all__ = ["SessionHost", "StreamHandler", "TunnelSession"]

#: A mux PING with this payload means "I open no more streams on this session".
_DRAIN: Final = b"MESH-DRN"
_RTT_PING: Final = b"MESH-RTT"
#: How long a closing session may spend flushing its last records.
_FLUSH_TIMEOUT: Final = 1.0
#: What a reactor batch may seal into one tunnel before it is sent anyway: a few dozen small requests,
#: far below WRITE_BATCH, past which direct senders would queue.
CORK_MAX: Final = 64 * 1024
#: How long a dead session's stream handlers get to notice before they are cancelled.
_HANDLER_GRACE: Final = 5.0

#: ``on_stream(peer_name, header, stream)``: serve a stream the peer opened.
StreamHandler = Callable[[str, bytes, TunnelStream], Awaitable[None]]


class SessionHost(Protocol):
    """What a session uses of the agent's tunnel manager (dataplane.tunnel.TunnelManager)."""

    name: str
    log: Any
    stats: MutableMapping[str, int]
    reactor: Reactor
    scratch: memoryview
    on_stream: StreamHandler | None
    idle_timeout: float
    rekey_after_messages: int
    rekey_after_time: float
    reject_after_messages: int
    reject_after_time: float

    def session_draining(self, sess: TunnelSession) -> None:
        """``sess`` opens no more streams: new ones must go to another session."""
        ...

    def session_ended(self, sess: TunnelSession) -> None:
        """``sess`` is dead: forget it."""
        ...


class TunnelSession:
    """One encrypted connection to a peer and the streams on it (docs/dataplane.md, "Tunnels")."""

    def __init__(
        self,
        manager: SessionHost,
        keys: Established,
        *,
        initiator: bool,
        transport: trio.abc.Stream,
        reader: Reader,
        static_private: bytes,
    ) -> None:
        self.manager = manager
        self.peer = peer = keys.peer
        self.initiator = initiator
        #: Name of the agent that dialled: what the duplicate tie-break compares.
        self.initiator_name = manager.name if initiator else peer
        self.transport = transport
        self._reader = reader
        self._send_cipher = keys.send
        self._recv_cipher = keys.recv
        #: Key renewal (docs/dataplane.md, "Rekey"): the writer applies its send key
        #: switches in wire order (_gather), the reader its receive key switches.
        self._rekey = Rekey(static_private, keys.peer_static, keys.handshake_hash, initiator=initiator)
        #: The proxied sockets' pumps read into this (dataplane.stream.new_scratch).
        self.scratch = manager.scratch
        #: Where this session's reader and its streams' pumps wait (dataplane.reactor).
        self.reactor = manager.reactor
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
        self._out = Outbox()
        #: The transport when it is a plain socket: the reactor's and try_send's fast paths.
        self._raw = transport if isinstance(transport, RawSocketStream) else None
        self._try_send = self._raw.try_send if self._raw is not None else None
        #: The writer task waits for the socket: only it may send until it is writable again.
        self._writer_waiting = False
        #: A send is deferred to the end of the reactor's batch (send_direct).
        self._corked = False
        #: Set once _out drains below WRITE_BATCH, for pump_from waiting on a full one.
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
                    self.terminate("internal_error", error=True)
                self.terminate("closed", error=False)
                self._io = None
                await trio.aclose_forcefully(self.transport)
                handlers.cancel_scope.deadline = trio.current_time() + _HANDLER_GRACE
        finally:
            self.terminate("closed", error=False)
            self._io = None
            await trio.aclose_forcefully(self.transport)

    def terminate(self, reason: str, *, error: bool, flush: bool = False) -> None:
        """End the session: fail every stream on it, unregister, stop the I/O tasks."""
        if self.dead:
            return
        self.dead = True
        self.reason = reason
        self.manager.session_ended(self)
        for st in list(self.streams.values()):
            st.fail(f"tunnel to {self.peer} failed: {reason}", None)
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
        self.manager.session_draining(self)
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
            self.terminate("drained", error=False, flush=True)

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
            st.fail("stream no longer open", None)
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
            st.fail("stream no longer open", None)
            raise StreamResetError("stream no longer open") from None
        self._finishing.add(st.stream_id)
        self._write()

    def local_close(self, st: TunnelStream, *, clean: bool) -> None:
        """The application closed ``st``; ``clean``: after its send_eof, with nothing left unread."""
        if self.dead or self.streams.get(st.stream_id) is not st:
            return
        if not self.mux.is_open(st.stream_id):
            self._remove(st)
        elif not clean:
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
        reactor = self.reactor
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
                    self.terminate(f"receive failed ({exc.__class__.__name__})", error=bool(self.streams))
                    return
                if self.dead:
                    return
            try:
                msg = await self._reader.read_view()
            except Truncated:
                self.terminate("truncated", error=True)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.terminate(f"receive failed ({exc.__class__.__name__})", error=bool(self.streams))
                return
            if msg is None:
                # The peer closed.  Harmless if nothing was in flight; otherwise
                # the streams on it fail (in terminate) rather than end quietly.
                busy = bool(self.streams) or self.mux.stream_count > 0
                self.terminate("peer closed the connection", error=busy)
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
            self.terminate(f"decrypt failed ({exc.reason})", error=True)
            return False
        return self._handle_plaintext(record)

    def _handle_plaintext(self, record: bytes | memoryview) -> bool:
        """Route one decrypted transport message: a session control record or a mux record."""
        if self.dead:
            return False
        if record and record[0] >= CONTROL_MIN:
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
            st = self.streams.get(sid)
            if st is None or not st.on_data(record[mux.HEADER_SIZE :]):
                self._refuse_data(sid, st)
            if self.mux.has_output():  # a credit update the delivery released
                self._write()
            return not self.dead
        try:
            events = self.mux.receive(record)
        except mux.ProtocolError as exc:
            self.manager.stats["protocol_errors"] += 1
            self.terminate(f"protocol error ({exc.reason})", error=True, flush=True)
            return False
        for ev in events:
            self._dispatch(ev)
        if self.mux.has_output():  # a PONG, a reset, or data that fresh credit lets out
            self._write()
        self._maybe_finish_drain()
        return not self.dead

    def _refuse_data(self, sid: int, st: TunnelStream | None) -> None:
        """Data for a stream the application closed: reset it, as TCP would."""
        self.mux.reset(sid, mux.ResetCode.CANCEL)
        if st is not None:
            self._remove(st)

    def _dispatch(self, ev: mux.Event) -> None:
        if isinstance(ev, mux.Data):
            st = self.streams.get(ev.stream_id)
            if st is None or not st.on_data(ev.data):
                self._refuse_data(ev.stream_id, st)
        elif isinstance(ev, mux.StreamOpened):
            self._accept_stream(ev.stream_id, ev.header)
        elif isinstance(ev, mux.StreamEnded):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.on_eof()
                if not self.mux.is_open(ev.stream_id):
                    self._remove(st)
        elif isinstance(ev, mux.StreamReset):
            st = self.streams.get(ev.stream_id)
            if st is not None:
                st.fail(f"stream reset by {self.peer} (code {ev.code})", ev.code)
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
                st.wake_sender()

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
        """Encrypt what is ready into ``_out``, up to WRITE_BATCH; False if the session just failed.

        Encryption happens only here, in wire order, so a key switch queued with
        a control record lands exactly after that record.  Synchronous, so a
        cancellation can never split a record.
        """
        out = self._out
        produced = False
        try:
            while len(out) < WRITE_BATCH:
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
            self.terminate(f"encrypt failed ({exc.reason})", error=True)
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
        if self.dead or self._control_out or len(self._out) >= WRITE_BATCH:
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
            self.terminate(f"encrypt failed ({exc.reason})", error=True)
            return
        if self._control_out or self._try_send is None or self._writer_waiting:
            self._write()  # a rekey to send as well, or the writer task's turn
        elif self.reactor.in_batch and len(self._out) < CORK_MAX:
            # Sent with the rest of the reactor's batch (dataplane.reactor, "Sends at the end of a
            # batch"): _out keeps the order records were sealed in, whoever sends it.
            if not self._corked:
                self._corked = True
                self.reactor.defer(self._uncork)
        else:
            self._uncork()

    def _uncork(self) -> None:
        self._corked = False
        if not self.dead and self._send_now() and self._out:
            self._kick.set()  # the kernel is full: the writer task waits for it
        # Else all is out, and nothing can have been queued meanwhile
        # (direct_room saw to it): _write's look at the queues would find none.

    def _send_failed(self, exc: Exception) -> None:
        self.terminate(f"send failed ({exc.__class__.__name__})", error=True)

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
            if self._out_room is not None and len(self._out) < WRITE_BATCH:
                self._wake_out_room()
        return True

    def out_full(self) -> bool:
        """Whether ``_out`` holds a full batch the kernel has not taken: a direct sender should wait."""
        return len(self._out) >= WRITE_BATCH and not self.dead

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
            # _gather stopped at WRITE_BATCH and the kernel took it all: go on

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
            if st.unusable() or not self.mux.is_open(st.stream_id):
                ready = True
            else:
                ready = self.mux.writable(st.stream_id) > 0
            if ready:
                self.blocked.discard(st)
                st.wake_sender()
        for sid in list(self._finishing):
            if not self.mux.is_open(sid):
                self._finishing.discard(sid)
                done = self.streams.get(sid)
                if done is not None:
                    self._remove(done)

    # -- rekey --------------------------------------------------------------------------

    def start_rekey(self, reason: str) -> bool:
        """Begin replacing this session's keys; False if a rekey is already under way.

        The INIT goes out as a control record under the current key, ahead of
        any queued mux record; mux records keep going out under the current key
        until the REPLY arrives, so no stream waits.
        """
        if self.dead:
            return False
        init = self._rekey.start()
        if init is None:
            return False
        self._control_out.append((init, None))
        self._kick.set()
        self.log.debug("tunnel_rekey_started", reason=reason)
        return True

    def _handle_control(self, record: bytes | memoryview) -> bool:
        rekey = self._rekey
        collisions = rekey.collisions
        try:
            step: Step | None = rekey.receive(record)
        except NoiseError as exc:
            step, failure = None, exc.reason
        self.manager.stats["rekey_collisions"] += rekey.collisions - collisions
        if step is None:
            self._key_failure(f"rekey failed: {failure}")
            return False
        if step.recv is not None:
            self._recv_cipher = step.recv
            self._recv_since = trio.current_time()
            self._key_changed.set()
        if step.send is not None:
            self._control_out.append((step.send, step.next_send))
        if step.rekeyed:
            self._rekeyed()
        self._kick.set()
        return True

    def _switch_send(self, cipher: CipherState) -> None:
        self._send_cipher = cipher
        self._send_since = trio.current_time()
        self._rekey.send_switched()
        self._key_changed.set()

    def _rekeyed(self) -> None:
        # Counted once per rekey on each side: by its initiator on the REPLY, by
        # its responder on the SWITCH.
        self.rekeys += 1
        self.manager.stats["rekeys"] += 1
        self.log.debug("tunnel_rekeyed", rekeys=self.rekeys)

    def _key_failure(self, reason: str) -> None:
        self.manager.stats["rekey_failures"] += 1
        self.terminate(reason, error=True)

    async def _key_loop(self) -> None:
        """Time-based rekey, and the hard limit on a key's age (WireGuard paper §6.2).

        Only the session's initiator renews on time as a rule (the responder waits
        10 % longer, as a fallback), as WireGuard leaves time-based renewal to the
        initiator of the current session: the usual rekey is then one INIT, never two.
        """
        manager = self.manager
        rekey_after = manager.rekey_after_time * (1.0 if self.initiator else RESPONDER_REKEY_SLACK)
        while True:
            now = trio.current_time()
            oldest = min(self._send_since, self._recv_since)
            if now - oldest >= manager.reject_after_time:
                self._key_failure(f"keys older than {manager.reject_after_time:g} s: rekey did not complete")
                return
            wake = oldest + manager.reject_after_time
            if self._rekey.state == "idle":
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
                self.terminate("drain timed out", error=False, flush=True)
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


