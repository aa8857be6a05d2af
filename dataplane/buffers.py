"""The session's byte buffers: framed reading off the transport, and sealed bytes waiting for the kernel.

Both keep their live bytes in one buffer between a start and an end offset,
so that receiving, decrypting and sending never allocate or copy per message
(docs/dataplane.md, "Copies").
"""

from __future__ import annotations

from typing import Final

import trio

from dataplane.noise import MAX_MESSAGE, TAGLEN, CipherState
from dataplane.rawsocket import Fairness, RawSocketStream

__all__ = ["WRITE_BATCH", "Outbox", "Reader", "TooLong", "Truncated"]

_RECV_SIZE: Final = 65536
#: Ciphertext the writer gathers into one send_all (fewer syscalls, same fairness).
WRITE_BATCH: Final = 256 * 1024


class Truncated(Exception):
    """The TCP connection ended in the middle of a message."""


class TooLong(Exception):
    """A length prefix announced more than the caller accepts here."""


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


class Reader(_Window):
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
        (``TunnelSession._on_readable``): what it got, 0 at the end, None if nothing."""
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
                raise Truncated
            return None
        start = self._start
        n = (self._buf[start] << 8) | self._buf[start + 1]
        if n > limit:
            raise TooLong
        if self._end - start < 2 + n:
            if not await self._fill(2 + n):
                raise Truncated
            start = self._start  # _fill may have moved the unread bytes to the front
        self._start = start + 2 + n
        return self._view[start + 2 : start + 2 + n]

    async def read_message(self, limit: int = MAX_MESSAGE) -> bytes | None:
        """The next message as bytes of its own; None on a clean end of stream between messages."""
        view = await self.read_view(limit)
        return None if view is None else bytes(view)


class Outbox(_Window):
    """Sealed transport messages the kernel has not taken yet, in wire order.

    The cipher writes each message straight into the free tail
    (``CipherState.encrypt_framed_into``) and sends go from a view of the
    head, so a sealed byte is never copied in Python.  A bytearray grown with
    ``+=`` and cut with ``del`` would not do: CPython resizes it to the exact
    size both ways, so it copies all it holds at every append, which in a bulk
    transfer costs more than the cipher (docs/dataplane.md, "Copies").

    The buffer starts small and grows once to CAPACITY when a message does
    not fit (a bulk transfer), as Reader's does.  When the tail is too short
    the unsent bytes move to the front; the writer gathers at most
    WRITE_BATCH plus one message, so at CAPACITY that always makes room and
    the move is rare.
    """

    __slots__ = ()

    INITIAL: Final = 16 * 1024
    CAPACITY: Final = 4 * WRITE_BATCH

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

