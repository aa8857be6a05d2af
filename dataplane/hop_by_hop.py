"""What a proxy changes in a message's header section as it passes it on.

The calling agent re-frames every request and response (dataplane.http_fastpath
or h11 parses and writes them), so the fields that describe one connection must
not be copied to the next one, and the fields a proxy is expected to add are
added here, in one place, once per message.

* RFC 9110 §7.6.1: a proxy removes ``Connection`` and every field it names,
  and the fields that are hop-by-hop although no sender lists them
  (``Proxy-Connection``, ``Keep-Alive``, ``TE``, ``Transfer-Encoding``,
  ``Upgrade``).  The outgoing framing is the writer's: a received
  ``Content-Length`` is kept (it is the message's length, not the
  connection's), chunked transfer coding is asked for again by name, and the
  writer (h11, or the common path) adds ``Connection: close`` when the
  connection needs it.
* RFC 7239 ``Forwarded`` and the de-facto ``X-Forwarded-For``: the client's
  address is appended, so the instance can tell who called through the mesh.
* ``x-request-id``: added when absent, so both agents' logs and the
  instance's can be joined; W3C Trace Context (``traceparent``,
  ``tracestate``) passes through untouched, as any field not named here.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Final

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 §7.6.1's list, and Transfer-Encoding: the outgoing framing is the writer's
#: (see _end_to_end).
HOP_BY_HOP: Final = frozenset({
    b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade",
})
REQUEST_ID: Final = b"x-request-id"
#: Request ids are this agent's random prefix and a count: as unique as random ones across the mesh,
#: and none costs a system call for randomness (os.urandom) on every request.
_ID_PREFIX: Final = os.urandom(8).hex().encode()
_ids = itertools.count(1)
#: The header naming why the mesh answered a request itself (503, 504, 502, 403).
MESH_ERROR: Final = b"x-mesh-error"


def _listed(value: bytes) -> set[bytes]:
    return {token.strip().lower() for token in value.split(b",") if token.strip()}


def wants_upgrade(headers: Headers) -> bool:
    """A ``Connection: upgrade`` with an ``Upgrade`` field: WebSocket and friends (RFC 9110 §7.8).

    Such a connection stops being HTTP after the 101 answer, so it is carried
    as bytes (the L4 fallback), never re-framed.
    """
    upgrade = False
    listed = False
    for name, value in headers:
        if name == b"upgrade":
            upgrade = True
        elif name == b"connection" and b"upgrade" in _listed(value):
            listed = True
    return upgrade and listed


def _forwarded_node(client: str) -> bytes:
    # RFC 7239 §6: an IPv6 address is quoted and bracketed.
    return (f'"[{client}]"' if ":" in client else client).encode()


def _end_to_end(headers: Headers) -> Headers:
    """The fields to pass on, with chunked framing asked for again by name when the message had it
    (RFC 9112 §6.3: then Transfer-Encoding wins over a Content-Length, which is dropped)."""
    for name, _ in headers:
        if name in HOP_BY_HOP:
            break
    else:
        return headers.copy()  # nothing to drop, as in most messages (chunked framing would be one)
    named: set[bytes] = set()
    chunked = False
    for name, value in headers:
        if name == b"connection":
            named |= _listed(value)
        elif name == b"transfer-encoding":
            chunked = True
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    if chunked:
        return [(n, v) for n, v in headers if n not in drop and n != b"content-length"] + [
            (b"transfer-encoding", b"chunked")]
    return [(n, v) for n, v in headers if n not in drop]


def request_headers(headers: Headers, client: str, request_id: bytes | None = None) -> Headers:
    """The fields to send an instance, from a request's as received (lower-case names, as both
    parsers give them)."""
    out = _end_to_end(headers)
    has_id = False
    xff: int | None = None
    for i, (name, _) in enumerate(out):
        if name == REQUEST_ID:
            has_id = True
        elif name == b"x-forwarded-for":
            xff = i
    if not has_id:
        out.append((REQUEST_ID, request_id or new_request_id()))
    address, forwarded = _client_fields(client)
    if xff is None:
        out.append((b"x-forwarded-for", address))
    else:
        name, value = out[xff]
        out[xff] = (name, value + b", " + address)
    out.append((b"forwarded", forwarded))
    return out


def new_request_id() -> bytes:
    return b"%s%016x" % (_ID_PREFIX, next(_ids))


@functools.lru_cache(maxsize=256)
def _client_fields(client: str) -> tuple[bytes, bytes]:
    """The client's address as X-Forwarded-For and Forwarded give it; the same few clients ask again and again."""
    return client.encode(), b"for=" + _forwarded_node(client) + b";proto=http"


@functools.lru_cache(maxsize=256)
def client_lines(client: str) -> bytes:
    """request_headers' X-Forwarded-For and Forwarded for a request that had neither, as field lines."""
    address, forwarded = _client_fields(client)
    return b"x-forwarded-for: %s\r\nforwarded: %s\r\n" % (address, forwarded)


def response_headers(headers: Headers) -> Headers:
    """The fields to send the client, from an instance's response as received."""
    return _end_to_end(headers)
