"""Kept-alive connections to instances, so a request does not pay for a connect.

In ``http`` mode each request is balanced on its own, so consecutive requests
of one client go to different instances; opening a tunnel stream (and, on the
far agent, a TCP connection to the instance) per request would cost a round
trip each.  Each upstream keeps, per instance, the connections whose last
exchange ended cleanly (InstanceConn.reusable), and hands the most recently
used first: it is the one least likely to have been closed by the instance's
own keep-alive timeout meanwhile.  Before reuse a connection is checked at
rest (nothing received, not ended: a peek, no read), which catches an
instance that closed it while it sat here; what remains is the race of a
close in flight as the request goes out, which the HTTP layer retries for
requests that allow it, as every pooling client must.

Connections idle longer than ``idle_timeout`` are closed: most servers close
idle keep-alive connections after 5 to 75 s, and a connection they closed is
one we would only have to discover.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    import h11

#: Kept per instance; more concurrent requests than this open more, and close the extra after use.
MAX_IDLE_PER_INSTANCE: Final = 64
#: Shorter than the keep-alive timeout of most servers (Node.js's default is 5 s).
IDLE_TIMEOUT: Final = 4.0

Key = tuple[str, str]


class Kept(Protocol):
    """A connection as the pool sees it (dataplane.rawsocket.RawSocketStream and TunnelStream are)."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray: ...

    def at_rest(self) -> bool: ...

    def close_now(self) -> None: ...


class InstanceConn:
    """One connection to an instance, and how its current exchange is framed.

    An exchange on the common path (dataplane.http_fastpath) sets ``clean``
    when it ended so that the connection may carry another; one through h11
    has its own client-role h11 connection (``framer``) for that exchange.
    """

    __slots__ = ("key", "stream", "h", "clean", "uses", "idle_since", "local")

    def __init__(self, key: Key, stream: Kept, local: bool) -> None:
        self.key = key
        self.stream = stream
        self.h: h11.Connection | None = None
        self.clean = False
        #: Requests carried so far; a reused connection's failure may be a keep-alive race.
        self.uses = 0
        self.idle_since = 0.0
        #: To an instance on this node (a TCP connection), not a tunnel stream.
        self.local = local

    def framer(self) -> h11.Connection:
        """The h11 connection of an exchange that goes through h11 (made for it)."""
        if self.h is None:
            import h11  # loaded with the first request that needs it (issue 30: not at start)

            self.h = h11.Connection(h11.CLIENT)
        return self.h

    def reusable(self) -> bool:
        """The exchange ended cleanly both ways, and the instance sent nothing past its response (a
        body after a 204, say): what it sent extra would be read as the next request's answer."""
        h = self.h
        if h is None:
            return self.clean
        import h11

        return h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0]

    def next_exchange(self) -> None:
        """Between exchanges: the next one starts with no framing state (h11's start_next_cycle)."""
        self.h = None
        self.clean = False


class Pool:
    def __init__(self, idle_timeout: float = IDLE_TIMEOUT, max_idle: int = MAX_IDLE_PER_INSTANCE) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        #: Per instance, oldest first (give appends), so the expired are always a prefix.
        self._idle: dict[Key, list[InstanceConn]] = {}
        self.reused = 0
        self.opened = 0
        self.stale = 0
        self.expired = 0

    def take(self, key: Key, now: float) -> InstanceConn | None:
        """The most recently used kept connection to ``key`` that is still at rest, or None."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > self.idle_timeout:
                self.expired += 1
                self._close(conn)
                continue
            if not conn.stream.at_rest():
                self.stale += 1
                self._close(conn)
                continue
            self.reused += 1
            return conn
        return None

    def restore(self, conn: InstanceConn) -> None:
        """Put back what ``take`` just handed out and was not used (nothing was sent on it)."""
        self.reused -= 1
        self._idle.setdefault(conn.key, []).append(conn)

    def give(self, conn: InstanceConn, now: float) -> None:
        """Keep ``conn`` for another request if its last exchange ended cleanly; else close it."""
        if not conn.reusable():
            self._close(conn)
            return
        self.keep(conn, now)

    def keep(self, conn: InstanceConn, now: float) -> None:
        """``give`` for a connection its caller has just found reusable."""
        conn.next_exchange()
        conn.idle_since = now
        idle = self._idle.setdefault(conn.key, [])
        idle.append(conn)
        while len(idle) > self.max_idle:
            self._close(idle.pop(0))  # the oldest: the likeliest to be closed by the instance soon

    def sweep(self, now: float) -> None:
        """Close what has been idle too long (the upstream calls this now and then)."""
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since > self.idle_timeout:
                self.expired += 1
                self._close(idle.pop(0))
            if not idle:
                del self._idle[key]

    def forget(self, keys: set[Key]) -> None:
        """Close the kept connections of instances no longer listed."""
        for key in [k for k in self._idle if k not in keys]:
            for c in self._idle.pop(key):
                self._close(c)

    def close_all(self) -> None:
        for idle in self._idle.values():
            for c in idle:
                self._close(c)
        self._idle.clear()

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    @staticmethod
    def _close(conn: InstanceConn) -> None:
        conn.stream.close_now()
