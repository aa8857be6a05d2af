"""The instance's agent watches HTTP exchanges go by, for its inbound figures, changing no byte.

The calling agent re-frames each request (dataplane.http_proxy); the agent
next to the instance only needs to know, per request, the method and target,
the status and when the response ended, so it parses both directions and
never serializes what it forwards.  The caller sends one request at a time on
a kept connection, but the observer follows pipelining anyway: requests are
queued and responses matched to them in order (RFC 9112 §9.3.2).

The parser is httptools (the llhttp bindings uvicorn uses), not h11: a
watcher needs callbacks as bytes go by, which is what llhttp is, while h11's
state machine expects its owner to take part in the exchange (a client-role
h11 must "send" each request before it will read a response), and doing that
per request cost more than the rest of the far end's work together
(docs/http.md has the figures).

Two limits, both ending the watching of one stream, never the stream (its
bytes keep flowing, and the caller still counts every request outbound):
anything the parser refuses, and a response to HEAD, whose length llhttp
cannot be told to ignore; a HEAD request is still counted, at its response's
head.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import httptools
import trio

#: method, path, status, start (trio clock), start (wall clock)
Done = Callable[[str, str, int, float, float], None]


class _Requests:
    """httptools' callbacks for the bytes going to the instance."""

    __slots__ = ("obs", "parser", "url")

    def __init__(self, obs: ExchangeObserver) -> None:
        self.obs = obs
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        self.obs.pending.append((self.parser.get_method(), self.url, trio.current_time(), time.time()))


class _Responses:
    """httptools' callbacks for the bytes coming back."""

    __slots__ = ("obs", "parser")

    def __init__(self, obs: ExchangeObserver) -> None:
        self.obs = obs
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        obs = self.obs
        status = self.parser.get_status_code()
        if status >= 200 and obs.pending and obs.pending[0][0] == b"HEAD":
            obs.finish(status)
            obs.broken = True  # its body length is not to be read: see the module's docstring

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:  # 1xx heads are not the response
            self.obs.finish(status)


class ExchangeObserver:
    def __init__(self, done: Done) -> None:
        self._done = done
        #: Requests seen, oldest first, whose responses have not ended: (method, path, start, wall).
        self.pending: deque[tuple[bytes, bytes, float, float]] = deque()
        self._req = _Requests(self)
        self._resp = _Responses(self)
        self.broken = False

    def finish(self, status: int) -> None:
        if self.pending:
            method, path, start, wall = self.pending.popleft()
            self._done(method.decode("ascii", "replace"), path.decode("ascii", "replace"), status, start, wall)

    def requests(self, data: bytes | memoryview) -> None:
        """Bytes on their way to the instance (b"" at their end); never raises (it runs inside the
        tunnel's reader)."""
        if self.broken or not data:
            return
        try:
            self._req.parser.feed_data(data)
        except Exception:  # noqa: BLE001 - the parser's refusal, or anything in a callback
            self.broken = True

    def responses(self, data: bytes | memoryview) -> None:
        """Bytes on their way back from the instance (b"" at their end); never raises."""
        if self.broken or not data:
            return
        try:
            self._resp.parser.feed_data(data)
        except Exception:  # noqa: BLE001
            self.broken = True
