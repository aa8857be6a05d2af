"""The instance's agent watches HTTP exchanges go by, for its inbound figures, changing no byte.

The calling agent re-frames each request (dataplane.http_proxy); the agent
next to the instance only needs to know, per request, the method and target,
the status and when the response ended, so it parses both directions (h11)
and never serializes what it forwards.  The caller sends one request at a
time on a kept connection, but the observer follows pipelining anyway:
requests are queued and responses matched to them in order (RFC 9112 §9.3.2).

h11 is a full state machine for one side of a connection; watching needs a
server-role parser for requests and a client-role one for responses.  The
client-role parser must be told the method of each request (a response to
HEAD has no body) by "sending" it a stand-in request, whose bytes are thrown
away; each request cycle then begins with fresh parsers fed with what the old
ones had left over, since a watcher never answers and h11 will not start a
new cycle for a side that has not.  Anything the parsers refuse ends the
watching for that stream, never the stream: the bytes keep flowing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import h11
import trio

#: method, path, status, start (trio clock), start (wall clock)
Done = Callable[[str, str, int, float, float], None]


class ExchangeObserver:
    def __init__(self, done: Done) -> None:
        self._done = done
        self._req = h11.Connection(h11.SERVER)
        self._resp = h11.Connection(h11.CLIENT)
        #: Requests seen, oldest first, whose responses have not ended: (method, path, start, wall).
        self._pending: deque[tuple[bytes, bytes, float, float]] = deque()
        #: Requests the response parser has not been told of yet (it takes one at a time).
        self._untold: deque[bytes] = deque()
        self._status = 0
        self.broken = False

    def requests(self, data: bytes) -> None:
        """Bytes on their way to the instance (b"" at their end)."""
        if self.broken:
            return
        try:
            self._req.receive_data(data)
            while True:
                ev = self._req.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    return
                if isinstance(ev, h11.Request):
                    self._pending.append((ev.method, ev.target, trio.current_time(), time.time()))
                    self._untold.append(ev.method)
                    self._tell()
                elif isinstance(ev, h11.EndOfMessage):
                    left, closed = self._req.trailing_data
                    self._req = h11.Connection(h11.SERVER)
                    if left or closed:
                        self._req.receive_data(left)
                    if closed:
                        self._req.receive_data(b"")
                elif isinstance(ev, h11.ConnectionClosed):
                    return
        except (h11.ProtocolError, RuntimeError):
            self.broken = True

    def _tell(self) -> None:
        """Tell the response parser of the next request, once it is free for one."""
        if self._untold and self._resp.our_state is h11.IDLE:
            method = self._untold.popleft()
            self._resp.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"-")]))
            self._resp.send(h11.EndOfMessage())

    def responses(self, data: bytes) -> None:
        """Bytes on their way back from the instance (b"" at their end)."""
        if self.broken:
            return
        try:
            self._resp.receive_data(data)
            while True:
                ev = self._resp.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    return
                if isinstance(ev, h11.Response):
                    self._status = ev.status_code
                elif isinstance(ev, h11.EndOfMessage):
                    if self._pending:
                        method, path, start, wall = self._pending.popleft()
                        self._done(method.decode("ascii", "replace"), path.decode("ascii", "replace"),
                                   self._status, start, wall)
                    self._resp.start_next_cycle()
                    self._tell()
                elif isinstance(ev, h11.ConnectionClosed):
                    return
        except (h11.ProtocolError, RuntimeError):
            self.broken = True
