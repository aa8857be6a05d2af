"""dataplane.tunnel: real TCP on loopback between TunnelManagers in one trio run.

Each test builds a small cluster with a dict-backed PeerDirectory; the raw
tests speak the wire format by hand (with dataplane.noise) to replay, age or
corrupt handshakes.  The rekey and hygiene tests at the end run over
trio.testing memory streams instead, most under an autojump MockClock.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from dataplane import mux, rekey
from dataplane.buffers import Outbox
from dataplane.noise import CipherState, HandshakeState, generate_keypair
from dataplane.rawsocket import RawSocketStream
from dataplane.tunnel import (
    PREAMBLE,
    StreamResetError,
    TunnelError,
    TunnelManager,
    TunnelStream,
    decode_hello,
    encode_hello,
)

HOST = "127.0.0.1"
TEST_DEADLINE = 20.0

# -- harness --------------------------------------------------------------------------


class Directory:
    """What membership would answer: one shared view of the cluster."""

    def __init__(self) -> None:
        self.members: dict[str, tuple[tuple[str, int], bytes]] = {}

    def member_for_key(self, static_public: bytes) -> str | None:
        for name, (_, key) in self.members.items():
            if key == static_public:
                return name
        return None

    def tunnel_peer(self, name: str) -> tuple[tuple[str, int], bytes] | None:
        return self.members.get(name)


class Node:
    def __init__(self, name: str, manager: TunnelManager, private: bytes, port: int) -> None:
        self.name = name
        self.manager = manager
        self.private = private
        self.port = port
        self.received: dict[bytes, bytes] = {}  # header -> sha256 of what a "sink" handler read
        self.release = trio.Event()  # lets "slow" handlers start reading


async def handler(node: Node, peer: str, header: bytes, stream: TunnelStream) -> None:
    kind = header.split(b":")[0]
    if kind == b"echo":
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.send_eof()
    elif kind in (b"sink", b"slow"):
        if kind == b"slow":
            await node.release.wait()
        digest = hashlib.sha256()
        while data := await stream.receive_some(7000):  # small bites: many credit updates
            digest.update(data)
        node.received[header] = digest.digest()
        await stream.send_all(b"ok")
        await stream.send_eof()
    elif kind == b"request":  # half-close: read the whole request, then answer
        request = bytearray()
        while data := await stream.receive_some():
            request += data
        await stream.send_all(b"reply to " + bytes(request))
        await stream.send_eof()
    elif kind == b"source":  # an endless download, in modest slices
        chunk = b"x" * 16384
        while True:
            await stream.send_all(chunk)
            await trio.sleep(0)
    elif kind == b"abandon":  # reads a little, then gives up without send_eof
        await stream.receive_some(10)
    elif kind == b"crash":
        raise RuntimeError("handler bug")
    else:
        raise AssertionError(f"unexpected header {header!r}")


#: For tests of the data path: sessions' readers and pumps waiting in the
#: reactor, in trio's place (the default) or as a task of its own, and in trio
#: itself (relayed sessions, a stopped reactor).
WAITS = pytest.mark.parametrize(
    "waits",
    [{"idle_hook": True}, {"idle_hook": False}, {"use_reactor": False}],
    ids=["idle-hook", "reactor-task", "trio-waits"],
)


@asynccontextmanager
async def cluster(*names: str, directory: Directory | None = None, **kw: Any) -> AsyncIterator[dict[str, Node]]:
    directory = directory if directory is not None else Directory()
    kw.setdefault("handshake_timeout", 2.0)
    nodes: dict[str, Node] = {}
    async with trio.open_nursery() as nursery:
        for name in names:
            listeners = await trio.open_tcp_listeners(0, host=HOST)
            port = listeners[0].socket.getsockname()[1]
            private, public = generate_keypair()
            directory.members[name] = ((HOST, port), public)

            def bind(node_name: str) -> Callable[[str, bytes, TunnelStream], Awaitable[None]]:
                return lambda peer, header, stream: handler(nodes[node_name], peer, header, stream)

            manager = TunnelManager(name, private, directory, on_stream=bind(name), **kw)
            nodes[name] = Node(name, manager, private, port)
            await nursery.start(manager.serve, listeners)
        with trio.fail_after(TEST_DEADLINE):  # a regression must fail, not hang
            yield nodes
        for node in nodes.values():
            await node.manager.aclose()


async def roundtrip(stream: trio.abc.HalfCloseableStream, payload: bytes, chunk: int = 50_000) -> bytes:
    """Send ``payload`` then EOF while reading everything back until EOF."""
    got = bytearray()

    async def sender() -> None:
        for i in range(0, len(payload), chunk):
            await stream.send_all(payload[i : i + chunk])
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        while data := await stream.receive_some():
            got += data
    await stream.aclose()
    return bytes(got)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# -- raw wire helpers -------------------------------------------------------------------


async def read_message(stream: trio.SocketStream) -> bytes | None:
    buf = bytearray()
    while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
        data = await stream.receive_some()
        if not data:
            return None
        buf += data
    return bytes(buf[2:])


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    got = bytearray()
    try:
        while data := await stream.receive_some():
            got += data
    except trio.BrokenResourceError:
        pass
    return bytes(got)


def message1(node: Node, responder: Node, directory: Directory, timestamp_ns: int) -> bytes:
    """PREAMBLE + framed Noise message 1, as ``node`` would send it to ``responder``."""
    hs = HandshakeState.initiator(node.private, directory.members[responder.name][1], prologue=PREAMBLE)
    msg = hs.write_message(encode_hello(timestamp_ns, node.name))
    return PREAMBLE + len(msg).to_bytes(2, "big") + msg


async def raw_handshake(node: Node, responder: Node, directory: Directory, timestamp_ns: int) -> tuple[bytes, bool]:
    """A full handshake by hand; returns (the bytes of message 1, whether it was accepted)."""
    hs = HandshakeState.initiator(node.private, directory.members[responder.name][1], prologue=PREAMBLE)
    msg = hs.write_message(encode_hello(timestamp_ns, node.name))
    first = PREAMBLE + len(msg).to_bytes(2, "big") + msg
    stream = await trio.open_tcp_stream(HOST, responder.port)
    async with stream:
        await stream.send_all(first)
        reply = await read_message(stream)
        if reply is None:
            return first, False
        assert hs.read_message(reply) == responder.name.encode()
        send, _ = hs.split()
        record = send.encrypt_with_ad(b"", mux.encode_frame(mux.FrameType.PING, 0, b"12345678"))
        await stream.send_all(len(record).to_bytes(2, "big") + record)
        # The PONG proves the responder took the session; then we hang up.
        assert await read_message(stream) is not None
    return first, True


# -- the pure part ----------------------------------------------------------------------


def test_hello_roundtrip_and_validation() -> None:
    ts = 1_700_000_000_123_456_789
    assert decode_hello(encode_hello(ts, "node-ä")) == (ts, "node-ä")
    assert len(encode_hello(ts, "n")) == 13
    for bad in (b"", b"\x00" * 12, encode_hello(ts, "n")[:12] + b"\xff", b"\x40" + b"\x00" * 7 + b"\xff" * 4 + b"n"):
        with pytest.raises(ValueError):
            decode_hello(bad)
    with pytest.raises(ValueError):
        encode_hello(ts, "")
    with pytest.raises(ValueError):
        encode_hello(ts, "x" * 256)


def test_outbox_keeps_order_across_partial_sends_growth_and_compaction() -> None:
    """Sealed messages leave in order and whole, whatever the kernel takes per send.

    Bulk-sized messages make the buffer grow and later move its unsent bytes to
    the front; small ones, sent whole, must leave it at its initial size."""
    rng = random.Random(7)
    key = os.urandom(32)
    send, recv = CipherState(key), CipherState(key)
    box = Outbox()
    small = [os.urandom(rng.randrange(1, 1200)) for _ in range(200)]
    for msg in small:
        box.seal(send, msg)
        wire = bytes(box.pending())
        box.sent(len(wire))
        assert len(box) == 0 and bytes(recv.decrypt_view(wire[2:])) == msg
    assert len(box._buf) == Outbox.INITIAL

    sizes = [65519, 1, 40000, 65519, 300, 65519] * 40
    wire = bytearray()
    moved = grew = 0
    for size in sizes:
        before = (len(box._buf), box._start)
        box.seal(send, bytes([size % 251]) * size)
        grew += len(box._buf) != before[0]
        moved += before[1] > 0 and box._start == 0 and len(box) > 0
        if rng.random() < 0.5 or len(box) > 256 * 1024:
            take = rng.randrange(0, len(box) + 1)
            wire += box.pending()[:take]
            box.sent(take)
    wire += box.pending()
    box.sent(len(box))
    assert grew == 1 and moved > 0 and len(box) == 0
    off = 0
    for size in sizes:
        n = int.from_bytes(wire[off : off + 2], "big")
        assert n == size + 16
        assert bytes(recv.decrypt_view(memoryview(wire)[off + 2 : off + 2 + n])) == bytes([size % 251]) * size
        off += 2 + n
    assert off == len(wire)


# -- streams ------------------------------------------------------------------------------


@WAITS
async def test_byte_exact_echo_on_many_concurrent_streams(waits: dict[str, bool]) -> None:
    rng = random.Random(1)
    payloads = [rng.randbytes(rng.choice([0, 1, 17, 4096, 70_000, 300_000])) for _ in range(40)]
    payloads += [rng.randbytes(3_000_000), rng.randbytes(2_500_000)]
    results: dict[int, bytes] = {}
    async with cluster("a", "b", **waits) as nodes:
        a = nodes["a"].manager

        async def one(i: int) -> None:
            stream = await a.open_stream("b", b"echo:%d" % i)
            results[i] = await roundtrip(stream, payloads[i], chunk=rng.choice([1000, 65536, 1 << 20]))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(len(payloads)):
                    nursery.start_soon(one, i)
        for i, payload in enumerate(payloads):
            assert results[i] == payload, f"stream {i}: {len(results[i])} bytes back, {len(payload)} sent"
        # One handshake on each side carried all 42 streams.
        assert a.stats["handshakes_ok"] == 1
        assert nodes["b"].manager.stats["handshakes_ok"] == 1
        assert a.stats["streams_opened"] == len(payloads)
        assert nodes["b"].manager.stats["streams_accepted"] == len(payloads)
        assert a.stats["bytes_out"] > sum(map(len, payloads))
        await wait_until(lambda: a.sessions_view()[0]["streams"] == 0)


async def test_one_session_reused_and_concurrent_first_use_shares_one_dial() -> None:
    async with cluster("a", "b", "c") as nodes:
        a = nodes["a"].manager

        async def one(peer: str, i: int) -> None:
            stream = await a.open_stream(peer, b"echo")
            assert await roundtrip(stream, b"hello %d" % i) == b"hello %d" % i

        # Twenty callers at once before any session exists: one dial per peer.
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, "b", i)
                nursery.start_soon(one, "c", i)
        for i in range(20):  # and then sequential use costs nothing more
            await one("b", i)
        assert a.stats["handshakes_ok"] == 2
        assert nodes["b"].manager.stats["handshakes_ok"] == 1
        assert nodes["c"].manager.stats["handshakes_ok"] == 1
        assert [v["peer"] for v in a.sessions_view()] == ["b", "c"]
        assert all(v["rtt_ms"] is not None for v in a.sessions_view())
        # The peer can open streams back over the same session.
        back = await nodes["b"].manager.open_stream("a", b"echo")
        assert await roundtrip(back, b"reverse") == b"reverse"
        assert nodes["b"].manager.stats["handshakes_ok"] == 1


@WAITS
async def test_pump_from_reads_no_further_than_the_peers_credit(waits: dict[str, bool]) -> None:
    """A proxied socket read straight into records: byte-exact with EOF, and while
    the far reader is stalled it reads exactly one window and queues nothing (the
    old read-then-queue pump held a send buffer more)."""
    payload = os.urandom(3 * mux.DEFAULT_WINDOW + 12345)
    async with cluster("a", "b", **waits) as nodes:
        stream = await nodes["a"].manager.open_stream("b", b"slow:pump")
        theirs, ours = socket.socketpair()
        source = RawSocketStream(ours)
        feeder = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
        pumped = 0

        def delivered(n: int) -> None:
            nonlocal pumped
            pumped += n

        async def feed() -> None:
            await feeder.send_all(payload)
            await feeder.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            nursery.start_soon(stream.pump_from, source, delivered, 256 * 1024)
            session = stream._session
            await wait_until(lambda: pumped >= mux.DEFAULT_WINDOW)
            # Every task blocked (the kernel polled first): a read-ahead would have happened by now.
            await trio.testing.wait_all_tasks_blocked()
            assert pumped == mux.DEFAULT_WINDOW
            assert session.mux._streams[stream.stream_id].queued == 0
            assert stream in session.awaiting_credit
            nodes["b"].release.set()
            assert await stream.receive_some() == b"ok"
            assert await stream.receive_some() == b""
        assert pumped == len(payload)
        assert nodes["b"].received[b"slow:pump"] == hashlib.sha256(payload).digest()
        await stream.aclose()
        await feeder.aclose()
        await source.aclose()


@WAITS
async def test_half_close(waits: dict[str, bool]) -> None:
    async with cluster("a", "b", **waits) as nodes:
        stream = await nodes["a"].manager.open_stream("b", b"request")
        await stream.send_all(b"part one, ")
        await stream.send_all(b"part two")
        await stream.send_eof()
        await stream.send_eof()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"too late")
        got = bytearray()
        while data := await stream.receive_some(3):
            got += data
        assert got == b"reply to part one, part two"
        assert await stream.receive_some() == b""  # EOF stays EOF
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()
        await wait_until(lambda: not nodes["a"].manager.sessions_view()[0]["streams"])


@WAITS
async def test_a_whole_message_sent_at_once_keeps_the_streams_order(waits: dict[str, bool]) -> None:
    """try_send_whole (the HTTP layer's way to send a request it holds whole) sends all or nothing,
    and never overtakes what send_all queued: the peer reads the bytes in the order they were given."""
    async with cluster("a", "b", **waits) as nodes:
        stream = await nodes["a"].manager.open_stream("b", b"request")
        await stream.send_all(b"first, ")
        with trio.fail_after(5):  # once the stream's opening is out, the direct path is free
            while not stream.try_send_whole(b"second, "):
                await trio.sleep(0.01)
        big = bytes(range(256)) * 1024  # more than one record: never sent by this path
        assert not stream.try_send_whole(big)
        await stream.send_all(b"third, ")
        if not stream.try_send_whole(b"fourth"):  # whichever way it goes, it goes after "third, "
            await stream.send_all(b"fourth")
        await stream.send_eof()
        assert not stream.try_send_whole(b"after the end")
        got = bytearray()
        while data := await stream.receive_some():
            got += data
        assert got == b"reply to first, second, third, fourth"
        await stream.aclose()


async def test_abandoned_or_crashed_handler_resets_the_stream() -> None:
    async with cluster("a", "b") as nodes:
        a, b = nodes["a"].manager, nodes["b"].manager
        stream = await a.open_stream("b", b"abandon")
        await stream.send_all(b"0123456789abcdef")
        with pytest.raises(StreamResetError) as info:
            while await stream.receive_some():
                pass
        assert info.value.code == mux.ResetCode.CANCEL
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"more")
        await stream.aclose()

        stream = await a.open_stream("b", b"crash")
        with pytest.raises(StreamResetError):
            await stream.receive_some()
        assert b.stats["handler_errors"] == 1

        # Our own aclose before send_eof resets the peer's side too.
        stream = await b.open_stream("a", b"request")
        await stream.send_all(b"half a request")
        await stream.aclose()
        assert b.stats["sessions_failed"] == a.stats["sessions_failed"] == 0
        ok = await a.open_stream("b", b"echo")
        assert await roundtrip(ok, b"still fine") == b"still fine"


async def test_stream_refused_without_handler() -> None:
    directory = Directory()
    async with cluster("a", directory=directory) as nodes:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        private, public = generate_keypair()
        directory.members["mute"] = ((HOST, listeners[0].socket.getsockname()[1]), public)
        mute = TunnelManager("mute", private, directory, handshake_timeout=2.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(mute.serve, listeners)
            stream = await nodes["a"].manager.open_stream("mute", b"echo")
            with pytest.raises(StreamResetError) as info:
                await stream.receive_some()
            assert info.value.code == mux.ResetCode.REFUSED
            assert mute.stats["streams_refused"] == 1
            await mute.aclose()


@WAITS
async def test_slow_reader_does_not_block_other_streams(waits: dict[str, bool]) -> None:
    rng = random.Random(2)
    slow_payload = rng.randbytes(8 * mux.DEFAULT_WINDOW)  # several windows: its sender must block
    async with cluster("a", "b", **waits) as nodes:
        a, b = nodes["a"].manager, nodes["b"]
        slow = await a.open_stream("b", b"slow")
        slow_sent = trio.Event()

        async def send_slow() -> None:
            await slow.send_all(slow_payload)
            slow_sent.set()
            await slow.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_slow)
            with trio.fail_after(10):
                for _ in range(3):
                    fast = await a.open_stream("b", b"echo")
                    payload = rng.randbytes(1_000_000)
                    assert await roundtrip(fast, payload) == payload
            # The slow stream is stuck behind its reader, not behind the others.
            assert not slow_sent.is_set()
            b.release.set()
            reply = bytearray()
            while data := await slow.receive_some():
                reply += data
            assert reply == b"ok"
        assert b.received[b"slow"] == hashlib.sha256(slow_payload).digest()


async def test_idle_session_closes_and_next_stream_redials() -> None:
    async with cluster("a", "b", idle_timeout=0.2) as nodes:
        a, b = nodes["a"].manager, nodes["b"].manager
        stream = await a.open_stream("b", b"echo")
        assert await roundtrip(stream, b"one") == b"one"
        await wait_until(lambda: not a.sessions_view() and not b.sessions_view())
        assert a.stats["sessions_closed"] == b.stats["sessions_closed"] == 1
        assert a.stats["sessions_failed"] == b.stats["sessions_failed"] == 0
        stream = await a.open_stream("b", b"echo")
        assert await roundtrip(stream, b"two") == b"two"
        assert a.stats["handshakes_ok"] == 2

        # A long-lived stream keeps its session past the idle timeout.
        stream = await a.open_stream("b", b"echo")
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        await trio.sleep(0.6)
        await stream.send_all(b"pong")
        assert await stream.receive_some() == b"pong"
        assert a.stats["handshakes_ok"] == 2
        await stream.aclose()


async def test_simultaneous_dial_ends_with_one_session() -> None:
    async with cluster("a", "b") as nodes:
        a, b = nodes["a"].manager, nodes["b"].manager

        async def one(src: TunnelManager, dst: str, i: int) -> None:
            stream = await src.open_stream(dst, b"echo")
            payload = os.urandom(100_000 + i)
            assert await roundtrip(stream, payload) == payload

        async with trio.open_nursery() as nursery:  # neither side has a session yet: both dial
            for i in range(5):
                nursery.start_soon(one, a, "b", i)
                nursery.start_soon(one, b, "a", i)
        assert a.stats["handshakes_ok"] == b.stats["handshakes_ok"] == 2
        assert a.stats["duplicate_sessions"] == b.stats["duplicate_sessions"] == 1
        # The loser drains and closes; both keep the session "a" initiated.
        await wait_until(lambda: len(a.sessions_view()) == 1 and len(b.sessions_view()) == 1)
        assert a.sessions_view()[0]["initiator"] == b.sessions_view()[0]["initiator"] == "a"
        assert a.stats["sessions_failed"] == b.stats["sessions_failed"] == 0
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, a, "b", i)
                nursery.start_soon(one, b, "a", i)
        assert a.stats["handshakes_ok"] == b.stats["handshakes_ok"] == 2


# -- who may connect ----------------------------------------------------------------------


async def test_unknown_key_is_refused_and_counted() -> None:
    directory = Directory()
    async with cluster("b", directory=directory) as nodes:
        # "c" knows b's address and key, but b's membership does not know c.
        private, _ = generate_keypair()
        view = Directory()
        view.members["b"] = directory.members["b"]
        c = TunnelManager("c", private, view, handshake_timeout=2.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(c.serve)
            with pytest.raises(TunnelError, match="refused"):
                await c.open_stream("b", b"echo")
            assert c.stats["dials_failed"] == 1
            with pytest.raises(TunnelError, match="no tunnel route"):
                await c.open_stream("nobody", b"echo")
            await c.aclose()
        b = nodes["b"].manager
        assert b.stats["handshakes_failed_unknown_key"] == 1
        assert b.stats["handshakes_ok"] == 0
        assert b.sessions_view() == []


async def test_replayed_and_stale_message1_are_refused() -> None:
    directory = Directory()
    wall = [1_700_000_000.0]
    async with cluster("a", "b", directory=directory, clock=lambda: wall[0]) as nodes:
        a, b = nodes["a"], nodes["b"]
        t0 = int(wall[0] * 1e9)
        captured, accepted = await raw_handshake(a, b, directory, t0)
        assert accepted
        assert b.manager.stats["handshakes_ok"] == 1

        # The captured message 1, byte for byte, on a new connection.
        stream = await trio.open_tcp_stream(HOST, b.port)
        async with stream:
            await stream.send_all(captured)
            assert await read_until_closed(stream) == b""
        assert b.manager.stats["handshakes_failed_replay"] == 1

        # A fresh handshake (new ephemeral key) with an older timestamp: stale.
        _, accepted = await raw_handshake(a, b, directory, t0 - 1)
        assert not accepted
        assert b.manager.stats["handshakes_failed_replay"] == 2
        _, accepted = await raw_handshake(a, b, directory, t0 + 1)
        assert accepted

        # The real manager's clock is still at t0: its HELLO is stale too.
        with pytest.raises(TunnelError, match="refused"):
            await a.manager.open_stream("b", b"echo")
        assert b.manager.stats["handshakes_failed_replay"] == 3
        wall[0] += 1.0
        stream2 = await a.manager.open_stream("b", b"echo")
        assert await roundtrip(stream2, b"after replay") == b"after replay"
        assert b.manager.stats["handshakes_ok"] == 3

        # If the wall clock then steps back, our own timestamps still increase.
        a.manager.drop_peer("b")
        wall[0] -= 100.0
        stream3 = await a.manager.open_stream("b", b"echo")
        assert await roundtrip(stream3, b"clock stepped back") == b"clock stepped back"
        assert b.manager.stats["handshakes_ok"] == 4
        assert b.manager.stats["handshakes_failed_replay"] == 3


async def test_replay_after_restart_cannot_complete_the_handshake() -> None:
    """A restarted responder has forgotten the timestamps, so a replayed message 1
    gets a reply; but without the initiator's ephemeral key the replayer cannot
    produce the first transport record, and no session is registered."""
    directory = Directory()
    async with cluster("a", "b", directory=directory) as nodes:
        a, b = nodes["a"], nodes["b"]
        captured = []
        for ts in (1_700_000_000 * 10**9, 1_700_000_001 * 10**9):
            msg, accepted = await raw_handshake(a, b, directory, ts)
            assert accepted
            captured.append(msg)
        # "b" restarts: same key, fresh state, new port.
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        port = listeners[0].socket.getsockname()[1]
        directory.members["b"] = ((HOST, port), directory.members["b"][1])
        reborn = TunnelManager("b", b.private, directory, handshake_timeout=0.5)
        async with trio.open_nursery() as nursery:
            await nursery.start(reborn.serve, listeners)
            for msg, tail in zip(captured, (b"", os.urandom(64)), strict=True):  # hang up / forge a record
                stream = await trio.open_tcp_stream(HOST, port)
                async with stream:
                    await stream.send_all(msg)
                    assert await read_message(stream) is not None  # message 2 came back
                    if tail:
                        await stream.send_all(len(tail).to_bytes(2, "big") + tail)
                    else:
                        await stream.send_eof()
                    assert await read_until_closed(stream) == b""
            assert reborn.stats["handshakes_failed_bad_handshake"] == 2
            # ...and the replays' timestamps are now spent there too.
            stream = await trio.open_tcp_stream(HOST, port)
            async with stream:
                await stream.send_all(captured[1])
                assert await read_until_closed(stream) == b""
            assert reborn.stats["handshakes_failed_replay"] == 1
            assert reborn.stats["handshakes_ok"] == 0
            assert reborn.sessions_view() == []
            # The real "a" still gets through.
            stream2 = await a.manager.open_stream("b", b"echo")
            with pytest.raises(StreamResetError):  # reborn has no on_stream handler
                await stream2.receive_some()
            assert reborn.stats["handshakes_ok"] == 1
            await reborn.aclose()


async def test_bad_clients_are_refused_within_the_timeout_and_server_keeps_serving() -> None:
    directory = Directory()
    async with cluster("a", "b", directory=directory, handshake_timeout=0.5) as nodes:
        b = nodes["b"]
        rng = random.Random(3)
        valid = message1(nodes["a"], b, directory, 1)
        cases = {
            "garbage": rng.randbytes(300),
            "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "version": b"MESH\x07" + valid[5:],
            "corrupt": valid[:40] + bytes([valid[40] ^ 1]) + valid[41:],
            "oversized": PREAMBLE + b"\xff\xff" + b"\x00" * 100,
            "truncated": valid[:-10],  # then EOF
            "silent": b"",
        }
        durations: dict[str, float] = {}

        async def attack(kind: str, data: bytes) -> None:
            start = trio.current_time()
            stream = await trio.open_tcp_stream(HOST, b.port)
            async with stream:
                if data:
                    await stream.send_all(data)
                if kind == "truncated":
                    await stream.send_eof()
                assert await read_until_closed(stream) == b""
            durations[kind] = trio.current_time() - start

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for kind, data in cases.items():
                    nursery.start_soon(attack, kind, data)
        stats = b.manager.stats
        assert stats["handshakes_failed_bad_magic"] == 2  # garbage, http
        assert stats["handshakes_failed_bad_version"] == 1
        assert stats["handshakes_failed_bad_handshake"] == 3  # corrupt, oversized, truncated
        assert stats["handshakes_failed_timeout"] == 1  # silent
        # The counters say each was refused for its own fault, the others before the timeout
        # could end them; the silent one is not cut short of the timeout (how late is the machine's).
        assert durations["silent"] >= 0.45
        assert stats["handshakes_ok"] == 0
        stream = await nodes["a"].manager.open_stream("b", b"echo")
        assert await roundtrip(stream, b"still serving") == b"still serving"


async def test_mangled_message1_fuzz_never_hurts_the_server() -> None:
    directory = Directory()
    async with cluster("a", "b", directory=directory, handshake_timeout=0.5) as nodes:
        b = nodes["b"]
        rng = random.Random(4)
        valid = message1(nodes["a"], b, directory, 5)
        for _ in range(60):
            data = bytearray(valid)
            op = rng.randrange(3)
            if op == 0:  # flip bits anywhere past the preamble
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(5, len(data))] ^= 1 << rng.randrange(8)
            elif op == 1:  # cut it short, with a consistent length prefix
                body = bytes(data[7 : 7 + rng.randrange(0, len(data) - 7)])
                data = bytearray(PREAMBLE + len(body).to_bytes(2, "big") + body)
            else:  # a random message body of a plausible size
                body = rng.randbytes(rng.randrange(0, 400))
                data = bytearray(PREAMBLE + len(body).to_bytes(2, "big") + body)
            raw = await trio.open_tcp_stream(HOST, b.port)
            async with raw:
                await raw.send_all(bytes(data))
                assert await read_until_closed(raw) == b""
        failed = sum(v for k, v in b.manager.stats.items() if k.startswith("handshakes_failed_"))
        assert failed == 60
        assert b.manager.stats["handshakes_failed_timeout"] == 0
        assert b.manager.stats["handshakes_ok"] == 0
        stream = await nodes["a"].manager.open_stream("b", b"echo")
        assert await roundtrip(stream, b"unharmed") == b"unharmed"


async def test_member_sending_bad_mux_records_loses_its_session_only() -> None:
    directory = Directory()
    async with cluster("a", "b", "c", directory=directory) as nodes:
        a, b = nodes["a"], nodes["b"]
        # c has a working stream to b that must survive a's misbehaviour.
        bystander = await nodes["c"].manager.open_stream("b", b"echo")
        await bystander.send_all(b"before")
        assert await bystander.receive_some() == b"before"

        hs = HandshakeState.initiator(a.private, directory.members["b"][1], prologue=PREAMBLE)
        msg = hs.write_message(encode_hello(10**18, "a"))
        stream = await trio.open_tcp_stream(HOST, b.port)
        async with stream:
            await stream.send_all(PREAMBLE + len(msg).to_bytes(2, "big") + msg)
            reply = await read_message(stream)
            assert reply is not None
            hs.read_message(reply)
            send, recv = hs.split()
            # Well encrypted, but DATA on a stream nobody opened: a mux protocol error.
            bad = send.encrypt_with_ad(b"", mux.encode_frame(mux.FrameType.DATA, 1, b"boo"))
            await stream.send_all(len(bad).to_bytes(2, "big") + bad)
            rest = await read_until_closed(stream)
        # b sent its last words (GOAWAY PROTOCOL_ERROR) before hanging up.
        assert len(rest) >= 2
        last = recv.decrypt_with_ad(b"", rest[2 : 2 + int.from_bytes(rest[:2], "big")])
        assert mux.decode_record(last)[-1].type is mux.FrameType.GOAWAY
        assert b.manager.stats["protocol_errors"] == 1
        assert b.manager.stats["sessions_failed"] == 1
        await bystander.send_all(b"after")
        assert await bystander.receive_some() == b"after"
        await bystander.aclose()


# -- failure is loud ------------------------------------------------------------------------


async def drain_until_error(stream: TunnelStream, limit: int) -> int:
    total = 0
    while total < limit:
        data = await stream.receive_some()
        assert data, "a silent EOF instead of an error"
        total += len(data)
    return total


@WAITS
async def test_session_killed_mid_download_fails_loudly(waits: dict[str, bool]) -> None:
    async with cluster("a", "b", **waits) as nodes:
        a, b = nodes["a"].manager, nodes["b"].manager
        download = await a.open_stream("b", b"source")
        idle = await a.open_stream("b", b"echo")
        assert await drain_until_error(download, 200_000) >= 200_000
        assert b.drop_peer("a", "test") == 1
        with trio.fail_after(5), pytest.raises(StreamResetError):
            await drain_until_error(download, 10**12)
        with pytest.raises(trio.BrokenResourceError):
            await idle.send_all(b"x")
        with pytest.raises(trio.BrokenResourceError):
            await idle.receive_some()
        assert a.stats["sessions_failed"] == b.stats["sessions_failed"] == 1
        assert a.sessions_view() == b.sessions_view() == []
        # The next stream simply dials again.
        fresh = await a.open_stream("b", b"echo")
        assert await roundtrip(fresh, b"again") == b"again"


@WAITS
async def test_corrupted_records_kill_the_session_loudly_on_both_ends(waits: dict[str, bool]) -> None:
    async with cluster("a", "b", **waits) as nodes:
        a, b = nodes["a"], nodes["b"]
        payload = os.urandom(4_000_000)
        upload = await a.manager.open_stream("b", b"slow")  # b reads nothing until released

        async def send() -> None:
            with pytest.raises(trio.BrokenResourceError):
                await upload.send_all(payload)
                await upload.send_eof()
                await upload.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            session = a.manager._active["b"]
            await wait_until(lambda: bool(session.blocked))  # a's sender is out of credit
            # Tamper with a's outgoing cipher; once b's reader hands out credit,
            # the next record a sends does not decrypt.
            session._send_cipher = CipherState(os.urandom(32))
            b.release.set()
        assert b.manager.stats["decrypt_failures"] == 1
        assert b"slow" not in b.received  # the sink never saw a clean EOF
        assert b.manager.stats["sessions_failed"] == 1
        await wait_until(lambda: a.manager.stats["sessions_failed"] == 1)


@WAITS
async def test_manager_close_fails_open_streams(waits: dict[str, bool]) -> None:
    async with cluster("a", "b", **waits) as nodes:
        a = nodes["a"].manager
        stream = await a.open_stream("b", b"echo")
        await stream.send_all(b"hi")
        assert await stream.receive_some() == b"hi"
        await a.aclose()
        with pytest.raises(StreamResetError):
            await stream.receive_some()
        with pytest.raises(TunnelError):
            await a.open_stream("b", b"echo")


# -- rekey ------------------------------------------------------------------------------------
#
# These run over trio.testing memory streams (TunnelManager's ``connect`` hook):
# no sockets, so an autojump MockClock can drive the timers and every run
# schedules the same way.  One rekey test also runs over real TCP.


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Tap(trio.abc.HalfCloseableStream):
    """The dialler's end of a memory connection; a test may rewrite or drop the
    Noise messages it sends (after the unframed preamble), or cut it off entirely."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.pending = bytearray()
        self.skip = len(PREAMBLE)
        self.rewrite: Callable[[bytes], bytes | None] | None = None
        #: Silently swallow everything sent and never deliver anything more.
        self.blackhole = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.blackhole:
            await trio.lowlevel.checkpoint()
            return
        self.pending += data
        out = bytearray()
        n = min(self.skip, len(self.pending))
        out += self.pending[:n]
        del self.pending[:n]
        self.skip -= n
        while len(self.pending) >= 2 and len(self.pending) >= 2 + int.from_bytes(self.pending[:2], "big"):
            size = int.from_bytes(self.pending[:2], "big")
            msg = bytes(self.pending[2 : 2 + size])
            del self.pending[: 2 + size]
            sent = msg if self.rewrite is None else self.rewrite(msg)
            if sent is not None:
                out += len(sent).to_bytes(2, "big") + sent
        if out:
            await self.inner.send_all(out)
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.blackhole:
            await trio.sleep_forever()
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class MemoryNet:
    """Stands in for TCP: a dial to ("mem", port) is a memory stream pair whose far
    end the harness hands to that manager's ``handle_connection``."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.managers: dict[int, TunnelManager] = {}
        self.taps: list[Tap] = []

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.managers[port].handle_connection, server)
        tap = Tap(client)
        self.taps.append(tap)
        return tap


@asynccontextmanager
async def memory_cluster(
    *names: str, deadline: float = TEST_DEADLINE, per_node: dict[str, dict[str, Any]] | None = None, **kw: Any
) -> AsyncIterator[tuple[dict[str, Node], MemoryNet]]:
    directory = Directory()
    kw.setdefault("handshake_timeout", 2.0)
    nodes: dict[str, Node] = {}
    async with trio.open_nursery() as nursery:
        net = MemoryNet(nursery)
        for port, name in enumerate(names, start=1):
            private, public = generate_keypair()
            directory.members[name] = (("mem", port), public)

            def bind(node_name: str) -> Callable[[str, bytes, TunnelStream], Awaitable[None]]:
                return lambda peer, header, stream: handler(nodes[node_name], peer, header, stream)

            options = {**kw, **(per_node or {}).get(name, {})}
            manager = TunnelManager(name, private, directory, on_stream=bind(name), connect=net.connect, **options)
            net.managers[port] = manager
            nodes[name] = Node(name, manager, private, port)
            await nursery.start(manager.serve)
        with trio.fail_after(deadline):
            yield nodes, net
        for node in nodes.values():
            await node.manager.aclose()
        nursery.cancel_scope.cancel()


def keys_in_step(x: TunnelManager, y: TunnelManager) -> bool:
    """Both ends of their one session encrypt and decrypt each direction with the same key."""
    (sx,) = x._sessions
    (sy,) = y._sessions
    return sx._send_cipher._k == sy._recv_cipher._k and sx._recv_cipher._k == sy._send_cipher._k


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_long_transfer_on_many_streams_crosses_rekeys_byte_exact(transport: str) -> None:
    # Records are up to 64 KiB, so a few MB is ~100 records each way: rekey often.
    # The hard cap stays well above: both ends share one event loop here, and a
    # sender that never has to wait can send many records before the peer's
    # reader gets the turn to answer a REKEY.
    limits = {"rekey_after_messages": 6, "reject_after_messages": 1000}
    rng = random.Random(7)
    payloads = [rng.randbytes(n) for n in (1_500_000, 1_000_000, 700_000, 300_001, 5)]
    results: dict[int, bytes] = {}
    if transport == "memory":
        context = memory_cluster("a", "b", **limits)
    else:
        context = cluster_pair(**limits)
    async with context as (nodes, _):
        a, b = nodes["a"].manager, nodes["b"].manager

        async def one(i: int) -> None:
            stream = await a.open_stream("b", b"echo:%d" % i)
            results[i] = await roundtrip(stream, payloads[i], chunk=rng.choice([4096, 65536]))

        async def upload(i: int) -> None:  # and a one-way stream the other way
            stream = await b.open_stream("a", b"sink:%d" % i)
            await stream.send_all(payloads[i])
            await stream.send_eof()
            assert await stream.receive_some() == b"ok"
            await stream.aclose()

        warm = await a.open_stream("b", b"echo")  # one session first: no duplicate dials
        assert await roundtrip(warm, b"warm") == b"warm"
        # Several rounds: the sender packs a stream's writes into full records, so
        # one round is only a few dozen records and round trips each way.
        for _ in range(3):
            results.clear()
            async with trio.open_nursery() as nursery:
                for i in range(len(payloads)):
                    nursery.start_soon(one, i)
                nursery.start_soon(upload, 0)
            for i, payload in enumerate(payloads):
                assert results[i] == payload, f"stream {i} differs"
            assert nodes["a"].received.pop(b"sink:0") == hashlib.sha256(payloads[0]).digest()
        # Many rekeys, each counted once on both ends, on one session.
        await wait_until(lambda: a.stats["rekeys"] == b.stats["rekeys"])
        assert a.stats["rekeys"] >= 5
        assert a.stats["handshakes_ok"] == b.stats["handshakes_ok"] == 1
        assert a.stats["sessions_failed"] == b.stats["sessions_failed"] == 0
        assert a.stats["rekey_failures"] == b.stats["rekey_failures"] == 0
        (sess,) = a._sessions
        assert sess.mux.counters["streams_reset_local"] == sess.mux.counters["streams_reset_remote"] == 0
        assert a.sessions_view()[0]["rekeys"] == a.stats["rekeys"]
        await wait_until(lambda: keys_in_step(a, b))


@asynccontextmanager
async def cluster_pair(**kw: Any) -> AsyncIterator[tuple[dict[str, Node], None]]:
    async with cluster("a", "b", **kw) as nodes:
        yield nodes, None


async def test_time_based_rekey_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_cluster(
        "a", "b", deadline=100, idle_timeout=1000, rekey_after_time=10.0, reject_after_time=15.0
    ) as (nodes, _):
        a, b = nodes["a"].manager, nodes["b"].manager
        start = trio.current_time()
        stream = await a.open_stream("b", b"echo")
        await stream.send_all(b"before")
        assert await stream.receive_some() == b"before"
        (sess,) = a._sessions
        key0 = sess._send_cipher._k
        await trio.sleep_until(start + 35.0)  # a quiet stream: only the timer renews the keys
        # The session's initiator rekeyed at 10, 20 and 30 s; the responder never had to.
        assert a.stats["rekeys"] == b.stats["rekeys"] == 3
        assert a.stats["rekey_collisions"] == b.stats["rekey_collisions"] == 0
        assert sess._send_cipher._k != key0
        assert keys_in_step(a, b)
        assert a.sessions_view()[0]["key_age_s"] == pytest.approx(5.0, abs=0.1)
        await stream.send_all(b"after")
        assert await stream.receive_some() == b"after"
        assert a.stats["sessions_failed"] == b.stats["sessions_failed"] == 0
        assert a.stats["handshakes_ok"] == 1
        await stream.aclose()


async def test_responder_renews_on_time_if_the_initiator_does_not(autojump_clock: trio.testing.MockClock) -> None:
    slow = {"rekey_after_time": 500.0, "reject_after_time": 600.0}
    async with memory_cluster(
        "a", "b", deadline=100, idle_timeout=1000, rekey_after_time=10.0, reject_after_time=15.0,
        per_node={"a": slow},
    ) as (nodes, _):  # fmt: skip
        a, b = nodes["a"].manager, nodes["b"].manager
        start = trio.current_time()
        stream = await a.open_stream("b", b"echo")
        await trio.sleep_until(start + 25.0)
        assert a.stats["rekeys"] == b.stats["rekeys"] == 2  # b, at 11 and 22 s
        await stream.send_all(b"still here")
        assert await stream.receive_some() == b"still here"
        assert b.stats["sessions_failed"] == 0


async def test_simultaneous_rekey_from_both_sides_resolves_to_one(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_cluster("a", "b", idle_timeout=1000) as (nodes, _):
        a, b = nodes["a"].manager, nodes["b"].manager
        payload = os.urandom(600_000)
        streams = [await a.open_stream("b", b"echo"), await b.open_stream("a", b"echo")]
        for s in streams:
            await s.send_all(b"x")
            assert await s.receive_some() == b"x"
        (sa,) = a._sessions
        (sb,) = b._sessions
        for round_ in range(1, 4):
            before = (sa._send_cipher._k, sa._recv_cipher._k)
            # Both INITs are queued before either side reads anything: they cross.
            assert a.rekey("b") and b.rekey("a")
            assert not a.rekey("b")  # one rekey at a time
            echoed = [bytearray(), bytearray()]

            async def pump(i: int, echoed: list[bytearray] = echoed) -> None:
                await streams[i].send_all(payload)
                while len(echoed[i]) < len(payload):
                    echoed[i] += await streams[i].receive_some()

            async with trio.open_nursery() as nursery:  # traffic in flight across the switch
                nursery.start_soon(pump, 0)
                nursery.start_soon(pump, 1)
            assert echoed == [payload, payload]
            await wait_until(lambda round_=round_: a.stats["rekeys"] == b.stats["rekeys"] == round_)
            # The initiator's handshake won on both ends: one rekey, one collision seen by each side.
            assert a.stats["rekey_collisions"] == b.stats["rekey_collisions"] == round_
            assert sa._rekey.state == sb._rekey.state == "idle"
            assert keys_in_step(a, b)
            assert (sa._send_cipher._k, sa._recv_cipher._k) != before
        assert a.stats["sessions_failed"] == b.stats["sessions_failed"] == 0
        for s in streams:
            await s.send_eof()
            assert await s.receive_some() == b""
            await s.aclose()


@pytest.mark.parametrize("kind", ["wire", "inner", "impostor"])
async def test_tampered_rekey_record_kills_the_session_loudly(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async with memory_cluster("a", "b", idle_timeout=1000) as (nodes, net):
        a, b = nodes["a"].manager, nodes["b"].manager
        stream = await a.open_stream("b", b"echo")
        await stream.send_all(b"hello")
        assert await stream.receive_some() == b"hello"
        (sa,) = a._sessions
        if kind == "wire":
            # The INIT is 1 + 96 bytes of IK message 1 + a 16-byte tag; flip one bit of it in flight.
            def flip(msg: bytes) -> bytes:
                return msg[:50] + bytes([msg[50] ^ 4]) + msg[51:] if len(msg) == 113 else msg

            net.taps[0].rewrite = flip
            assert a.rekey("b")
        elif kind == "inner":
            # Well encrypted under the session key, but the handshake inside is corrupt.
            assert a.rekey("b")
            record, switch = sa._control_out[-1]
            sa._control_out[-1] = (record[:-1] + bytes([record[-1] ^ 1]), switch)
        else:
            # Whoever stole the traffic keys, but not a's static key, cannot rekey.
            real = sa._rekey._static_private
            sa._rekey._static_private = generate_keypair()[0]
            assert a.rekey("b")
            sa._rekey._static_private = real
        with pytest.raises(StreamResetError):
            while await stream.receive_some():
                pass
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"more")
        if kind == "wire":
            assert b.stats["decrypt_failures"] == 1
        else:
            assert b.stats["rekey_failures"] == 1
        assert b.stats["rekeys"] == 0
        assert b.stats["sessions_failed"] == 1
        await wait_until(lambda: a.stats["sessions_failed"] == 1)
        assert a.sessions_view() == b.sessions_view() == []


def ignore_rekeys(manager: TunnelManager) -> None:
    """Make this end of its session deaf to the peer's INITs (it still sends its own)."""
    (sess,) = manager._sessions
    sess._rekey._on_init = lambda body: rekey.Step()  # type: ignore[method-assign]


async def test_message_cap_closes_a_session_that_cannot_rekey(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_cluster("a", "b", idle_timeout=1000, rekey_after_messages=20, reject_after_messages=60) as (
        nodes,
        _,
    ):
        a, b = nodes["a"].manager, nodes["b"].manager
        stream = await a.open_stream("b", b"sink")
        await wait_until(lambda: bool(b._sessions))
        ignore_rekeys(b)  # and should b start one, a's own INIT wins: no rekey can complete
        with pytest.raises(StreamResetError, match="messages on one key and no rekey"):
            for _ in range(1000):  # one small record at a time
                await stream.send_all(b"y" * 100)
                await trio.sleep(0.001)
        assert a.stats["rekey_failures"] == 1
        assert a.stats["rekeys"] == b.stats["rekeys"] == 0
        assert a.sessions_view() == []
        assert a.stats["sessions_failed"] == 1
        # b saw its peer vanish with a stream open: loud there too.
        await wait_until(lambda: b.stats["sessions_failed"] == 1)
        assert b"sink" not in nodes["b"].received


async def test_receiver_enforces_the_message_cap_on_its_peer(autojump_clock: trio.testing.MockClock) -> None:
    loose = {"rekey_after_messages": 10**6, "reject_after_messages": 2 * 10**6}
    async with memory_cluster(
        "a", "b", idle_timeout=1000, rekey_after_messages=20, reject_after_messages=60, per_node={"a": loose}
    ) as (nodes, _):
        a, b = nodes["a"].manager, nodes["b"].manager
        stream = await a.open_stream("b", b"sink")
        ignore_rekeys(a)  # a never rekeys, and ignores b's attempts
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(1000):
                await stream.send_all(b"z" * 100)
                await trio.sleep(0.001)
        assert b.stats["rekey_failures"] == 1
        assert b.stats["sessions_failed"] == 1
        assert a.stats["rekey_failures"] == 0


async def test_silent_peer_fails_the_session_at_the_key_age_limit(autojump_clock: trio.testing.MockClock) -> None:
    """No keepalive needed: a quiet stream still rekeys every rekey_after_time, and a
    peer that vanished without a FIN or RST cannot answer, so reject_after_time ends it."""
    async with memory_cluster(
        "a", "b", deadline=100, idle_timeout=1000, rekey_after_time=10.0, reject_after_time=15.0
    ) as (nodes, net):
        a, b = nodes["a"].manager, nodes["b"].manager
        start = trio.current_time()
        stream = await a.open_stream("b", b"echo")
        await stream.send_all(b"hi")
        assert await stream.receive_some() == b"hi"
        net.taps[0].blackhole = True  # the network path goes dark, both ways
        with pytest.raises(StreamResetError, match="rekey did not complete"):
            await stream.receive_some()
        assert trio.current_time() - start == pytest.approx(15.0, abs=0.1)
        assert a.stats["rekey_failures"] == 1
        await wait_until(lambda: b.stats["sessions_failed"] == 1)


# -- hygiene ------------------------------------------------------------------------------------


async def test_replay_table_forgets_keys_that_left_membership(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_cluster("a", "b", "c", idle_timeout=1000) as (nodes, _):
        b = nodes["b"].manager
        stream = await nodes["c"].manager.open_stream("b", b"echo")
        assert await roundtrip(stream, b"c") == b"c"
        c_key = nodes["c"].manager.static_public
        for _ in range(400):  # keys of agents long gone from membership
            b._replay._last[os.urandom(32)] = 1
        stream = await nodes["a"].manager.open_stream("b", b"echo")
        assert await roundtrip(stream, b"a") == b"a"
        # Only current members survive; the next pruning waits for the table to double.
        assert set(b._replay) == {c_key, nodes["a"].manager.static_public}
        assert b._replay.prune_at == 256


async def test_handshake_cap_closes_excess_half_open_connections(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_cluster("a", "b", handshake_timeout=2.0, per_node={"b": {"max_handshakes": 3}}) as (
        nodes,
        net,
    ):
        b = nodes["b"]
        start = trio.current_time()
        silent = [await net.connect("mem", b.port) for _ in range(8)]  # connect, then say nothing
        await trio.sleep(0.1)
        assert b.manager.stats["handshakes_failed_busy"] == 5
        for conn in silent[3:]:  # the excess was closed at once
            assert await conn.receive_some() == b""
        # While the three hold every slot, a real peer is turned away too...
        with pytest.raises(TunnelError):
            await nodes["a"].manager.open_stream("b", b"echo")
        assert b.manager.stats["handshakes_failed_busy"] == 6
        # ...until they time out; then the slots are free again.
        for conn in silent[:3]:
            assert await conn.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.2)
        assert b.manager.stats["handshakes_failed_timeout"] == 3
        stream = await nodes["a"].manager.open_stream("b", b"echo")
        assert await roundtrip(stream, b"served") == b"served"
        for conn in silent:
            await conn.aclose()


def test_key_limits_are_validated() -> None:
    private, _ = generate_keypair()
    for bad in (
        {"rekey_after_messages": 0},
        {"rekey_after_messages": 100, "reject_after_messages": 100},
        {"reject_after_messages": 2**64 - 1},  # Noise's own bound leaves no room for control records
        {"rekey_after_time": 0.0},
        {"rekey_after_time": 200.0, "reject_after_time": 180.0},
        {"max_handshakes": 0},
    ):
        with pytest.raises(ValueError):
            TunnelManager("a", private, Directory(), **bad)
