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

from dataplane.hop_by_hop import HOP_BY_HOP, Headers, client_lines, new_request_id, request_headers

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
    """A complete request this path carries."""

    __slots__ = ("method", "target", "head", "body", "length", "close", "_headers")

    def __init__(self, method: bytes, target: bytes, head: bytes, body: bytes, length: int, close: bool) -> None:
        self.method = method
        self.target = target
        #: The head as received, through its empty line; llhttp accepted it.
        self.head = head
        self.body = body
        #: Bytes of the client's stream this request took (head and body).
        self.length = length
        #: The client asked for the connection to end after this exchange.
        self.close = close
        self._headers: Headers | None = None

    @property
    def headers(self) -> Headers:
        """Its fields with lower-case names, as h11 gives them; split from the head only when asked for."""
        if self._headers is None:
            self._headers = fields_of(self.head)
        return self._headers


#: Two fields both readings look at, as they start a line of a head in lower case (a field is found
#: as CRLF, name, colon: see _NOT_PLAIN and _plain_head for why that search is exact).
_CONNECTION: Final = b"\r\nconnection:"
_CONTENT_LENGTH: Final = b"\r\ncontent-length:"
#: llhttp reads the request head for its verdict alone: no callbacks, so no call into Python per field.
_NO_CALLBACKS: Final = object()
#: Request fields this path leaves to h11 (the module's docstring), found as CRLF, name, colon in the
#: head in lower case: llhttp refuses whitespace before the colon and obs-fold (RFC 9112 §5.1,
#: §5.2), so no field hides from that search.
_NOT_PLAIN: Final = re.compile(rb"\r\n(?:transfer-encoding|expect|upgrade):")


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
    size = end + 4
    head = bytes(buf[:size])
    parser = httptools.HttpRequestParser(_NO_CALLBACKS)
    try:
        parser.feed_data(head)  # through the empty line, which ends the head: complete if nothing raised
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return SLOW  # CONNECT and Upgrade are h11's, and so are bare LF line ends, which h11 reads
    method = parser.get_method()
    line = head[:head.find(b"\r\n")]
    if method in _NOT_HERE or not line.endswith(b" HTTP/1.1"):
        return SLOW
    target = line[len(method) + 1:-9]  # method SP target SP version: llhttp checked the method and version
    if not target or b" " in target or line[len(method):len(method) + 1] != b" ":
        return SLOW  # more than one space between them, which llhttp lets by and h11 decides on
    low = head.lower()
    if _NOT_PLAIN.search(low) is not None or low.count(b"\r\nhost:") != 1:
        return SLOW  # RFC 9112 §3.2: a missing or repeated Host is h11's to answer 400
    close = False
    at = low.find(_CONNECTION)
    while at >= 0:
        eol = low.find(b"\r\n", at + 2)
        tokens = {t.strip(b" \t") for t in low[at + len(_CONNECTION):eol].split(b",")}
        if not tokens <= _PLAIN_CONNECTION:
            return SLOW
        close = close or b"close" in tokens
        at = low.find(_CONNECTION, eol)
    length = 0
    at = low.find(_CONTENT_LENGTH)
    if at >= 0:  # only one: llhttp refuses a repeated Content-Length
        length = int(head[at + len(_CONTENT_LENGTH):low.find(b"\r\n", at + 2)])  # and checked it is digits
        if length > RETRY_BUFFER:
            return SLOW
    if len(buf) < size + length:
        return None
    return PlainRequest(method, target, head, bytes(buf[size:size + length]), size + length, close)


#: Request fields the head as received cannot keep on its way to an instance: hop-by-hop ones
#: (RFC 9110 §7.6.1; Connection is cut apart, and Transfer-Encoding and Upgrade never take this
#: path), and an X-Forwarded-For the client's address must be appended to.
_REQUEST_REWRITTEN: Final = re.compile(rb"\r\n(?:keep-alive|proxy-connection|te|x-forwarded-for):")


def forward_bytes(req: PlainRequest, client: str) -> bytes:
    """The request as it goes to an instance: hop_by_hop.request_headers' changes, made on the head as
    received when they are a ``Connection`` line to cut and fields to add (as nearly always), else
    on its fields, written anew."""
    head = req.head
    low = head.lower()
    if _REQUEST_REWRITTEN.search(low) is not None:
        return request_bytes(req.method, req.target, request_headers(req.headers, client), req.body)
    at = low.find(_CONNECTION)
    while at >= 0:  # it names no other field: this path takes only keep-alive and close
        eol = low.find(b"\r\n", at + 2)
        head, low = head[:at] + head[eol:], low[:at] + low[eol:]
        at = low.find(_CONNECTION, at)
    added = client_lines(client)
    if low.find(b"\r\nx-request-id:") < 0:
        added = b"x-request-id: %s\r\n%s" % (new_request_id(), added)
    return b"".join([head[:-2], added, b"\r\n", req.body])


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

    Two readings, chosen by the first bytes fed.  A head that came whole in
    them and needs nothing changed but its ``Connection: keep-alive`` line
    (_plain_head says exactly when) is read by llhttp alone, with no call
    into Python per field: it goes to the client as it came, and its fields
    are split from it only if someone asks for them.  Anything else (a head in
    pieces, interim answers, chunked framing and its trailers, hop-by-hop
    fields, HTTP/1.0) is read field by field through _Fields.
    """

    __slots__ = ("parser", "_reason", "_headers", "status", "head_done", "done", "chunked", "until_close",
                 "interim", "trailers", "body", "extra", "persistent", "before_head", "length", "raw_head",
                 "_received", "_length_field", "_left")

    def __init__(self) -> None:
        #: Made with the first bytes, which decide the reading (see the class's docstring).
        self.parser: httptools.HttpResponseParser | None = None
        self._reason = b""
        self._headers: Headers | None = []
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
        #: The final head as it goes to the client unchanged (less a ``Connection: keep-alive``
        #: line), when it may; else None, and it is written anew (head_bytes).
        self.raw_head: bytes | None = None
        #: The final head as received, when it is read without per-field callbacks.
        self._received = b""
        self._length_field: bytes | None = None
        #: The plain reading's body bytes still to come (it counts them itself); None in the other.
        self._left: int | None = None

    @property
    def headers(self) -> Headers:
        """The final head's fields (the interim ones' until it comes), lower-case names, as h11 gives them."""
        if self._headers is None:
            self._headers = fields_of(self._received)
        return self._headers

    @property
    def reason(self) -> bytes:
        if self._received and not self._reason:
            line = self._received[:self._received.find(b"\r\n")]
            self._reason = line[13:]  # b"HTTP/1.1 200 " is 13 bytes; llhttp checked the line's shape
        return self._reason

    # -- httptools' callbacks (_Fields' are the field-by-field reading's) --

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status < 200:
            self.interim.append((status, self._reason, self.headers))
            self._reason, self._headers = b"", []
            return
        self.status = status
        self.head_done = True
        self.persistent = self.parser.should_keep_alive()
        if self._received:  # the plain reading: _plain_head found a Content-Length, or a bodiless status
            if status in (204, 304):
                self._left = 0
            else:
                assert self._length_field is not None
                self.length = self._left = int(self._length_field)  # llhttp checked it: digits, one value
            return
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

    def on_message_complete(self) -> None:
        if self.head_done and not self.done:
            self.done = True

    def _message_begin(self) -> None:
        if self.done:
            self.extra = True

    def _body(self, data: bytes) -> None:
        self.body.append(data)

    # -- the owner's side --

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Raises httptools.HttpParserError when the bytes are not a response; past the response's
        end nothing raises (what follows only makes the connection unfit for reuse).  ``data`` is not
        kept (llhttp hands the callbacks copies)."""
        if self.done:
            self.extra = True
            return
        if self._left is not None:
            self._count(data)
            return
        parser = self.parser
        if parser is None:
            plain = _plain_head(data)
            if plain is not None:
                # The plain reading: llhttp reads the head alone, with no callback per field, and the
                # body is counted off its Content-Length (RFC 9112 §6.2; no body for 204 and 304,
                # §6.3), as llhttp would frame it.
                head, self.raw_head, self._length_field = plain
                self._received, self._headers = head, None
                parser = self.parser = httptools.HttpResponseParser(self)
                parser.feed_data(head)  # its refusals are the caller's, as in the other reading
                self._count(memoryview(data)[len(head):])
                return
            parser = self.parser = httptools.HttpResponseParser(_Fields(self))
        if not self.head_done:
            self.before_head += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:  # a 101 to a request that asked for no upgrade
            raise httptools.HttpParserError(f"an upgrade nobody asked for: {exc}") from None
        except httptools.HttpParserError:
            if not self.done:
                raise
            self.extra = True
        if not self.head_done and self.before_head > MAX_HEAD:
            raise httptools.HttpParserError(f"no end of the response head in {MAX_HEAD} bytes")

    def _count(self, data: bytes | bytearray | memoryview) -> None:
        left = self._left
        assert left is not None
        n = len(data)
        if n > left:
            self.extra = True  # what follows the response: the connection is unfit for reuse
            data, n = data[:left], left
        if n:
            self.body.append(bytes(data))
            left -= n
        self._left = left
        if not left:
            self.done = True

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


class _Fields:
    """httptools' callbacks for a response read field by field (Response's second reading)."""

    __slots__ = ("resp", "on_message_begin", "on_headers_complete", "on_body", "on_message_complete")

    def __init__(self, resp: Response) -> None:
        self.resp = resp
        self.on_message_begin = resp._message_begin
        self.on_headers_complete = resp.on_headers_complete
        self.on_body = resp._body
        self.on_message_complete = resp.on_message_complete

    def on_status(self, reason: bytes) -> None:
        self.resp._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.resp
        if resp.head_done:
            if len(resp.trailers) >= MAX_TRAILERS:
                raise ValueError(f"more than {MAX_TRAILERS} trailer fields")
            resp.trailers.append((name.lower(), value))
        else:
            resp.headers.append((name.lower(), value))


#: Fields that, in a response head, must be dropped or acted on (RFC 9110 §7.6.1; Transfer-Encoding
#: is re-framed), found in the head in lower case: a head with one is read field by field and written
#: anew.  ``Connection`` is checked apart: ``keep-alive`` alone is cut out and the rest passed on.
_REWRITTEN: Final = re.compile(rb"\r\n(?:%s):" % b"|".join(sorted(HOP_BY_HOP - {b"connection"})))


#: Most response heads are a few hundred bytes: the first bytes copied to look for the head's end.
_HEAD_GUESS: Final = 512


def _plain_head(data: bytes | bytearray | memoryview) -> tuple[bytes, bytes, bytes | None] | None:
    """For a final head that came whole at the start of ``data`` and may go on as it came: the head as
    received, as it goes to the client, and its Content-Length value (None for a 204 or 304 without
    one); None when it must be read field by field, and its body by llhttp.

    It may go on when it is HTTP/1.1, final (not 1xx), framed by a Content-Length (or a 204 or 304,
    which have no body) and carries no hop-by-hop field but one
    ``Connection: keep-alive`` (RFC 9110 §7.6.1: cut out; every server sends it, and it says nothing
    an HTTP/1.1 client needs).  Fields are found as CRLF, name, colon in the head in lower case:
    llhttp, which reads the head next, refuses whitespace before the colon, obs-fold and bare LF
    line ends (RFC 9112 §5.1, §5.2, §2.2), so no field can hide from that search, and a head it
    refuses goes nowhere.
    """
    raw = data if isinstance(data, bytes) else bytes(data[:_HEAD_GUESS])  # not the body: _count copies it
    end = raw.find(b"\r\n\r\n")
    if end < 0 and len(raw) == _HEAD_GUESS:
        raw = bytes(data[:MAX_HEAD + 4])
        end = raw.find(b"\r\n\r\n")
    if end < 0 or not raw.startswith(b"HTTP/1.1 ") or raw[9:10] == b"1":
        return None
    head = raw[:end + 4]
    low = head.lower()
    if _REWRITTEN.search(low) is not None:
        return None
    passed = head
    at = low.find(_CONNECTION)
    if at >= 0:
        eol = low.find(b"\r\n", at + 2)
        if low[at + len(_CONNECTION):eol].strip(b" \t") != b"keep-alive" or low.find(_CONNECTION, eol) >= 0:
            return None
        passed = head[:at] + head[eol:]
    length: bytes | None = None
    at = low.find(_CONTENT_LENGTH)
    if at >= 0:
        length = head[at + len(_CONTENT_LENGTH):low.find(b"\r\n", at + 2)].strip(b" \t")
    elif raw[9:12] not in (b"204", b"304"):
        return None  # a body that ends with the connection (RFC 9112 §6.3 rule 8): rare, and read by llhttp
    return head, passed, length


def fields_of(head: bytes) -> Headers:
    """The fields of a head llhttp accepted, as its callbacks would have given them."""
    fields: Headers = []
    for line in head.split(b"\r\n")[1:-2]:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.lstrip(b" \t")))  # llhttp keeps trailing whitespace
    return fields
