"""RawSocketStream keeps trio's stream contract while skipping the per-call scheduler pass."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from dataplane.rawsocket import YIELD_EVERY, RawSocketStream


def pair() -> tuple[RawSocketStream, RawSocketStream]:
    a, b = socket.socketpair()
    return RawSocketStream(a), RawSocketStream(b)


async def tcp_pair() -> tuple[RawSocketStream, RawSocketStream]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    listener.close()
    return RawSocketStream.adopt(client), RawSocketStream.adopt(trio.SocketStream(server))


async def test_bytes_and_half_close_both_ways() -> None:
    a, b = await tcp_pair()
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers, so send_all must wait
    received = bytearray()

    async def reader() -> None:
        while data := await b.receive_some():
            received.extend(data)
        await b.send_all(b"done")
        await b.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await a.send_all(payload)
        await a.send_eof()
        assert await a.receive_some() == b"done"
        assert await a.receive_some() == b""
    assert bytes(received) == payload
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"after eof")
    await a.aclose()
    await b.aclose()


async def test_reset_by_peer_is_broken_resource() -> None:
    a, b = await tcp_pair()
    b.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await b.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await a.receive_some()
    await a.aclose()


async def test_use_after_close_and_concurrent_use_are_refused() -> None:
    a, b = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await a.receive_some()
        nursery.cancel_scope.cancel()
    await a.aclose()
    await a.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await a.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")
    await b.aclose()


async def test_closing_wakes_a_blocked_receiver() -> None:
    a, b = pair()
    failure: list[BaseException] = []

    async def blocked() -> None:
        try:
            await a.receive_some()
        except trio.ClosedResourceError as exc:
            failure.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked)
        await trio.testing.wait_all_tasks_blocked()
        a.close_now()
    assert len(failure) == 1
    await b.aclose()


async def test_a_cancelled_task_stops_at_its_next_call_even_with_data_waiting() -> None:
    a, b = pair()
    await b.send_all(b"x" * 100)
    with trio.CancelScope() as scope:
        scope.cancel()
        await a.receive_some(10)
    assert scope.cancelled_caught
    assert await a.receive_some() == b"x" * 100  # nothing was consumed by the cancelled call
    await a.aclose()
    await b.aclose()


async def test_a_stream_that_never_waits_still_lets_others_run() -> None:
    a, b = pair()
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()  # let it start
        start = ticks
        for _ in range(YIELD_EVERY * 10):  # all succeed at once: the kernel buffer has room
            await a.send_all(b"y")
        assert ticks - start >= 9  # a yield every YIELD_EVERY calls, no more
        assert ticks - start <= 11
        nursery.cancel_scope.cancel()
    await a.aclose()
    await b.aclose()


class CountingSocket(socket.socket):
    """A socket that counts its receive calls, and those that found nothing."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.calls = 0
        self.empty = 0

    def _counted(self, op: str, arg: object) -> object:
        self.calls += 1
        try:
            return getattr(super(), op)(arg)
        except BlockingIOError:
            self.empty += 1
            raise

    def recv(self, n: int, flags: int = 0) -> bytes:  # type: ignore[override]
        return self._counted("recv", n)  # type: ignore[return-value]

    def recv_into(self, buf: memoryview, n: int = 0, flags: int = 0) -> int:  # type: ignore[override]
        return self._counted("recv_into", buf)  # type: ignore[return-value]


async def test_after_a_short_read_the_next_receive_waits_instead_of_failing() -> None:
    """A read that got less than it asked for emptied the socket: the next receive
    waits for readiness rather than paying a receive that fails (two per proxied
    request in each agent before), and still sees what arrived meanwhile, what
    arrives later, and the end of the stream."""
    a, b = socket.socketpair()
    counting = CountingSocket(b)
    writer, reader = RawSocketStream(a), RawSocketStream(counting)
    await writer.send_all(b"ping")
    assert await reader.receive_some(100) == b"ping"  # short: 4 of 100
    await writer.send_all(b"sent before the next receive")
    assert await reader.receive_some(100) == b"sent before the next receive"

    async def later() -> None:
        await trio.testing.wait_all_tasks_blocked()  # the reader waits on an empty socket
        await writer.send_all(b"later")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await reader.receive_some(100) == b"later"
    buf = bytearray(100)
    await writer.send_all(b"into")
    assert await reader.receive_into(memoryview(buf)) == 4 and buf[:4] == b"into"
    await writer.send_eof()
    assert await reader.receive_some(100) == b""
    assert counting.empty == 0, "a receive after a short read asked the kernel before it had data"
    assert counting.calls == 5
    await writer.aclose()
    await reader.aclose()
    # A full read (the socket may hold more) still tries again at once: bulk keeps its pace.
    a, b = socket.socketpair()
    counting = CountingSocket(b)
    writer, reader = RawSocketStream(a), RawSocketStream(counting)
    await writer.send_all(bytes(70_000))
    assert len(await reader.receive_some(1000)) == 1000
    assert len(await reader.receive_some(1000)) == 1000
    assert counting.calls == 2 and counting.empty == 0
    await writer.aclose()
    await reader.aclose()
