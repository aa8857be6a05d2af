"""Gossip over real sockets: sealed UDP datagrams and framed TCP streams.

Everything that crosses the network is sealed with the keyring (unless the
user chose ``--insecure``).  TCP streams carry one length-prefixed frame each
way -- enough for push-pull -- with a hard size cap so a peer cannot make us
buffer without bound.
"""

from __future__ import annotations

import socket as _stdsocket

import trio

from gossip.keyring import Keyring, OpenError
from gossip.wire import Address

MAX_FRAME = 16 * 1024 * 1024
UDP_RECV_BUFFER = 65536


class FrameError(Exception):
    """A TCP peer sent something that is not a frame; ``reason`` is the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Sealer:
    """Seals and opens payloads, or passes them through when insecure."""

    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring

    def seal(self, payload: bytes) -> bytes:
        return self.keyring.seal(payload) if self.keyring else payload

    def open(self, payload: bytes) -> bytes:
        """Raises OpenError for anything our keys did not seal."""
        if self.keyring is None:
            return payload
        return self.keyring.open(payload)


def normalize(addr: tuple[object, ...]) -> Address:
    """A socket address as (host, port), with IPv4-mapped IPv6 unwrapped."""
    host, port = str(addr[0]), int(str(addr[1]))
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return (host, port)


def family_of(host: str) -> int:
    return _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET


async def open_udp(bind: Address) -> trio.socket.SocketType:
    sock = trio.socket.socket(family_of(bind[0]), _stdsocket.SOCK_DGRAM)
    if sock.family == _stdsocket.AF_INET6:
        sock.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 0)
    try:
        await sock.bind(bind)
    except BaseException:
        sock.close()
        raise
    return sock


async def send_frame(stream: trio.abc.Stream, payload: bytes) -> None:
    await stream.send_all(len(payload).to_bytes(4, "big") + payload)


async def _read_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(min(65536, n - len(buf)))
        if not chunk:
            raise FrameError("truncated")
        buf += chunk
    return bytes(buf)


async def receive_frame(stream: trio.abc.ReceiveStream) -> bytes:
    header = await _read_exactly(stream, 4)
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME:
        raise FrameError("oversized")
    return await _read_exactly(stream, size)


__all__ = ["FrameError", "Sealer", "OpenError", "normalize", "open_udp", "send_frame", "receive_frame"]
