"""A tiny client for the agent's local API.

A one-shot call (every command but the streams) is one request on a socket,
its answer parsed by httptools (llhttp, a dependency of the agent already):
the CLI is what scripts call all day, and the standard library's http.client
brings ssl and the email parser with it, a third of a short command's start.
The streams (monitor, tap) use http.client, imported by the first of them:
they run for long, and its chunked reading is what they need.  Neither is
imported by ``import cli.client``: ``mesh-agent agent`` imports this module
too and never calls it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gossip.address import Address, format_addr, parse_addr

if TYPE_CHECKING:
    import http.client


class ApiError(Exception):
    """One line for the user: the agent is unreachable or said no."""


#: Set by the CLI's --token-file; otherwise MESH_API_TOKEN, then MESH_API_TOKEN_FILE, are read.
token_file: str | None = None


def _token() -> str | None:
    """The API token, if the caller has one; the agent's own user on its host needs none."""
    path = token_file or None
    if path is None:
        env = os.environ.get("MESH_API_TOKEN", "").strip()
        if env:
            return env
        path = os.environ.get("MESH_API_TOKEN_FILE") or None
    if path is None:
        return None
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiError(f"cannot read API token file {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _auth_headers() -> dict[str, str]:
    token = _token()
    return {"authorization": f"Bearer {token}"} if token else {}


def _address(api: str) -> Address:
    try:
        return parse_addr(api, 7947)
    except ValueError as exc:
        raise ApiError(f"--api: {exc}") from None


def _connection(api: str, timeout: float) -> http.client.HTTPConnection:
    import http.client

    host, port = _address(api)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def _unreachable(api: str, exc: Exception) -> ApiError:
    reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or type(exc).__name__
    return ApiError(f"no agent answering at {api} ({reason}); is `mesh-agent agent` running?")


def _refused(status: int, reason: str, data: Any) -> ApiError:
    msg = data.get("error") if isinstance(data, dict) else None
    return ApiError(f"agent refused: {msg or reason} (HTTP {status})")


class _Answer:
    """httptools' callbacks for one response: its reason phrase, its body, and whether it is all in."""

    def __init__(self) -> None:
        self.reason = b""
        self.body = bytearray()
        self.complete = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


def _request_head(method: str, path: str, addr: Address, payload: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {format_addr(addr)}", "connection: close",
             "accept-encoding: identity"]
    if payload is not None:
        lines += ["content-type: application/json", f"content-length: {len(payload)}"]
    elif method in ("POST", "PUT"):
        lines.append("content-length: 0")
    lines += [f"{k}: {v}" for k, v in _auth_headers().items()]
    head = "\r\n".join(lines) + "\r\n\r\n"
    if any(c in path for c in "\r\n ") or head.count("\r\n") != len(lines) + 1:
        raise ApiError("a request line or header would hold a line break or a space (a token with a new line?)")
    return head.encode("latin-1")


def call(api: str, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
    import socket

    import httptools

    addr = _address(api)
    payload = None if body is None else json.dumps(body).encode()
    request = _request_head(method, path, addr, payload) + (payload or b"")
    answer = _Answer()
    parser = httptools.HttpResponseParser(answer)
    host, port = addr
    try:
        # getaddrinfo runs a str host through Python's "idna" codec, which loads it, stringprep and
        # unicodedata in every command; an ASCII name or address as bytes asks the resolver the same
        # question.
        target = (host.encode("ascii") if host.isascii() else host, port)
        with socket.create_connection(target, timeout=timeout) as sock:  # type: ignore[arg-type]
            sock.sendall(request)
            while not answer.complete:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("the connection closed before the answer was complete")
                parser.feed_data(chunk)
    except (OSError, httptools.HttpParserError) as exc:
        raise _unreachable(api, exc) from None
    status = parser.get_status_code()
    try:
        data = json.loads(answer.body) if answer.body else None
    except ValueError:
        raise ApiError(f"agent at {api} sent a response that is not JSON") from None
    if status >= 400:
        raise _refused(status, answer.reason.decode("latin-1"), data)
    return data


def stream_lines(api: str, path: str, timeout: float = 30.0) -> Iterator[bytes]:
    """GET a streamed (chunked) response; return its lines, as the agent sends them, to iterate over.

    The request is made here, so an unreachable or refusing agent raises
    ApiError now, and once this returns the agent is streaming.  ``timeout``
    bounds reaching the agent and its answer; reads of the stream then wait
    indefinitely, since a quiet agent may log nothing for long.
    """
    import http.client

    conn = _connection(api, timeout)
    try:
        conn.request("GET", path, headers=_auth_headers())
        # Kept now: getresponse() hands a "Connection: close" socket over to the response and
        # clears conn.sock, so that afterwards nothing here could lift the timeout from it.
        sock = conn.sock
        resp = conn.getresponse()
    except (ConnectionRefusedError, TimeoutError, OSError, http.client.HTTPException) as exc:
        conn.close()
        raise _unreachable(api, exc) from None
    if resp.status >= 400:
        try:
            data = json.loads(resp.read())
        except (ValueError, OSError, http.client.HTTPException):
            data = None
        conn.close()
        raise _refused(resp.status, resp.reason, data)
    if sock is not None:
        sock.settimeout(None)
    return _lines(conn, resp)


def _lines(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> Iterator[bytes]:
    import http.client

    try:
        while True:
            try:
                line = resp.readline()
            except (OSError, http.client.HTTPException):
                return  # the agent went away mid-stream: the end, as for a clean close
            if not line:
                return
            yield line
    finally:
        conn.close()
