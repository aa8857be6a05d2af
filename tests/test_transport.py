"""Framing of push-pull streams (agent.transport), on trio's in-memory stream pairs."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from agent.transport import MAX_FRAME, FrameError, FrameServer, open_udp, receive_frame, send_frame


async def _receive_from(*pieces: bytes, close: bool = True) -> bytes:
    send, receive = trio.testing.memory_stream_pair()
    for piece in pieces:
        await send.send_all(piece)
    if close:
        await send.aclose()
    return await receive_frame(receive)


async def test_a_frame_in_one_piece_or_in_many_arrives_whole() -> None:
    body = bytes(range(256)) * 300  # more than one 64 KiB receive
    framed = len(body).to_bytes(4, "big") + body
    assert await _receive_from(framed) == body
    assert await _receive_from(*(framed[i:i + 7] for i in range(0, len(framed), 7))) == body
    assert await _receive_from(framed[:2], framed[2:5], framed[5:]) == body
    assert await _receive_from((0).to_bytes(4, "big")) == b""


async def test_send_frame_and_receive_frame_agree() -> None:
    send, receive = trio.testing.memory_stream_pair()
    await send_frame(send, b"hello")
    assert await receive_frame(receive) == b"hello"


@pytest.mark.parametrize(("pieces", "reason"), [
    ((b"\x00\x00",), "truncated"),                          # header cut short
    ((b"\x00\x00\x00\x09abc",), "truncated"),               # body cut short
    (((MAX_FRAME + 1).to_bytes(4, "big"),), "oversized"),   # refused before any body arrives
    ((b"\x00\x00\x00\x02abX",), "trailing"),                # more than one frame
])
async def test_bad_frames_are_refused_by_reason(pieces: tuple[bytes, ...], reason: str) -> None:
    with pytest.raises(FrameError) as err:
        await _receive_from(*pieces)
    assert err.value.reason == reason


async def test_an_oversized_length_is_refused_without_waiting_for_the_body() -> None:
    with trio.fail_after(5):  # the peer keeps the stream open: nothing more will come
        with pytest.raises(FrameError, match="oversized"):
            await _receive_from((1 << 31).to_bytes(4, "big"), close=False)


async def test_icmp_port_unreachable_is_reported_and_sends_go_on() -> None:
    """A datagram to a port nothing listens on comes back as ICMP port unreachable:
    the socket names the address (the probe uses it), and the next send -- which
    the kernel answers with that earlier error -- still goes out."""
    udp = await open_udp(("127.0.0.1", 0))
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()
    closed.close()
    live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    live.bind(("127.0.0.1", 0))
    live.setblocking(False)
    try:
        assert udp.icmp
        await udp.sendto(b"anyone?", dead)
        with trio.fail_after(5):
            await udp.wait_readable()  # the error wakes the receiver
        await udp.sendto(b"hello", live.getsockname())  # reports the earlier error; resent
        with trio.fail_after(5):
            while True:
                try:
                    assert live.recv(64) == b"hello"
                    break
                except BlockingIOError:
                    await trio.sleep(0.01)
        assert udp.errors_pending  # the send saw the error: the queue has an entry
        assert udp.unreachable() == [dead]
        assert not udp.errors_pending
        assert udp.unreachable() == []  # drained
        assert udp.recv_nowait() is None
    finally:
        udp.close()
        live.close()


# -- FrameServer: the gossip TCP listener ------------------------------------------------


class _Recorder:
    """A FrameServer's callbacks: answers every frame with its reverse, notes batches and drops."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.batches: list[list[bytes]] = []
        self.drops: list[str] = []
        self.flushes = 0
        self.reply = reply

    def respond(self, frames: list[tuple[tuple[str, int], bytes]]) -> list[bytes | None]:
        self.batches.append([frame for _, frame in frames])
        return [self.reply if self.reply is not None else frame[::-1] for _, frame in frames]

    async def after(self) -> None:
        self.flushes += 1


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _server(rec: _Recorder, listener: socket.socket, timeout: float = 5.0) -> FrameServer:
    from collections import Counter
    return FrameServer([listener], rec.respond, rec.drops.append, rec.after, Counter(), timeout)


async def _client(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    return sock


async def _read_all(sock: trio.socket.SocketType) -> bytes:
    out = b""
    while chunk := await sock.recv(65536):
        out += chunk
    return out


async def test_connections_waiting_together_are_answered_in_one_batch() -> None:
    """What a seed sees in a join burst: every joiner connected and sent before it ran."""
    listener = _listener()
    port = listener.getsockname()[1]
    clients = []
    for i in range(10):
        c = await _client(port)
        await c.send(framed := (4).to_bytes(4, "big") + b"req%d" % i)
        assert len(framed) == 8
        clients.append(c)
    rec = _Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_server(rec, listener).serve)
        with trio.fail_after(5):
            replies = [await _read_all(c) for c in clients]
        nursery.cancel_scope.cancel()
    assert replies == [(4).to_bytes(4, "big") + (b"req%d" % i)[::-1] for i in range(10)]
    assert [len(b) for b in rec.batches] == [10]  # one call of respond for all of them
    assert rec.flushes == 1 and rec.drops == []


async def test_a_frame_still_on_its_way_is_waited_for() -> None:
    listener = _listener()
    rec = _Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_server(rec, listener).serve)
        c = await _client(listener.getsockname()[1])
        await c.send(b"\x00\x00\x00\x05he")
        await trio.testing.wait_all_tasks_blocked()  # the server has read the start and waits for the rest
        await c.send(b"llo")
        with trio.fail_after(5):
            assert await _read_all(c) == b"\x00\x00\x00\x05olleh"
        nursery.cancel_scope.cancel()
    assert rec.batches == [[b"hello"]] and rec.drops == []


async def test_a_reply_larger_than_the_kernel_takes_at_once_arrives_whole() -> None:
    big = bytes(range(256)) * (16 * 1024)  # 4 MiB
    listener = _listener()
    port = listener.getsockname()[1]
    c = await _client(port)
    await c.send(b"\x00\x00\x00\x01x")
    rec = _Recorder(reply=big)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_server(rec, listener).serve)
        with trio.fail_after(10):
            got = await _read_all(c)
        nursery.cancel_scope.cancel()
    assert got == len(big).to_bytes(4, "big") + big
    assert rec.drops == []


async def test_bad_streams_are_dropped_by_reason_and_the_server_goes_on() -> None:
    listener = _listener()
    port = listener.getsockname()[1]
    rec = _Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_server(rec, listener, timeout=0.3).serve)
        silent = await _client(port)                            # sends nothing: tcp_timeout
        for data in ((1 << 31).to_bytes(4, "big"),              # tcp_oversized
                     b"\x00\x00\x00\x02abX",                    # tcp_trailing
                     b"\x00\x00"):                              # then closes: tcp_truncated
            c = await _client(port)
            await c.send(data)
            await trio.sleep(0.05)
            c.close()
        with trio.fail_after(5):
            while len(rec.drops) < 4:
                await trio.sleep(0.05)
            good = await _client(port)
            await good.send(b"\x00\x00\x00\x02ok")
            assert await _read_all(good) == b"\x00\x00\x00\x02ko"
        nursery.cancel_scope.cancel()
        silent.close()
    assert sorted(rec.drops) == ["tcp_oversized", "tcp_timeout", "tcp_trailing", "tcp_truncated"]


async def test_a_request_respond_refuses_is_closed_without_a_reply() -> None:
    listener = _listener()
    rec = _Recorder()
    rec.respond = lambda frames: [None for _ in frames]  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_server(rec, listener).serve)
        c = await _client(listener.getsockname()[1])
        await c.send(b"\x00\x00\x00\x01x")
        with trio.fail_after(5):
            assert await _read_all(c) == b""
        nursery.cancel_scope.cancel()
