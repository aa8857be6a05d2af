"""HTTP/1.1 framing for the local API: httptools (llhttp) parses requests, response heads are written here.

A poll of ``GET /v1/members`` is mostly framing: with h11 on both sides, its
event objects and header validation were over half of the agent's CPU for a
kept-alive request.  uvicorn's split is kept: a C parser for what the peer
sends, whose strictness (RFC 9112 framing, header tokens, Content-Length with
Transfer-Encoding refused) is llhttp's, and heads written from our own fixed
header names and values, which never carry input from the peer.

The parser reads everything it is fed, several pipelined requests included:
requests queue here in order as their last byte arrives, and the server
answers them one by one.  What h11 enforced and llhttp does not is checked
here: a request head (target and headers) larger than MAX_HEAD, and an HTTP/1.1
request without Host or any request with two (RFC 9112 §3.2; the access rules read
Host against DNS rebinding, so which of two counts must never be a question), are
bad requests.  A body is counted as
it arrives: past MAX_BODY the request is marked, so the server can answer 413
without reading the rest; a body the access rules refused at the head is
counted and never kept.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import httptools

#: Largest request head (target and headers), as h11's max_incomplete_event_size bounded it.
MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024

_REASONS = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict", 413: b"Content Too Large",
    415: b"Unsupported Media Type", 429: b"Too Many Requests", 500: b"Internal Server Error",
    503: b"Service Unavailable", 507: b"Insufficient Storage",
}


class Request:
    """One request as parsed; ``body`` is None when its body is not to be kept."""

    __slots__ = ("target", "headers", "method", "keep_alive", "version", "body", "seen", "head_size",
                 "too_large", "verdict")

    def __init__(self) -> None:
        self.target = b""
        #: (lower-case name, value) in the order sent.
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = ""
        self.keep_alive = True
        self.version = "1.1"
        self.body: bytearray | None = bytearray()
        self.seen = 0
        self.head_size = 0
        self.too_large = False
        #: What the head check made of it: the path, the query, and who is calling or why it is refused.
        self.verdict: tuple[str, str, object] = ("", "", None)

    def facts(self, wanted: frozenset[bytes]) -> tuple[dict[str, str], bool]:
        """The ``wanted`` headers (the last value of each), and whether the head announces a body
        (RFC 9112 §6.3: chunked, or a Content-Length above 0), in one pass over the headers."""
        headers: dict[str, str] = {}
        body = False
        for name, value in self.headers:
            if name in wanted:
                headers[name.decode()] = value.decode("latin-1").strip()
            elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"0", b"")):
                body = True
        return headers, body


class BadRequest(Exception):
    """The peer sent something that is not an HTTP/1.1 request we accept; the connection ends."""


class RequestReader:
    """httptools' callbacks for one connection: the requests complete so far, in order.

    ``on_head`` runs for each request once its head is in, before any of its
    body: it sets ``verdict`` and may set ``body`` to None to have the body
    counted but not kept.
    """

    def __init__(self, on_head: Callable[[Request], None]) -> None:
        self._on_head = on_head
        self._parser = httptools.HttpRequestParser(self)
        #: The request being received, from its first byte until its last.
        self.current: Request | None = None
        self.ready: deque[Request] = deque()
        #: Why the stream cannot be read further (answered once the ready requests are), and the status.
        self.error: str | None = None
        self.error_status = 400
        #: Set after an upgrade request: what follows it is not read.
        self._stopped = False

    def feed(self, data: bytes) -> None:
        if self.error is not None or self._stopped:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade (or CONNECT) is not offered: the request is answered as a plain one and
            # the connection ends there, as the bytes after it are not HTTP/1.1.
            if self.ready and self.current is None:
                self.ready[-1].keep_alive = False
                self._stopped = True
            else:
                self.error = "upgrade not supported"
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, BadRequest):
                self.error = str(cause)
            else:  # a bug in a head check: the request is refused, the agent goes on
                self.error, self.error_status = f"internal error: {type(cause).__name__}", 500
        except httptools.HttpParserError as exc:
            self.error = str(exc) or "malformed request"
        if self.error is not None:
            self.current = None

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = Request()

    def on_url(self, url: bytes) -> None:
        req = self.current
        assert req is not None
        req.head_size += len(url)
        if req.head_size > MAX_HEAD:
            raise BadRequest("request head too large")
        req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        assert req is not None
        req.head_size += len(name) + len(value) + 4
        if req.head_size > MAX_HEAD:
            raise BadRequest("request head too large")
        req.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = self.current
        assert req is not None
        parser = self._parser
        req.method = parser.get_method().decode("ascii", "replace")
        req.version = parser.get_http_version()
        # HTTP/1.0 keep-alive is not offered (h11 did not either): such a client is answered, then closed.
        req.keep_alive = req.version == "1.1" and parser.should_keep_alive()
        hosts = sum(1 for name, _ in req.headers if name == b"host")
        if hosts > 1 or (req.version == "1.1" and not hosts):  # RFC 9112 §3.2: a 400 either way
            raise BadRequest("missing mandatory Host header" if not hosts else "more than one Host header")
        self._on_head(req)

    def on_body(self, data: bytes) -> None:
        req = self.current
        assert req is not None
        req.seen += len(data)
        if req.seen > MAX_BODY:
            req.too_large = True
            req.body = None
        elif req.body is not None:
            req.body += data

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.ready.append(self.current)
        self.current = None


def response(status: int, body: bytes, headers: list[tuple[str, str]], *, close: bool,
             head_only: bool = False) -> bytes:
    """A whole response with a Content-Length; ``headers`` are ours, never the peer's."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
    lines += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
    lines.append(b"content-length: %d\r\n" % len(body))
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def stream_head(status: int, headers: list[tuple[str, str]], chunked: bool) -> bytes:
    """The head of a body sent as it is produced: chunked for HTTP/1.1, else until the close."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
    lines += [f"{k}: {v}\r\n".encode("latin-1") for k, v in headers]
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes, chunked: bool) -> bytes:
    """One piece of a streamed body (an empty piece is nothing: a zero-length chunk would end it)."""
    if not chunked or not data:
        return data
    return b"%x\r\n%s\r\n" % (len(data), data)


#: The end of a chunked body.
LAST_CHUNK = b"0\r\n\r\n"
