"""Framing of push-pull streams (agent.transport), on trio's in-memory stream pairs."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from agent.transport import MAX_FRAME, FrameError, open_udp, receive_frame, send_frame


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
