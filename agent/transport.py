"""Gossip over real sockets: sealed UDP datagrams and framed TCP streams.

Everything that crosses the network is sealed with the keyring (unless the
user chose ``--insecure``).  TCP streams carry one length-prefixed frame each
way -- enough for push-pull -- with a hard size cap so a peer cannot make us
buffer without bound.
"""

from __future__ import annotations

import errno
import socket as _stdsocket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable

import trio

from dataplane.rawsocket import RawSocketStream
from gossip.keyring import SEAL_OVERHEAD, SEAL_VERSION, Keyring, OpenError
from gossip.wire import Address

MAX_FRAME = 16 * 1024 * 1024
UDP_RECV_BUFFER = 65536

# Linux's per-socket ICMP error reporting (<linux/in.h>, <linux/in6.h>, <linux/errqueue.h>);
# the socket module does not name them.
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3
_SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data
#: Errors that a send can report on behalf of an *earlier* datagram's ICMP error.
DEFERRED_ICMP = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
#: Error-queue entries read per wake-up, so that a flood of ICMP cannot hold the loop.
ERRQUEUE_BURST = 64


class FrameError(Exception):
    """A TCP peer sent something that is not a frame; ``reason`` is the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: What a payload that does not open says about its sender (see ``Sealer.mismatch``).
WRONG_KEY = "wrong_key"  # sealed, with no key we hold
UNENCRYPTED = "unencrypted"  # plain gossip, and we have a key
ENCRYPTED = "encrypted"  # sealed, and we run --insecure
UNREADABLE = "unreadable"  # neither: not gossip at all


def looks_sealed(payload: bytes) -> bool:
    """A sealed payload opens with its version byte; plain gossip (a msgpack array) never does."""
    return len(payload) >= SEAL_OVERHEAD and payload[0] == SEAL_VERSION


def looks_plain(payload: bytes) -> bool:
    """Unsealed gossip: a packet (msgpack 2-array) or a deflated stream (gossip.wire)."""
    return payload[:1] in (b"\x92", b"\xc1")


class Mismatch(OpenError):
    """A peer's payload did not open; ``kind`` says whether a key, or encryption itself, differs."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class Sealer:
    """Seals and opens payloads, or passes them through when insecure."""

    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring

    def seal(self, payload: bytes) -> bytes:
        return self.keyring.seal(payload) if self.keyring else payload

    def open(self, payload: bytes) -> bytes:
        """Raises OpenError for anything our keys did not seal.

        An insecure agent refuses sealed payloads too: left to the decoder they
        would only count as malformed, and the operator would never learn that
        the sender has a key this agent lacks.
        """
        if self.keyring is None:
            if looks_sealed(payload):
                raise OpenError("sealed payload, and this agent has no key")
            return payload
        return self.keyring.open(payload)

    def mismatch(self, payload: bytes) -> str:
        """Why ``payload`` did not open, as far as its bytes tell: a different key, or one side unencrypted."""
        if self.keyring is None:
            return ENCRYPTED if looks_sealed(payload) else UNREADABLE
        if looks_sealed(payload):
            return WRONG_KEY
        return UNENCRYPTED if looks_plain(payload) else UNREADABLE


def normalize(addr: tuple[object, ...]) -> Address:
    """A socket address as (host, port), with IPv4-mapped IPv6 unwrapped."""
    host, port = str(addr[0]), int(str(addr[1]))
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return (host, port)


def family_of(host: str) -> int:
    return _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET


class DatagramSocket:
    """The gossip UDP socket, with a fast path around trio for the common case.

    Every probe, ack and gossip round is one datagram, so their per-packet cost
    is most of what an idle or joining agent spends.  trio's ``sendto``
    resolves the address and checkpoints on every call; a datagram to a literal
    IPv4 address on an IPv4 socket needs neither, so it goes out with one
    non-blocking ``sendto``.  Only when the kernel's buffer is full (EAGAIN) or
    the address is not a literal do we fall back to trio, which waits properly.
    On the receive side, ``recv_nowait`` lets the agent drain a burst of
    datagrams in one wake-up.

    ICMP "port unreachable" is asked for (IP_RECVERR): when a member's agent is
    killed, its host answers our ping with it at once, and the probe need not
    wait out its timeout to learn that (see ``Membership.port_unreachable``).
    Without IP_RECVERR Linux drops ICMP errors for unconnected UDP sockets.  With
    it, the error is queued on the socket; the next send or receive also
    reports it once as an OSError, which says nothing about *that* call's
    datagram, so a send retries once.  The queue must be drained
    (``unreachable``), or epoll keeps reporting the socket as ready.
    """

    _LITERAL_CACHE_MAX = 4096

    def __init__(self, raw: _stdsocket.socket) -> None:
        raw.setblocking(False)
        self.raw = raw
        self.sock = trio.socket.from_stdlib_socket(raw)
        self._literal: dict[str, bool] = {}
        self.icmp = _ask_for_icmp_errors(raw)
        #: A send reported an ICMP error: the error queue has an entry to read.
        self.errors_pending = False

    def _fast(self, host: str) -> bool:
        ok = self._literal.get(host)
        if ok is None:
            if len(self._literal) >= self._LITERAL_CACHE_MAX:
                self._literal.clear()
            try:
                _stdsocket.inet_pton(_stdsocket.AF_INET, host)
                ok = self.raw.family == _stdsocket.AF_INET
            except OSError:
                ok = False
            self._literal[host] = ok
        return ok

    async def sendto(self, data: bytes, addr: Address) -> None:
        try:
            await self._sendto(data, addr)
        except OSError as exc:
            if not self.icmp or exc.errno not in DEFERRED_ICMP:
                raise
            # An earlier datagram's ICMP error, reported by this call; this
            # datagram was not sent.  The error queue keeps the details.
            self.errors_pending = True
            await self._sendto(data, addr)

    async def _sendto(self, data: bytes, addr: Address) -> None:
        if self._fast(addr[0]):
            try:
                self.raw.sendto(data, addr)
                return
            except BlockingIOError:
                pass
        await self.sock.sendto(data, addr)

    async def wait_readable(self) -> None:
        """Until a datagram or an ICMP error is queued (a checkpoint either way)."""
        await trio.lowlevel.wait_readable(self.raw)

    def recv_nowait(self) -> tuple[bytes, tuple[object, ...]] | None:
        """A datagram already queued in the kernel, or None.  Raises OSError
        for a pending ICMP error (once per error; the next call goes on)."""
        try:
            data, src = self.raw.recvfrom(UDP_RECV_BUFFER)
        except BlockingIOError:
            return None
        return data, src

    def unreachable(self) -> list[Address]:
        """Drain the ICMP error queue: the addresses whose host said "port unreachable"."""
        out: list[Address] = []
        self.errors_pending = False
        if not self.icmp:
            return out
        for _ in range(ERRQUEUE_BURST):
            try:
                _, ancdata, _, dest = self.raw.recvmsg(1, 512, _stdsocket.MSG_ERRQUEUE)
            except OSError:  # BlockingIOError: drained
                break
            for level, kind, body in ancdata:
                if (level, kind) not in ((_stdsocket.IPPROTO_IP, _IP_RECVERR),
                                         (_stdsocket.IPPROTO_IPV6, _IPV6_RECVERR)):
                    continue
                if len(body) < _SOCK_EXTENDED_ERR.size:
                    continue
                ee_errno, origin, _type, _code, _pad, _info, _data = _SOCK_EXTENDED_ERR.unpack_from(body)
                # Port unreachable (ICMP 3/3, ICMPv6 1/4) is the one the kernel maps to ECONNREFUSED.
                if ee_errno == errno.ECONNREFUSED and origin in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6):
                    out.append(normalize(dest))
        return out

    def close(self) -> None:
        self.sock.close()


def _ask_for_icmp_errors(raw: _stdsocket.socket) -> bool:
    """Turn on IP_RECVERR (and IPV6_RECVERR on a v6 socket); False where it is not available."""
    try:
        raw.setsockopt(_stdsocket.IPPROTO_IP, _IP_RECVERR, 1)
        if raw.family == _stdsocket.AF_INET6:
            raw.setsockopt(_stdsocket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
    except OSError:
        return False
    return True


async def open_tcp_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """trio.open_tcp_listeners, given an ASCII host as bytes.

    The stdlib's getaddrinfo, which trio asks first, encodes a str host with
    the idna codec: a codec module and stringprep's tables, loaded into every
    agent for addresses that are almost always numeric.
    """
    return await trio.open_tcp_listeners(port, host=host.encode("ascii") if host.isascii() else host)


async def open_udp(bind: Address) -> DatagramSocket:
    raw = _stdsocket.socket(family_of(bind[0]), _stdsocket.SOCK_DGRAM)
    try:
        if raw.family == _stdsocket.AF_INET6:
            raw.setsockopt(_stdsocket.IPPROTO_IPV6, _stdsocket.IPV6_V6ONLY, 0)
        raw.setblocking(False)
        raw.bind(bind)  # once, at start-up, before any task runs
    except BaseException:
        raw.close()
        raise
    await trio.lowlevel.checkpoint()
    return DatagramSocket(raw)


async def send_frame(stream: trio.abc.Stream, payload: bytes) -> None:
    await stream.send_all(len(payload).to_bytes(4, "big") + payload)


def _whole_frame(buf: bytes | bytearray) -> bytes | None:
    """The frame in ``buf`` if it is all there, None if more is to come; FrameError if it is bad."""
    if len(buf) < 4:
        return None
    size = int.from_bytes(buf[:4], "big")
    if size > MAX_FRAME:
        raise FrameError("oversized")
    if len(buf) < 4 + size:
        return None
    if len(buf) > 4 + size:
        raise FrameError("trailing")  # a second frame, or garbage after the first
    return bytes(buf[4:])


async def receive_frame(stream: trio.abc.ReceiveStream, buf: bytes = b"") -> bytes:
    """One length-prefixed frame (its start may be in ``buf``), and it must be the last thing the peer sends.

    A push-pull is one frame each way, so the header and the body are read
    together (one receive for a small frame, instead of a receive for four
    bytes and another for the rest): a seed answering a burst of joins on a
    starved CPU waits for the scheduler once per receive.
    """
    held = bytearray(buf)
    while True:
        frame = _whole_frame(held)
        if frame is not None:
            return frame
        want = 65536 if len(held) < 4 else min(65536, 4 + int.from_bytes(held[:4], "big") - len(held))
        chunk = await stream.receive_some(want)
        if not chunk:
            raise FrameError("truncated")
        held += chunk


#: Connections a gossip listener accepts per wake-up (see FrameServer).
ACCEPT_BURST = 32
#: accept(2) errors that say the process or system is out of something: wait, then go on.
_ACCEPT_CAPACITY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF = 0.1

#: Answers frames that arrived together: (peer, frame) in, one reply frame (or None: close) each out.
Respond = Callable[[list[tuple[Address, bytes]]], list[bytes | None]]


class FrameServer:
    """The gossip TCP listener: one frame in and one frame back per connection.

    Why not ``trio.serve_listeners`` and a task per connection: when a burst of
    joins reaches a seed, every joiner has connected and sent its push-pull
    long before the seed, one process among dozens on a starved CPU, gets to
    run; what it then spends per join decides how long the whole cluster
    waits.  A task per connection, with its cancel scopes, scheduler passes
    and forced close, cost more of the seed's CPU than the push-pull itself.
    So one wake-up accepts every pending connection (up to ACCEPT_BURST),
    reads each frame that is already whole with one non-blocking receive,
    answers all of them with one call of ``respond`` (which merges them all
    before it encodes a reply, once) and hands each reply to the kernel with
    one non-blocking send.  A connection that has not sent all of its frame
    yet, or whose reply the kernel does not take at once, gets a task of its
    own, with the timeout.
    """

    def __init__(self, listeners: list[_stdsocket.socket], respond: Respond, drop: Callable[[str], None],
                 after: Callable[[], Awaitable[None]], io: Counter[str], timeout: float) -> None:
        for sock in listeners:
            sock.setblocking(False)
        self.listeners = listeners
        self._respond = respond
        self._drop = drop
        self._after = after
        self._io = io
        self._timeout = timeout

    @classmethod
    def adopt(cls, listeners: list[trio.SocketListener], respond: Respond, drop: Callable[[str], None],
              after: Callable[[], Awaitable[None]], io: Counter[str], timeout: float) -> FrameServer:
        """Take over the sockets of trio listeners (which must not be used after)."""
        socks = []
        for listener in listeners:
            t = listener.socket
            socks.append(_stdsocket.socket(t.family, t.type, t.proto, fileno=t.detach()))
        return cls(socks, respond, drop, after, io, timeout)

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for sock in self.listeners:
                    nursery.start_soon(self._accept_loop, sock, nursery)
        finally:
            for sock in self.listeners:
                sock.close()

    async def _accept_loop(self, listener: _stdsocket.socket, nursery: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            ready: list[tuple[_stdsocket.socket, Address, bytes]] = []
            for _ in range(ACCEPT_BURST):
                try:
                    sock, raw_peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_CAPACITY:
                        self._drop("tcp_accept")
                        await trio.sleep(_ACCEPT_BACKOFF)
                    break  # (others: a connection reset before we took it)
                sock.setblocking(False)
                peer = normalize(raw_peer)
                try:
                    first = sock.recv(65536)
                    frame = _whole_frame(first)
                except BlockingIOError:
                    first, frame = b"", None
                except FrameError as exc:
                    self._drop("tcp_" + exc.reason)
                    sock.close()
                    continue
                except OSError:
                    self._drop("tcp_broken")
                    sock.close()
                    continue
                if frame is None:
                    nursery.start_soon(self._one, sock, peer, first)
                    continue
                self._io["tcp_bytes_in"] += len(frame) + 4
                ready.append((sock, peer, frame))
            if not ready:
                continue
            replies = self._respond([(peer, frame) for _, peer, frame in ready])
            for (sock, _, _), reply in zip(ready, replies, strict=True):
                if reply is None:
                    sock.close()
                    continue
                out = len(reply).to_bytes(4, "big") + reply
                try:
                    sent = sock.send(out)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._drop("tcp_broken")
                    sock.close()
                    continue
                if sent < len(out):
                    nursery.start_soon(self._send_rest, sock, out, sent)
                    continue
                self._io["tcp_bytes_out"] += len(out)
                sock.close()
            await self._after()

    async def _one(self, sock: _stdsocket.socket, peer: Address, first: bytes) -> None:
        """A connection whose frame is still on its way: wait for it (within the timeout), then answer."""

        async def finish(stream: RawSocketStream) -> None:
            frame = await receive_frame(stream, first)
            self._io["tcp_bytes_in"] += len(frame) + 4
            [reply] = self._respond([(peer, frame)])
            if reply is not None:
                await send_frame(stream, reply)
                self._io["tcp_bytes_out"] += len(reply) + 4

        await self._guarded(sock, finish)
        await self._after()

    async def _send_rest(self, sock: _stdsocket.socket, out: bytes, sent: int) -> None:
        """A reply larger than the kernel took at once (a big cluster's push-pull)."""

        async def finish(stream: RawSocketStream) -> None:
            await stream.send_all(memoryview(out)[sent:])
            self._io["tcp_bytes_out"] += len(out)

        await self._guarded(sock, finish)

    async def _guarded(self, sock: _stdsocket.socket, work: Callable[[RawSocketStream], Awaitable[None]]) -> None:
        """``work`` on the connection within the timeout; a failure counted by reason; the socket closed."""
        stream = RawSocketStream(sock)
        try:
            with trio.move_on_after(self._timeout) as scope:
                try:
                    await work(stream)
                except FrameError as exc:
                    self._drop("tcp_" + exc.reason)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._drop("tcp_broken")
            if scope.cancelled_caught:
                self._drop("tcp_timeout")
        finally:
            stream.close_now()


__all__ = [
    "ENCRYPTED", "UNENCRYPTED", "UNREADABLE", "WRONG_KEY", "DatagramSocket", "FrameError", "FrameServer",
    "Mismatch", "Sealer", "OpenError", "looks_plain", "looks_sealed", "normalize", "open_udp", "send_frame",
    "receive_frame",
]
