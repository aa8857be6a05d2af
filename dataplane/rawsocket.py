"""A TCP stream that only enters trio's scheduler when the kernel says "wait".

Why not ``trio.SocketStream``: each of its ``send``/``recv`` calls ends in a
full scheduler pass (``cancel_shielded_checkpoint``) even when the syscall
succeeded at once.  A proxied request crosses four socket hops and a few
socket calls each, so that pass per call is a large share of the mesh's
latency; a plain non-blocking syscall, plus ``trio.lowlevel.wait_readable``
only when the kernel has nothing, avoids it (docs/dataplane.md, "Raw sockets").

What it keeps of trio's contract:

* Every call is a cancel point: ``checkpoint_if_cancelled`` first (no yield
  unless cancelled), so a cancelled task still stops at its next I/O.
* Fairness: a call that never had to wait still yields to the scheduler every
  ``YIELD_EVERY`` calls, so a socket that always has data (a bulk transfer)
  cannot starve the agent's other tasks.  That yield is cancel-shielded and
  comes after the syscall, so data already read or written is never lost to a
  cancellation.
* The stream error types of ``trio.SocketStream`` (``BrokenResourceError`` for a
  reset or broken pipe, ``ClosedResourceError`` after ``aclose``) and
  ``BusyResourceError`` for two tasks sending (or receiving) at once.
* ``aclose`` calls ``trio.lowlevel.notify_closing`` so a task blocked in a wait
  on this socket is woken with ``ClosedResourceError`` rather than hanging.

It also offers ``try_send``, a synchronous non-blocking send, for callers that
want to hand bytes to the kernel without a task switch.
"""

from __future__ import annotations

import errno
import socket
from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

import trio

if TYPE_CHECKING:
    from dataplane.reactor import OnEnd, OnReady, Reactor

__all__ = ["RECEIVE_SIZE", "YIELD_EVERY", "Fairness", "RawSocketStream", "SocketPump", "connect_tcp"]

#: trio's own default for ``receive_some()`` without a size.
RECEIVE_SIZE: Final = 65536
#: Calls that succeeded without waiting, after which one still yields.
YIELD_EVERY: Final = 16
_CLOSED_ERRNOS: Final = frozenset({errno.EBADF, errno.ENOTSOCK})
_A = TypeVar("_A")
_R = TypeVar("_R", bytes, int)


class Fairness:
    """Counts calls that returned without waiting; every YIELD_EVERY-th one yields.

    The yield is cancel-shielded and comes after the call's work, so what a
    call already read or wrote is never lost to a cancellation there.
    """

    __slots__ = ("streak",)

    def __init__(self) -> None:
        self.streak = 0

    def waited(self) -> None:
        """The call blocked, which let others run: start counting again."""
        self.streak = 0

    async def quick(self) -> None:
        if self.due():
            await trio.lowlevel.cancel_shielded_checkpoint()

    def due(self) -> bool:
        """Count a call that did not wait; True when the caller must now yield
        (``await trio.lowlevel.cancel_shielded_checkpoint()``).  For per-message
        loops, where awaiting ``quick`` costs a coroutine every time."""
        self.streak += 1
        if self.streak >= YIELD_EVERY:
            self.streak = 0
            return True
        return False


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """Map a socket error to the exception ``trio.SocketStream`` would raise."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class RawSocketStream(trio.abc.HalfCloseableStream):
    """A connected stream socket driven by non-blocking syscalls (see the module docstring)."""

    __slots__ = ("_closed", "_emptied", "_eof_sent", "_receiving", "_sending", "_sock", "_fair", "_reactor")

    def __init__(self, sock: socket.socket) -> None:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("RawSocketStream needs a SOCK_STREAM socket")
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # As trio.SocketStream does: a proxy must not sit on small writes (Nagle).
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._sock = sock
        self._fair = Fairness()
        self._sending = False
        self._receiving = False
        #: The last receive got less than it asked for (see _receive).
        self._emptied = False
        self._eof_sent = False
        self._closed = False
        #: The reactor a task waits in for this socket (wait_readable_in), told when it closes.
        self._reactor: Reactor | None = None

    @classmethod
    def adopt(cls, stream: trio.SocketStream | trio.socket.SocketType) -> RawSocketStream:
        """Take over the socket of a ``trio.SocketStream`` or trio socket (not to be used after)."""
        tsock = stream.socket if isinstance(stream, trio.SocketStream) else stream
        sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
        return cls(sock)

    @property
    def raw(self) -> socket.socket:
        """The underlying socket (for options and addresses; do not read or write it)."""
        return self._sock

    # -- receiving ------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = RECEIVE_SIZE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        return await self._receive(self._sock.recv, max_bytes, max_bytes)

    async def receive_into(self, buffer: memoryview) -> int:
        """``receive_some`` into the caller's buffer: the count received, 0 at end of stream.

        For a reader that keeps its own buffer: no bytes object per receive, and
        no copy of it into the buffer afterwards.
        """
        if not len(buffer):
            raise ValueError("receive_into needs a non-empty buffer")
        return await self._receive(self._sock.recv_into, buffer, len(buffer))

    def try_receive_into(self, buffer: memoryview) -> int | None:
        """A synchronous non-blocking ``receive_into``: None when the socket has nothing now.

        For a caller that must handle what it read before any other task runs
        (it reads into a buffer it shares with them); it then owns the waiting
        and the yielding to others: ``if stream.emptied: await
        stream.wait_readable()`` before the call spares a receive that would
        find nothing.  Raises like ``receive_into``.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        try:
            got = self._sock.recv_into(buffer)
        except BlockingIOError:
            self._emptied = True
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc
        self._emptied = 0 < got < len(buffer)
        return got

    @property
    def emptied(self) -> bool:
        """The last receive found the socket's queue empty, or emptied it (see ``_receive``)."""
        return self._emptied

    async def wait_readable(self) -> None:
        """Until the socket has data or its end (a cancel point); for ``try_receive_into``."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        self._receiving = True
        try:
            await trio.lowlevel.wait_readable(self._sock)
        finally:
            self._receiving = False
        self._emptied = False

    async def wait_readable_in(self, reactor: Reactor, on_ready: OnReady) -> None:
        """``wait_readable`` through ``reactor``: ``on_ready`` runs in the reactor each
        time the socket is readable, until it returns False (see dataplane.reactor).

        ``on_ready`` may call ``try_receive_into``; this task is still the only
        receiver, so nothing else may receive meanwhile.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        self._reactor = reactor
        try:
            await reactor.wait(self._sock, on_ready)
        finally:
            self._reactor = None
        self._emptied = False

    def watch_in(self, reactor: Reactor, on_ready: OnReady, on_end: OnEnd) -> None:
        """``Reactor.watch`` for this socket, for a task that waits elsewhere: ``on_ready`` may call
        ``try_receive_into``; ``unwatch`` ends it (closing the socket does too, with ``on_end``)."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        reactor.watch(self._sock, on_ready, on_end)
        self._reactor = reactor

    def unwatch(self) -> None:
        reactor, self._reactor = self._reactor, None
        if reactor is not None and not self._closed:
            reactor.unwatch(self._sock)
        self._emptied = False

    async def _receive(self, op: Callable[[_A], _R], arg: _A, want: int) -> _R:
        """One non-blocking receive ``op(arg)`` of up to ``want`` bytes, waiting for the
        socket only when it has nothing.

        A receive that got less than it asked for emptied the socket's queue.
        Request/response traffic then has nothing more until the peer answers,
        so trying the next receive at once would only fail (a syscall and a
        ``BlockingIOError`` on every message: two per proxied request in each
        agent).  After such a short read the next receive waits for readiness
        first; if data did arrive meanwhile, epoll reports it at once.
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            if self._emptied:
                self._fair.waited()
                await trio.lowlevel.wait_readable(self._sock)
            while True:
                try:
                    result = op(arg)
                except BlockingIOError:
                    self._fair.waited()
                    await trio.lowlevel.wait_readable(self._sock)
                    continue
                except OSError as exc:
                    raise _stream_error(exc) from exc
                got = result if isinstance(result, int) else len(result)
                self._emptied = 0 < got < want  # 0 is the end of stream: that read never blocks
                await self._fair.quick()
                return result
        finally:
            self._receiving = False

    # -- sending --------------------------------------------------------------------

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes now, without waiting or yielding; the count sent.

        Raises the same errors as ``send_all``.  Must not race a ``send_all`` in
        progress in another task (the caller serializes its writers).
        """
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            with memoryview(data) as whole:
                view = whole.cast("B") if whole.format != "B" or whole.ndim != 1 else whole
                total = len(view)
                sent = self.try_send(view)  # also for b"": it raises if we are closed
                waited = False
                while sent < total:
                    waited = True
                    await trio.lowlevel.wait_writable(self._sock)
                    sent += self.try_send(view[sent:])
                if waited:
                    self._fair.waited()
                else:
                    await self._fair.quick()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        self._sending = True
        try:
            await trio.lowlevel.wait_writable(self._sock)
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _stream_error(exc) from exc

    def at_rest(self) -> bool:
        """Open both ways with nothing received unread (a peek, never a read): a kept connection that
        may carry another request; one the peer closed or wrote to meanwhile may not."""
        if self._closed or self._eof_sent:
            return False
        try:
            self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    # -- closing --------------------------------------------------------------------

    def close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reactor is not None:
            self._reactor.closing(self._sock)
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0): the peer sees the connection broken, not ended."""
        if self._closed:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        self.close_now()

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()


class SocketPump(trio.abc.HalfCloseableStream):
    """A stream that moves bytes to and from a RawSocketStream by its own fast path.

    A splice between such a stream and a raw socket (dataplane.proxy) hands the
    whole direction to ``pump_into`` or ``pump_from`` instead of carrying each
    chunk through ``receive_some`` and ``send_all``, so the stream can write
    straight into the socket, or read it straight into its own buffers, without
    a hand-off between tasks (dataplane.stream.TunnelStream does both).
    """

    @abstractmethod
    async def pump_into(self, sink: RawSocketStream, delivered: Callable[[int], None]) -> None:
        """Copy everything this stream receives into ``sink``, then half-close ``sink``;
        ``delivered(n)`` for every n bytes handed over."""

    @abstractmethod
    async def pump_from(self, source: RawSocketStream, delivered: Callable[[int], None], chunk: int) -> None:
        """Copy everything ``source`` receives into this stream (reads of at most ``chunk``
        bytes where it must read for itself), then half-close this stream."""

    @abstractmethod
    def close_now(self) -> None:
        """``aclose`` without a checkpoint: usable in ``finally`` blocks and cancelled scopes."""


async def connect_tcp(host: str, port: int) -> RawSocketStream:
    """Connect; a literal address skips trio's happy-eyeballs machinery.

    Instances register numeric addresses almost always, and so do members
    advertise theirs; open_tcp_stream's resolution step and per-attempt
    nursery are a measurable part of the cost of a new proxied connection,
    and of a push-pull on a starved CPU.  A host name still goes through it.
    """
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return RawSocketStream.adopt(sock)
    return RawSocketStream.adopt(await trio.open_tcp_stream(host, port))
