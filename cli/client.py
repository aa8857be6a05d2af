"""A tiny client for the agent's local API (stdlib http.client: no extra import cost)."""

from __future__ import annotations

import http.client
import json
from typing import Any

from gossip.wire import parse_addr


class ApiError(Exception):
    """One line for the user: the agent is unreachable or said no."""


def call(api: str, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
    try:
        host, port = parse_addr(api, 7947)
    except ValueError as exc:
        raise ApiError(f"--api: {exc}") from None
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if payload is not None else {}
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (ConnectionRefusedError, TimeoutError, OSError, http.client.HTTPException) as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else str(exc) or type(exc).__name__
        raise ApiError(f"no agent answering at {api} ({reason}); is `mesh-agent agent` running?") from None
    finally:
        conn.close()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        raise ApiError(f"agent at {api} sent a response that is not JSON") from None
    if resp.status >= 400:
        msg = data.get("error") if isinstance(data, dict) else None
        raise ApiError(f"agent refused: {msg or resp.reason} (HTTP {resp.status})")
    return data
