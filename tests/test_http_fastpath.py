"""The common path of the calling agent's HTTP layer: which requests it takes, and what it writes.

What it writes is read back with h11, a parser it does not share, so a framing
mistake here shows as a disagreement there.
"""

from __future__ import annotations

import h11
import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.hop_by_hop import request_headers, response_headers
from dataplane.http_fastpath import (
    SLOW,
    PlainRequest,
    Response,
    answer_bytes,
    forward_bytes,
    head_bytes,
    parse_request,
    request_bytes,
)


def plain(raw: bytes) -> PlainRequest:
    got = parse_request(bytearray(raw))
    assert isinstance(got, PlainRequest), got
    return got


def test_a_plain_request_is_read_with_lower_case_names_and_its_length() -> None:
    raw = b"GET /a?b=1 HTTP/1.1\r\nHost: web\r\nX-Trace: T\r\n\r\n"
    req = plain(raw + b"GET /next HTTP/1.1\r\n")  # a pipelined request behind it stays in the buffer
    assert (req.method, req.target, req.body, req.length, req.close) == (b"GET", b"/a?b=1", b"", len(raw), False)
    assert req.headers == [(b"host", b"web"), (b"x-trace", b"T")]


def test_a_body_is_waited_for_whole() -> None:
    head = b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\n"
    assert parse_request(bytearray(head + b"abc")) is None
    req = plain(head + b"abcdeEXTRA")
    assert req.body == b"abcde" and req.length == len(head) + 5


@pytest.mark.parametrize("raw", [b"", b"GET / HTTP/1.1\r\nHost: web\r\n", b"GE"])
def test_an_incomplete_head_needs_more(raw: bytes) -> None:
    assert parse_request(bytearray(raw)) is None


@pytest.mark.parametrize("raw", [
    b"HEAD / HTTP/1.1\r\nHost: web\r\n\r\n",  # its answer's length is not to be read
    b"GET / HTTP/1.0\r\nHost: web\r\n\r\n",  # its answer must not be chunked
    b"CONNECT web:443 HTTP/1.1\r\nHost: web:443\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host: h11 answers 400
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: web\r\nConnection: x-private\r\n\r\n",  # names a field to drop
    b"GET / HTTP/1.1\nHost: web\n\n",  # bare LF, which h11 reads
    b"GET / HTTP/1.1\r\nHost: web\r\nBad Header: x\r\n\r\n",  # llhttp refuses: h11 says why
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n",  # not HTTP at all: the L4 fallback decides
    b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 70000\r\n\r\n",  # beyond the retry buffer
    b"GET /" + b"a" * 17000,  # a head past h11's limit
])
def test_anything_unusual_goes_to_h11(raw: bytes) -> None:
    assert parse_request(bytearray(raw)) is SLOW


def test_the_clients_close_is_noted_and_keep_alive_is_plain() -> None:
    assert plain(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").close
    assert not plain(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: Keep-Alive\r\n\r\n").close


def test_what_is_written_is_read_back_by_h11() -> None:
    raw = request_bytes(b"POST", b"/x", [(b"host", b"web"), (b"content-length", b"3")], b"abc")
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    req = server.next_event()
    assert isinstance(req, h11.Request) and req.method == b"POST" and req.target == b"/x"
    data = server.next_event()
    assert isinstance(data, h11.Data) and data.data == b"abc"
    assert isinstance(server.next_event(), h11.EndOfMessage)

    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "web")]))
    client.send(h11.EndOfMessage())
    client.receive_data(answer_bytes(503, "no-passing-instances", "no passing instance of web", keep=False))
    resp = client.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == 503
    assert dict(resp.headers)[b"x-mesh-error"] == b"no-passing-instances"
    assert dict(resp.headers)[b"connection"] == b"close" and resp.reason == b"Service Unavailable"
    body = client.next_event()
    assert isinstance(body, h11.Data) and body.data == b"no passing instance of web\n"


def _through(raw: bytes, splits: list[int]) -> tuple[Response, bytes]:
    """Feed ``raw`` cut at ``splits`` and collect what the client would be sent (head + body)."""
    resp = Response()
    out = b""
    cuts = sorted({0, len(raw), *[s % (len(raw) + 1) for s in splits]})
    for a, b in zip(cuts, cuts[1:], strict=False):
        resp.feed(raw[a:b])
        if resp.head_done and not out:
            out = head_bytes(resp.status, resp.reason, resp.headers)
        if resp.head_done:
            out += resp.take_body()
    return resp, out


def _client_reads(wire: bytes) -> tuple[h11.Response, bytes, list[tuple[bytes, bytes]]]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "web")]))
    client.send(h11.EndOfMessage())
    client.receive_data(wire)
    head = client.next_event()
    assert isinstance(head, h11.Response)
    body = b""
    while True:
        ev = client.next_event()
        if isinstance(ev, h11.Data):
            body += ev.data
        else:
            assert isinstance(ev, h11.EndOfMessage), ev
            return head, body, list(ev.headers)


@given(body=st.binary(max_size=3000), sizes=st.lists(st.integers(1, 700), max_size=8),
       splits=st.lists(st.integers(0, 5000), max_size=6), chunked=st.booleans())
def test_a_body_arrives_whole_however_it_is_cut(body: bytes, sizes: list[int], splits: list[int],
                                                chunked: bool) -> None:
    if chunked:
        parts, rest = [], body
        for n in sizes:
            parts.append(rest[:n])
            rest = rest[n:]
        parts.append(rest)
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\nx-sum: 1\r\n\r\n"
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    else:
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    resp, wire = _through(raw, splits)
    assert resp.done and resp.keep_alive() and not resp.until_close
    head, got, trailers = _client_reads(wire)
    assert head.status_code == 200 and got == body
    if chunked:
        assert trailers == [(b"x-sum", b"1")]


def test_interim_answers_and_bodiless_ones() -> None:
    resp, wire = _through(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                          b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", [20, 50])
    assert [(s, f) for s, _, f in resp.interim] == [(103, [(b"link", b"</a.css>")])]
    assert resp.status == 204 and resp.done and resp.keep_alive() and wire.endswith(b"\r\n\r\n")
    resp, _ = _through(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", [])
    assert resp.done and resp.keep_alive()  # a 304's length is the representation's: no body follows


def test_what_says_the_connection_cannot_be_kept() -> None:
    resp, _ = _through(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", [])
    assert resp.keep_alive()
    for raw in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
                b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
                b"HTTP/1.1 204 No Content\r\n\r\nstray bytes\n"):  # a body after a 204: unfit for reuse
        resp, _ = _through(raw, [])
        assert resp.done and not resp.keep_alive(), raw
    resp, wire = _through(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", [])  # RFC 9112 6.3 rule 8
    assert resp.until_close and not resp.done and resp.take_body() == b"" and wire.endswith(b"until the end")


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
])
def test_a_response_this_path_cannot_carry_is_an_error(raw: bytes) -> None:
    with pytest.raises(httptools.HttpParserError):
        Response().feed(raw)


@given(cut=st.lists(st.integers(1, 40), min_size=1, max_size=30), which=st.integers(0, 5))
def test_a_request_told_a_piece_at_a_time_is_told_as_if_whole(cut: list[int], which: int) -> None:
    """The caller keeps how far it searched across reads (so a head trickling in is not searched
    again from its start each time); that must never change the verdict."""
    raw = [
        b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 7\r\n\r\nabcdefg",
        b"GET /a HTTP/1.1\nHost: web\n\n",
        b"\x16\x03\x01 binary\nstuff",
        b"GET /" + b"x" * (17 * 1024) + b" HTTP/1.1\r\n",
        b"GET / HTTP/1.0\r\nHost: web\r\n\r\n",
    ][which]
    whole = parse_request(bytearray(raw))
    buf, searched, pos, got = bytearray(), [0], 0, None
    sizes = iter(cut * (len(raw) // sum(cut) + 1))
    while pos < len(raw) and got is None:
        step = next(sizes)
        buf += raw[pos:pos + step]
        pos += step
        got = parse_request(buf, searched)
    if isinstance(whole, PlainRequest):
        assert isinstance(got, PlainRequest) and (got.length, got.body) == (whole.length, whole.body)
    else:
        assert got is whole


def test_a_response_head_without_end_is_refused_past_the_limit() -> None:
    """llhttp sets no limit on a head; h11's 16 KiB holds here too, so an instance streaming header
    fields forever costs the agent bounded memory and the client a 502."""
    resp = Response()
    resp.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(httptools.HttpParserError):
        for _ in range(1000):
            resp.feed(b"x-filler: " + b"y" * 100 + b"\r\n")
    ok = Response()
    ok.feed(b"HTTP/1.1 200 OK\r\n" + b"x-filler: y\r\n" * 500 + b"Content-Length: 0\r\n\r\n")
    assert ok.done
    endless = Response()
    endless.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n")
    with pytest.raises(httptools.HttpParserError):
        for _ in range(200):
            endless.feed(b"x-t: 1\r\n")


# -- a final head passed on as the instance sent it ------------------------------------------------

_NGINX_HEAD = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
               b"Connection: keep-alive\r\nETag: \"x\"\r\n\r\n")


def test_a_plain_head_goes_on_as_sent_less_its_keep_alive_line() -> None:
    resp = Response()
    resp.feed(memoryview(_NGINX_HEAD + b"hello"))
    assert resp.raw_head == (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 5\r\nETag: \"x\"\r\n\r\n")
    head, body, _ = _client_reads(resp.raw_head + resp.take_body())
    assert head.status_code == 200 and body == b"hello"
    assert (b"connection", b"keep-alive") not in head.headers and (b"etag", b'"x"') in head.headers


@pytest.mark.parametrize("raw", [
    # hop-by-hop fields a proxy must drop (RFC 9110 §7.6.1), or a Connection that names one
    b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n",
    # an HTTP/1.0 status line, and a final head after an interim one
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
])
def test_a_head_with_anything_to_change_is_written_anew(raw: bytes) -> None:
    resp = Response()
    resp.feed(raw)
    assert resp.head_done and resp.raw_head is None


def test_a_head_that_came_in_pieces_is_written_anew() -> None:
    resp = Response()
    resp.feed(_NGINX_HEAD[:20])
    resp.feed(_NGINX_HEAD[20:])
    assert resp.head_done and resp.raw_head is None


@given(st.binary(min_size=1, max_size=40).filter(lambda v: b"\r" not in v and b"\n" not in v))
def test_a_passed_on_head_says_what_a_rewritten_one_says(value: bytes) -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-A: " + value + b"\r\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\nok"
    resp = Response()
    try:
        resp.feed(raw)
    except httptools.HttpParserError:
        return  # llhttp refuses the value: nothing goes on at all
    if resp.raw_head is None:
        return
    rewritten = head_bytes(resp.status, resp.reason, [f for f in resp.headers if f[0] != b"connection"])
    passed, rewrote = _client_reads(resp.raw_head + b"ok")[0], _client_reads(rewritten + b"ok")[0]
    assert list(passed.headers) == list(rewrote.headers) and passed.status_code == rewrote.status_code


# -- heads read by llhttp alone, and requests passed on as they came ---------------------------------
#
# The plain readings find fields by searching the head for CRLF, name, colon, and take what llhttp
# accepted as the head's shape.  These pin the llhttp behaviour that makes that search exact, and
# check the plain readings against the field-by-field ones and against request_headers.


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",  # whitespace before the colon
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n Content-Length: 2\r\n\r\nok",  # obs-fold
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",  # a bare LF
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
])
def test_llhttp_refuses_the_heads_a_field_could_hide_in(raw: bytes) -> None:
    with pytest.raises(httptools.HttpParserError):
        Response().feed(raw)


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost : web\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: web\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: web\r\nX-A: 1\nHost: other\r\n\r\n",  # a bare LF
    b"GET  / HTTP/1.1\r\nHost: web\r\n\r\n",  # llhttp lets two spaces by; h11 decides
])
def test_requests_a_field_could_hide_in_go_to_h11(raw: bytes) -> None:
    assert parse_request(bytearray(raw)) is SLOW


_NAMES = st.sampled_from([b"Server", b"Date", b"X-A", b"content-type", b"ETag", b"Vary", b"Set-Cookie",
                          b"Connection", b"Keep-Alive"])
_VALUES = st.binary(min_size=0, max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v)


_FIELDS = st.lists(st.one_of(st.tuples(_NAMES, _VALUES),
                             st.tuples(st.just(b"Content-Length"), st.integers(0, 60).map(lambda n: b"%d" % n)),
                             st.sampled_from([(b"Connection", b"keep-alive"), (b"Transfer-Encoding", b"chunked"),
                                              (b"Content-Length", b"x")])), max_size=6)


@given(fields=_FIELDS, status=st.sampled_from([200, 204, 304, 404, 503]),
       reason=st.sampled_from([b"", b" OK", b" Not Found At All"]), body=st.binary(max_size=40),
       cuts=st.lists(st.integers(0, 60), max_size=3))
def test_a_head_read_by_llhttp_alone_says_what_one_read_field_by_field_says(
        fields: list[tuple[bytes, bytes]], status: int, reason: bytes, body: bytes, cuts: list[int]) -> None:
    """The plain reading (the head whole in the first bytes) against the field-by-field one (the head
    in two pieces), the body cut anywhere after the head in the first."""
    head = b"HTTP/1.1 %d%s\r\n" % (status, reason) + b"".join(b"%s: %s\r\n" % f for f in fields) + b"\r\n"
    raw = head + body
    at = sorted({len(head) + c for c in cuts if len(head) + c < len(raw)})
    whole, pieces = Response(), Response()
    errors = []
    for resp, parts in ((whole, [raw[a:b] for a, b in zip([0, *at], [*at, len(raw)], strict=True)]),
                        (pieces, [raw[:10], raw[10:]])):
        try:
            for part in parts:
                resp.feed(part)
            errors.append(None)
        except (httptools.HttpParserError, ValueError) as exc:
            errors.append(type(exc))
    assert errors[0] == errors[1]
    assert pieces.raw_head is None  # a head in pieces is always read field by field
    if errors[0] is not None:
        return
    for name in ("status", "reason", "headers", "head_done", "done", "chunked", "until_close", "length",
                 "persistent", "extra", "interim"):
        assert getattr(whole, name) == getattr(pieces, name), name
    assert whole.keep_alive() == pieces.keep_alive() and whole.take_body() == pieces.take_body()
    if whole.raw_head is not None and not whole.until_close:
        passed = _client_reads(whole.raw_head + b"x" * (whole.length or 0))[0]
        rewritten = _client_reads(head_bytes(whole.status, whole.reason, response_headers(whole.headers))
                                  + b"x" * (whole.length or 0))[0]
        assert list(passed.headers) == list(rewritten.headers) and passed.reason == rewritten.reason


@pytest.mark.parametrize("after", [b"", b"HTTP/1.1 200 OK\r\n", b"junk"])
def test_a_counted_body_ends_where_its_length_says(after: bytes) -> None:
    raw = _NGINX_HEAD + b"hello" + after
    head = len(_NGINX_HEAD)
    for cut in range(head, len(raw) + 1):
        plain, ref = Response(), Response()
        plain.feed(raw[:cut])
        if cut < len(raw):
            plain.feed(raw[cut:])
        ref.feed(raw[:10])
        ref.feed(raw[10:])
        assert plain.raw_head is not None and ref.raw_head is None
        assert (plain.done, plain.extra, plain.keep_alive(), plain.take_body()) == (
            ref.done, ref.extra, ref.keep_alive(), ref.take_body()) == (True, bool(after), not after, b"hello"), cut


def _instance_reads(wire: bytes) -> tuple[h11.Request, bytes]:
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    req = server.next_event()
    assert isinstance(req, h11.Request), req
    body = b""
    while not isinstance(ev := server.next_event(), h11.EndOfMessage):
        assert isinstance(ev, h11.Data), ev
        body += ev.data
    assert server.next_event() is h11.NEED_DATA  # and nothing after it
    return req, body


_REQUEST_FIELDS = st.lists(st.tuples(
    st.sampled_from([b"Accept", b"X-Request-Id", b"x-forwarded-for", b"Keep-Alive", b"TE", b"Connection",
                     b"Proxy-Connection", b"traceparent", b"Cookie", b"Forwarded"]),
    st.sampled_from([b"keep-alive", b"close", b"Keep-Alive, close", b"1.2.3.4", b"a=1", b"trailers", b""])),
    max_size=6)


@given(fields=_REQUEST_FIELDS, body=st.binary(max_size=30), client=st.sampled_from(["10.0.0.7", "::1"]))
def test_a_request_passed_on_as_it_came_says_what_one_written_anew_says(
        fields: list[tuple[bytes, bytes]], body: bytes, client: str) -> None:
    raw = (b"POST /p?q=1 HTTP/1.1\r\nHost: web\r\n" + b"".join(b"%s: %s\r\n" % f for f in fields)
           + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    req = parse_request(bytearray(raw))
    if req is SLOW:
        return  # a Connection that names other fields: h11's
    assert isinstance(req, PlainRequest)
    passed, passed_body = _instance_reads(forward_bytes(req, client))
    rewritten, rewritten_body = _instance_reads(
        request_bytes(req.method, req.target, request_headers(req.headers, client, b"the-id"), req.body))
    passed_ids = [v for n, v in passed.headers if n == b"x-request-id"]
    rewritten_ids = [v for n, v in rewritten.headers if n == b"x-request-id"]
    named = [v for n, v in fields if n.lower() == b"x-request-id"]
    if named:
        assert passed_ids == rewritten_ids == named
    else:
        assert len(passed_ids) == 1 and rewritten_ids == [b"the-id"]

    def others(h: h11.Request) -> list[tuple[bytes, bytes]]:
        return sorted((n, v) for n, v in h.headers if n != b"x-request-id")

    assert others(passed) == others(rewritten)
    assert (passed.method, passed.target, passed_body) == (rewritten.method, rewritten.target, rewritten_body)
    assert passed_body == body


@pytest.mark.parametrize("fillers", [0, 30, 300])  # heads well under, about and well over the first copy
def test_a_long_head_in_a_buffer_is_read_plainly_too(fillers: int) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"x-filler: y\r\n" * fillers + b"Content-Length: 2\r\n\r\n"
    resp = Response()
    resp.feed(memoryview(bytearray(head + b"ok")))
    assert resp.raw_head == head and resp.done and resp.take_body() == b"ok"
    assert len(resp.headers) == fillers + 1
