"""Relayed tunnels: reaching a member we cannot dial through one that can.

SWIM keeps a member alive when our direct probes fail but a ping-req through
someone else reaches it -- a firewall, an asymmetric route, a half-broken
link.  Its services should stay reachable too.  When the direct TCP dial to
its tunnel port fails, the initiator opens a stream of type RELAY over its
(already authenticated) session to a third member and names the target; that
member connects to the target's *registered* tunnel address and splices the
two byte streams.  The initiator then runs the ordinary Noise_IK handshake to
the target over that stream, so the session stays end to end: the relay
carries ciphertext it has no key for (it is wrapped once more by the
initiator-relay session, which is how it travels), and the target
authenticates the initiator's static key exactly as on a direct dial.

A relay only ever connects to the tunnel address a member advertises in
gossip, never an address the requester chose, and only for peers that hold a
session (members): no agent can use another as an open proxy.

Wire: the OPEN header is ``[HEADER_KIND_RELAY] + msgpack(target name)``; the
relay answers one status byte (OK or UNAVAILABLE) and then forwards raw bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Protocol

import msgpack
import trio

from dataplane.rawsocket import RawSocketStream

HEADER_KIND_RELAY = 3
RELAY_OK = 0
RELAY_UNAVAILABLE = 2
MAX_TARGET_NAME = 256
#: Bytes moved per read while splicing (ciphertext records are at most 64 KiB + 2).
_CHUNK = 128 * 1024


class RelayError(Exception):
    pass


class RelayDirectory(Protocol):
    def tunnel_peer(self, name: str) -> tuple[tuple[str, int], bytes] | None:
        """The member's advertised tunnel address and key, if it is up."""
        ...


class RelayedStream(Protocol):
    """The tunnel stream a relay request arrived on (what dataplane.stream.TunnelStream offers)."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...

    async def send_eof(self) -> None: ...

    async def aclose(self) -> None: ...


def encode_relay(target: str) -> bytes:
    packed: bytes = msgpack.packb(target)
    return bytes([HEADER_KIND_RELAY]) + packed


def decode_relay(header: bytes) -> str:
    if not header or header[0] != HEADER_KIND_RELAY:
        raise RelayError("not a relay header")
    try:
        target = msgpack.unpackb(header[1:], raw=False)
    except Exception as exc:  # noqa: BLE001 - hostile input: any failure is a malformed header
        raise RelayError(f"malformed relay header ({type(exc).__name__})") from None
    if type(target) is not str or not 0 < len(target) <= MAX_TARGET_NAME:
        raise RelayError("malformed relay header (target)")
    return target


async def connect_through(stream: trio.abc.Stream) -> None:
    """Initiator side: wait for the relay's status byte; raises RelayError when it could not connect."""
    try:
        status = await stream.receive_some(1)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise RelayError(f"relay stream broke: {exc}") from None
    if status != bytes([RELAY_OK]):
        raise RelayError("the relay could not reach the target" if status else "the relay closed the stream")


async def _pump(src: RelayedStream | RawSocketStream, dst: RelayedStream | RawSocketStream,
                stats: Counter[str], key: str) -> None:
    while data := await src.receive_some(_CHUNK):
        await dst.send_all(bytes(data))
        stats[key] += len(data)
    await dst.send_eof()


async def serve(
    peer: str,
    header: bytes,
    stream: RelayedStream,
    directory: RelayDirectory,
    stats: Counter[str],
    *,
    connect_timeout: float = 5.0,
    log: Callable[..., None] | None = None,
) -> None:
    """Relay side: connect ``peer``'s stream to the target's tunnel port and copy bytes both ways."""
    say = log or (lambda *a, **k: None)
    stats["relay_requests"] += 1
    try:
        target = decode_relay(header)
    except RelayError as exc:
        stats["relay_refused_malformed"] += 1
        say("relay_refused", peer=peer, reason=str(exc))
        await _abort(stream)
        return
    route = directory.tunnel_peer(target) if target != peer else None
    if route is None:
        stats["relay_refused_unknown_target"] += 1
        say("relay_refused", peer=peer, target=target, reason="not a live member with a tunnel")
        await _refuse(stream)
        return
    (host, port), _key = route
    try:
        with trio.fail_after(connect_timeout):
            conn = RawSocketStream.adopt(await trio.open_tcp_stream(host, port))
    except (OSError, trio.TooSlowError) as exc:
        stats["relay_connect_failures"] += 1
        say("relay_connect_failed", peer=peer, target=target, error=str(exc) or type(exc).__name__)
        await _refuse(stream)
        return
    stats["relayed_streams"] += 1
    say("relay_open", peer=peer, target=target)
    try:
        await stream.send_all(bytes([RELAY_OK]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump, stream, conn, stats, "relay_bytes_to_target")
            nursery.start_soon(_pump, conn, stream, stats, "relay_bytes_from_target")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        stats["relay_broken"] += 1
    finally:
        await trio.aclose_forcefully(conn)
        await _abort(stream)


async def _refuse(stream: RelayedStream) -> None:
    with trio.move_on_after(2.0):
        try:
            await stream.send_all(bytes([RELAY_UNAVAILABLE]))
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await _abort(stream)


async def _abort(stream: RelayedStream) -> None:
    with trio.CancelScope(shield=True):
        await stream.aclose()
