"""The calling agent's common case, read and written without h11.

Nearly every request a service mesh carries is the same shape: HTTP/1.1, a
head, no body or a small one with a Content-Length, and an answer framed by a
Content-Length or chunked.  Run through h11 on both sides (a server-role
connection towards the client, a client-role one towards the instance), such
an exchange paid two parse-and-serialize cycles of validation and state
machine, which was more than the rest of the calling agent's work together
(docs/http.md has the profile).  Here llhttp (through httptools, the parser
uvicorn uses and the instance's agent already watches with) parses, and the
few lines a proxy writes are written directly.

Which requests take this path is decided on the complete request, before any
byte of it has gone anywhere, so anything unusual simply takes h11's path as
before, with the same bytes: a version other than 1.1, HEAD and CONNECT,
``Expect``, ``Upgrade``, ``Transfer-Encoding``, a ``Connection`` field that
names anything but ``keep-alive`` or ``close``, a missing or repeated
``Host`` (RFC 9112 §3.2: h11 answers it 400), a repeated ``Content-Length``,
a body larger than the retry buffer, bare LF line ends, and anything llhttp
refuses.  What a request on this path can still meet from the instance is all
handled here: interim responses (RFC 9110 §15.2), bodies framed by
Content-Length, chunked (with trailers) or the connection's close (RFC 9112
§6.3), 204 and 304 without a body.
"""

from __future__ import annotations

import http
import re
from typing import Final

import httptools

from dataplane.hop_by_hop import HOP_BY_HOP, Headers

#: As h11's default limit on a request head (its max_incomplete_event_size): past it h11 decides.
MAX_HEAD: Final = 16 * 1024
#: Trailer fields of a chunked response passed on at most (a bound on what an instance can make
#: the agent hold; trailers are rare, and a handful in practice).
MAX_TRAILERS: Final = 100
#: RFC 9112 §3: method SP request-target SP HTTP-version.  A first line that is not this is
#: some other protocol, carried as bytes; one that is, and then fails to parse, is a bad request.
_REQUEST_LINE: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ ]+ HTTP/1\.[01]\r?$")
#: A request body up to this size is held whole before an instance is chosen, so the request can
#: be retried (dataplane.http_proxy); this path carries only such requests.
RETRY_BUFFER: Final = 64 * 1024
_NOT_HERE: Final = frozenset({b"HEAD", b"CONNECT"})
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close", b""})
#: The one hop-by-hop field (RFC 9110 §7.6.1) a response head may carry and still pass on as it came,
#: less this line: nearly every server sends it, and it says nothing an HTTP/1.1 client needs.
_KEEP_ALIVE_LINE: Final = re.compile(rb"\r\nconnection:[ \t]*keep-alive[ \t]*(?=\r\n)", re.IGNORECASE)


def looks_like_http1(raw: bytes | bytearray) -> bool:
    """Whether the first line received is an HTTP/1 request line (or could still become one)."""
    end = raw.find(b"\n")
    if end < 0:
        return len(raw) < 8 or b" " in raw  # too short to tell: h11 refused it as HTTP
    return _REQUEST_LINE.fullmatch(bytes(raw[:end])) is not None


class SlowPath:
    """Returned when a request must go through h11 (see the module's docstring)."""


SLOW: Final = SlowPath()


class PlainRequest:
    """A complete request this path carries: its fields with lower-case names, as h11 gives them."""

    __slots__ = ("method", "target", "headers", "body", "length", "close")

    def __init__(self, method: bytes, target: bytes, headers: Headers, body: bytes, length: int,
                 close: bool) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        #: Bytes of the client's stream this request took (head and body).
        self.length = length
        #: The client asked for the connection to end after this exchange.
        self.close = close


class _RequestFields:
    """httptools' callbacks for one request head."""

    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: Headers = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_request(buf: bytearray, searched: list[int] | None = None) -> PlainRequest | SlowPath | None:
    """The request at the start of ``buf`` if it is complete and this path may carry it, SLOW if h11
    must (now, or once more has come), None while more bytes are needed to tell.

    ``searched`` (one int, kept by the caller across calls for one request, starting at 0): how
    much of ``buf`` was seen without the head's end, so a head that arrives a byte at a time is
    not searched again from its start on every call (as h11's receive buffer does).
    """
    if not buf:
        return None
    seen = searched[0] if searched else 0
    start = max(seen - 3, 0)
    end = buf.find(b"\r\n\r\n", start)
    if end < 0:
        if len(buf) > MAX_HEAD or buf.find(b"\n\n", max(seen - 1, 0)) >= 0:
            return SLOW
        if buf.find(b"\n", 0, seen) < 0 and buf.find(b"\n", seen) >= 0 and not looks_like_http1(buf):
            return SLOW  # the first line just ended, and it is no request line
        if searched:
            searched[0] = len(buf)
        return None
    head = end + 4
    if buf.find(b"\n\n", 0, head) >= 0:
        return SLOW  # bare LF line ends, which h11 reads and llhttp refuses
    fields = _RequestFields()
    parser = httptools.HttpRequestParser(fields)
    try:
        parser.feed_data(bytes(buf[:head]))
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # CONNECT and Upgrade are h11's
        return SLOW
    method = parser.get_method()
    if not fields.complete or parser.get_http_version() != "1.1" or method in _NOT_HERE:
        return SLOW
    hosts = 0
    length: bytes | None = None
    close = False
    for name, value in fields.headers:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length is not None:
                return SLOW
            length = value
        elif name in (b"transfer-encoding", b"expect", b"upgrade"):
            return SLOW
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if not tokens <= _PLAIN_CONNECTION:
                return SLOW
            close = close or b"close" in tokens
    if hosts != 1:
        return SLOW
    size = int(length) if length is not None else 0  # llhttp checked it is digits
    if size > RETRY_BUFFER:
        return SLOW
    if len(buf) < head + size:
        return None
    return PlainRequest(method, fields.url, fields.headers, bytes(buf[head:head + size]), head + size, close)


def request_bytes(method: bytes, target: bytes, headers: Headers, body: bytes | bytearray) -> bytes:
    """RFC 9112 §3 and §5: the request line, the fields, the empty line, the body."""
    return b"".join([method, b" ", target, b" HTTP/1.1\r\n",
                     *[b"%s: %s\r\n" % field for field in headers], b"\r\n", body])


def head_bytes(status: int, reason: bytes, headers: Headers) -> bytes:
    """RFC 9112 §4: a response's status line and fields."""
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, reason), *[b"%s: %s\r\n" % field for field in headers],
                     b"\r\n"])


def answer_bytes(status: int, reason: str, detail: str, keep: bool) -> bytes:
    """The whole of a response the mesh gives itself (dataplane.http_proxy's answers)."""
    body = f"{detail}\n".encode()
    headers: Headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)),
                        (b"x-mesh-error", reason.encode())]
    if not keep:
        headers.append((b"connection", b"close"))
    return head_bytes(status, http.HTTPStatus(status).phrase.encode(), headers) + body


class Response:
    """An instance's answer to a request of this path, as httptools reads it.

    ``feed`` takes the bytes as they come; the owner sends what ``take``
    returns once ``head_done``.  Framing towards the client (an HTTP/1.1 one:
    this path carries no other) follows the instance's: a Content-Length body
    passes as it is, a chunked one is chunked again piece by piece (trailers
    kept), and one that ends with the connection ends the client's too.
    What an instance sends before its final head is bounded by MAX_HEAD, as
    h11 bounds it, and its trailers by MAX_TRAILERS: llhttp itself sets no
    limit.
    """

    __slots__ = ("parser", "reason", "headers", "status", "head_done", "done", "chunked", "until_close",
                 "interim", "trailers", "body", "extra", "persistent", "before_head", "length", "raw_head")

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.reason = b""
        self.headers: Headers = []
        self.status = 0
        self.head_done = False
        self.done = False
        self.chunked = False
        #: Neither Content-Length nor chunked (RFC 9112 §6.3 rule 8): the body ends with the connection.
        self.until_close = False
        #: Interim responses (1xx) seen before the final head: (status, reason, fields).
        self.interim: list[tuple[int, bytes, Headers]] = []
        self.trailers: Headers = []
        self.body: list[bytes] = []
        #: The instance sent something past the end of its response.
        self.extra = False
        #: RFC 9112 §9.3, read with the head (llhttp forgets it once the message is complete).
        self.persistent = False
        #: Bytes fed before the final head was complete: llhttp sets no limit, h11 16 KiB.
        self.before_head = 0
        #: The body's Content-Length, when the response has one (and no chunked framing).
        self.length: int | None = None
        #: The final head as the instance sent it, when it can go to the client as it is (see _as_sent).
        self.raw_head: bytes | None = None

    # -- httptools' callbacks --

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            if len(self.trailers) >= MAX_TRAILERS:
                raise ValueError(f"more than {MAX_TRAILERS} trailer fields")
            self.trailers.append((name.lower(), value))
        else:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self.interim.append((status, self.reason, self.headers))
            self.reason, self.headers = b"", []
            return
        self.status = status
        self.head_done = True
        self.persistent = self.parser.should_keep_alive()
        if status in (204, 304):
            return
        length = False
        for name, value in self.headers:
            if name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise ValueError(f"unsupported transfer coding {value!r}")  # as h11 refuses it
                self.chunked = True
            elif name == b"content-length":
                length = True
                self.length = int(value)  # llhttp has checked it: digits, and only one value
        self.until_close = not (self.chunked or length)

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        if self.head_done and not self.done:
            self.done = True

    # -- the owner's side --

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Raises httptools.HttpParserError when the bytes are not a response; past the response's
        end nothing raises (what follows only makes the connection unfit for reuse).  ``data`` is not
        kept (llhttp hands the callbacks copies)."""
        if self.done:
            self.extra = True
            return
        first = not self.head_done and not self.before_head
        if not self.head_done:
            self.before_head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # a 101 to a request that asked for no upgrade
            raise httptools.HttpParserError(f"an upgrade nobody asked for: {exc}") from None
        except httptools.HttpParserError:
            if not self.done:
                raise
            self.extra = True
        if not self.head_done:
            if self.before_head > MAX_HEAD:
                raise httptools.HttpParserError(f"no end of the response head in {MAX_HEAD} bytes")
        elif first and not self.interim:
            self.raw_head = self._as_sent(data)

    def _as_sent(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """The final head, which came whole in the first bytes fed, as it may go to the client unchanged
        but for a ``Connection: keep-alive`` line; None when it must be written anew (head_bytes).

        Writing it anew gives the same message: the same status line and fields, less the hop-by-hop
        ones (RFC 9110 §7.6.1), which are checked to be absent.  The bytes are checked to be one
        CRLF-ended line per field, so no obs-fold (RFC 9112 §5.2) and no bare LF goes on, as a
        rewrite would not pass them either; an HTTP/1.0 status line is rewritten as 1.1's.
        """
        if self.parser.get_http_version() != "1.1":
            return None
        keep_alive = 0
        for name, value in self.headers:
            if name in HOP_BY_HOP:
                if name != b"connection" or value.strip().lower() != b"keep-alive" or keep_alive:
                    return None
                keep_alive = 1
        raw = bytes(data[:MAX_HEAD + 4]) if not isinstance(data, bytes) else data
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = raw[:end + 4]
        if keep_alive:
            cut = head.find(b"\r\nConnection: keep-alive\r\n")  # as nearly every server writes it
            if cut >= 0:
                head = head[:cut] + head[cut + 24:]
            else:
                head, removed = _KEEP_ALIVE_LINE.subn(b"", head, 1)
                if removed != 1:
                    return None
        lines = len(self.headers) + 2 - keep_alive
        if head.count(b"\n") != lines or head.count(b"\r\n") != lines:
            return None
        return head

    def keep_alive(self) -> bool:
        """The instance's connection may carry another request (RFC 9112 §9.3)."""
        return self.done and self.persistent and not (self.extra or self.until_close)

    def take_body(self) -> bytes:
        """The body bytes received since the last call, framed for the client."""
        parts, self.body = self.body, []
        if self.chunked:
            out = b"".join([b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p])
            if self.done:
                out += b"".join([b"0\r\n", *[b"%s: %s\r\n" % t for t in self.trailers], b"\r\n"])
            return out
        return b"".join(parts)
