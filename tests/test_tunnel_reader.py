"""The tunnel's message reader (dataplane.buffers.Reader): framing over any chunking,
its buffer that starts small and grows for bulk traffic, and its errors."""

from __future__ import annotations

import random
import socket

import pytest
import trio
import trio.testing

from dataplane.buffers import Reader, TooLong, Truncated
from dataplane.noise import MAX_MESSAGE
from dataplane.rawsocket import RawSocketStream


def _framed(msg: bytes) -> bytes:
    return len(msg).to_bytes(2, "big") + msg


def _messages(rng: random.Random, count: int, biggest: int) -> list[bytes]:
    return [rng.randbytes(rng.choice([0, 1, 7, 1024, rng.randrange(biggest + 1)])) for _ in range(count)]


async def _write_chunked(stream: trio.abc.SendStream, wire: bytes, rng: random.Random, sizes: list[int],
                         pause: float = 0.0) -> None:
    """``wire`` in pieces of random ``sizes``, sometimes (``pause``: how often) after a short sleep."""
    off = 0
    while off < len(wire):
        n = rng.choice(sizes)
        await stream.send_all(wire[off:off + n])
        off += n
        if rng.random() < pause:
            await trio.sleep(0.001)


async def _read_all(reader: Reader, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        view = await reader.read_view()
        assert view is not None
        out.append(bytes(view))
    return out


@pytest.mark.parametrize("seed", range(4))
async def test_any_chunking_over_a_memory_stream(seed: int) -> None:
    rng = random.Random(seed)
    msgs = _messages(rng, 200, MAX_MESSAGE)
    wire = b"".join(_framed(m) for m in msgs)
    send, receive = trio.testing.memory_stream_pair()
    reader = Reader(receive)

    async def writer() -> None:
        await _write_chunked(send, wire, rng, [1, 2, 3, 100, 4096, 70000])
        await send.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        assert await _read_all(reader, len(msgs)) == msgs
        assert await reader.read_view() is None  # clean end between messages


async def test_a_socket_reader_stays_small_for_small_messages_and_grows_for_bulk() -> None:
    a, b = socket.socketpair()
    sender, receiver = RawSocketStream(a), RawSocketStream(b)
    reader = Reader(receiver)
    rng = random.Random(7)
    try:
        for _ in range(50):  # request/response: one small message at a time
            msg = rng.randbytes(1024)
            await sender.send_all(_framed(msg))
            assert await _read_all(reader, 1) == [msg]
        assert len(reader._buf) == Reader.INITIAL
        bulk = [rng.randbytes(MAX_MESSAGE) for _ in range(8)]  # more than the small buffer holds

        async def writer() -> None:
            await sender.send_all(b"".join(_framed(m) for m in bulk))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            assert await _read_all(reader, len(bulk)) == bulk
        assert len(reader._buf) == Reader.CAPACITY
    finally:
        sender.close_now()
        receiver.close_now()


async def test_a_socket_reader_never_asks_an_empty_socket_and_reassembles_any_chunking() -> None:
    """Over a RawSocketStream the reader receives without waiting while data is
    there, waits (rather than failing a receive) after a read that emptied the
    socket, and puts messages split across reads back together."""
    from test_rawsocket import CountingSocket

    a, b = socket.socketpair()
    counting = CountingSocket(b)
    sender, receiver = RawSocketStream(a), RawSocketStream(counting)
    reader = Reader(receiver)
    rng = random.Random(11)
    try:
        for i in range(40):  # request/response: each message is one short read
            msg = rng.randbytes(rng.randrange(1, 2000))
            if i % 2 == 0:  # (the first is there before the first receive)
                await sender.send_all(_framed(msg))
                assert await _read_all(reader, 1) == [msg]
            else:  # the message arrives while the reader waits
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender.send_all, _framed(msg))
                    assert await _read_all(reader, 1) == [msg]
        assert counting.empty == 0 and counting.calls == 40

        msgs = _messages(rng, 150, MAX_MESSAGE)
        wire = b"".join(_framed(m) for m in msgs)

        async def writer() -> None:
            await _write_chunked(sender, wire, rng, [1, 3, 100, 4096, 70000, 300000], pause=0.2)
            await sender.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            assert await _read_all(reader, len(msgs)) == msgs
            assert await reader.read_view() is None
    finally:
        sender.close_now()
        receiver.close_now()


async def test_truncated_and_too_long_messages_raise() -> None:
    for wire, exc in ((b"\x00", Truncated), (b"\x00\x05abc", Truncated)):
        send, receive = trio.testing.memory_stream_pair()
        await send.send_all(wire)
        await send.aclose()
        with pytest.raises(exc):
            await Reader(receive).read_view()
    send, receive = trio.testing.memory_stream_pair()
    await send.send_all(b"\x01\x00" + bytes(256))
    with pytest.raises(TooLong):
        await Reader(receive).read_view(limit=255)
