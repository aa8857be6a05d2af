"""dataplane.relay: a session to a member we cannot dial, carried by a third member.

Three TunnelManagers on loopback.  A's dialler refuses to reach C's port (as
a firewall would), so A's session to C must run through B.  B's connection to
C passes a recording forwarder, so the test sees exactly the bytes B handled.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from dataplane import relay
from dataplane.noise import generate_keypair
from dataplane.tunnel import TunnelError, TunnelManager, TunnelStream

HOST = "127.0.0.1"
MARKER = b"the-secret-payload-" * 50


class Directory:
    def __init__(self) -> None:
        self.members: dict[str, tuple[tuple[str, int], bytes]] = {}

    def member_for_key(self, static_public: bytes) -> str | None:
        return next((n for n, (_, k) in self.members.items() if k == static_public), None)

    def tunnel_peer(self, name: str) -> tuple[tuple[str, int], bytes] | None:
        return self.members.get(name)


async def recorder(listener: trio.SocketListener, target_port: int, seen: bytearray) -> None:
    """A TCP forwarder that keeps a copy of every byte in either direction."""

    async def one(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(HOST, target_port)

        async def copy(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while data := await src.receive_some(65536):
                    seen.extend(data)
                    await dst.send_all(data)
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with upstream, client, trio.open_nursery() as n:
            n.start_soon(copy, client, upstream)
            n.start_soon(copy, upstream, client)

    await trio.serve_listeners(one, [listener])


async def echo(peer: str, header: bytes, stream: TunnelStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


async def test_a_session_to_an_unreachable_member_runs_end_to_end_through_a_relay() -> None:
    directory = Directory()
    seen = bytearray()
    stats_b: Counter[str] = Counter()
    blocked: set[int] = set()

    async def connect_a(host: str, port: int) -> trio.abc.Stream:
        if port in blocked:
            raise OSError(113, "No route to host")
        return await trio.open_tcp_stream(host, port)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            keys = {n: generate_keypair() for n in "abc"}
            listeners = {n: await trio.open_tcp_listeners(0, host=HOST) for n in "abc"}
            ports = {n: ls[0].socket.getsockname()[1] for n, ls in listeners.items()}
            # C is advertised at a recording forwarder in front of its real port.
            rec = (await trio.open_tcp_listeners(0, host=HOST))[0]
            rec_port = rec.socket.getsockname()[1]
            nursery.start_soon(recorder, rec, ports["c"], seen)
            directory.members = {"a": ((HOST, ports["a"]), keys["a"][1]),
                                 "b": ((HOST, ports["b"]), keys["b"][1]),
                                 "c": ((HOST, rec_port), keys["c"][1])}
            blocked.add(rec_port)

            def on_stream_b() -> Callable[[str, bytes, TunnelStream], Awaitable[None]]:
                async def handle(peer: str, header: bytes, stream: TunnelStream) -> None:
                    await relay.serve(peer, header, stream, directory, stats_b)
                return handle

            a = TunnelManager("a", keys["a"][0], directory, connect=connect_a, relays=lambda p: ["b"],
                              direct_connect_timeout=1.0)
            b = TunnelManager("b", keys["b"][0], directory, on_stream=on_stream_b())
            c = TunnelManager("c", keys["c"][0], directory, on_stream=echo)
            for name, mgr in (("a", a), ("b", b), ("c", c)):
                await nursery.start(mgr.serve, listeners[name])

            stream = await a.open_stream("c", b"hello")
            got = bytearray()
            await stream.send_all(MARKER)
            await stream.send_eof()
            while data := await stream.receive_some():
                got += data
            assert bytes(got) == MARKER
            assert a.route_to("c") == ["b"] and a.route_to("b") == []
            assert a.stats["direct_dials_failed"] == 1 and a.stats["relayed_dials"] == 1
            assert stats_b["relayed_streams"] == 1
            assert [s["via"] for s in a.sessions_view() if s["peer"] == "c"] == ["b"]
            # B carried the session's bytes, and none of them were the plaintext.
            assert len(seen) > len(MARKER)
            assert b"the-secret-payload" not in seen
            assert b"hello" not in seen

            # While the direct route is known broken, new sessions go straight to the relay.
            assert a.relayed("c")
            for mgr in (a, b, c):
                await mgr.aclose()
            nursery.cancel_scope.cancel()


async def test_a_relay_connects_only_to_live_members_registered_tunnels() -> None:
    directory = Directory()
    stats: Counter[str] = Counter()
    directory.members = {"x": ((HOST, 1), b"k" * 32)}
    left, right = trio.testing.memory_stream_pair()

    class Wrapped:
        async def send_all(self, data: bytes) -> None:
            await left.send_all(data)

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            return bytes(await left.receive_some(max_bytes))

        async def send_eof(self) -> None:
            await left.send_eof()

        async def aclose(self) -> None:
            await left.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.serve, "a", relay.encode_relay("nobody"), Wrapped(), directory, stats)
        assert await right.receive_some(1) == bytes([relay.RELAY_UNAVAILABLE])
    assert stats["relay_refused_unknown_target"] == 1


@pytest.mark.parametrize("header", [b"", b"\x02abc", b"\x03", b"\x03\xc1", b"\x03\x05", b"\x03" + b"\xd9\x00"])
def test_malformed_relay_headers_are_refused(header: bytes) -> None:
    with pytest.raises(relay.RelayError):
        relay.decode_relay(header)


async def test_no_relay_means_the_direct_error() -> None:
    directory = Directory()
    priv, pub = generate_keypair()
    directory.members = {"c": ((HOST, 9), pub)}  # discard port: nothing listens

    async with trio.open_nursery() as nursery:
        a = TunnelManager("a", generate_keypair()[0], directory)
        await nursery.start(a.serve)
        with pytest.raises(TunnelError, match="cannot reach c"):
            await a.open_stream("c", b"x")
        await a.aclose()
