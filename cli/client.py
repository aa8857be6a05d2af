"""A tiny client for the agent's local API, on the standard library's http.client.

http.client (with the email parser it brings) is imported by the first call,
not by ``import cli.client``: ``mesh-agent agent`` imports this module too and
never calls it, and an agent is not made to carry a client it does not use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gossip.address import parse_addr

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


def _connection(api: str, timeout: float) -> http.client.HTTPConnection:
    import http.client

    try:
        host, port = parse_addr(api, 7947)
    except ValueError as exc:
        raise ApiError(f"--api: {exc}") from None
    return http.client.HTTPConnection(host, port, timeout=timeout)


def _unreachable(api: str, exc: Exception) -> ApiError:
    reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or type(exc).__name__
    return ApiError(f"no agent answering at {api} ({reason}); is `mesh-agent agent` running?")


def _refused(resp: http.client.HTTPResponse, data: Any) -> ApiError:
    msg = data.get("error") if isinstance(data, dict) else None
    return ApiError(f"agent refused: {msg or resp.reason} (HTTP {resp.status})")


def call(api: str, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
    import http.client

    conn = _connection(api, timeout)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if payload is not None else {}
    headers.update(_auth_headers())
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (ConnectionRefusedError, TimeoutError, OSError, http.client.HTTPException) as exc:
        raise _unreachable(api, exc) from None
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        raise ApiError(f"agent at {api} sent a response that is not JSON") from None
    if resp.status >= 400:
        raise _refused(resp, data)
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
        raise _refused(resp, data)
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
