"""cli.client.call against a real socket whose far end misbehaves: every failure is one ApiError line.

The agent's own answers are covered by the CLI tests (tests/test_cli.py and the
API tests); here the peer is a stand-in that answers what a broken or foreign
server might, and records the request it was sent.
"""

from __future__ import annotations

import pytest
import trio

from cli import client
from cli.client import ApiError


async def _serve_once(answer: bytes, seen: list[bytes], task_status: trio.TaskStatus[int]) -> None:
    """Accept one connection, read the request head (and a declared body), send ``answer``, close."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    stream = await listeners[0].accept()
    got = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some(65536)
        head = got.split(b"\r\n\r\n", 1)[0].lower()
        if b"content-length: " in head:
            length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            while len(got.split(b"\r\n\r\n", 1)[1]) < length:
                got += await stream.receive_some(65536)
    seen.append(got)
    await stream.send_all(answer)
    await stream.aclose()
    await listeners[0].aclose()


async def _call(answer: bytes, method: str = "GET", body: object = None) -> tuple[object, bytes]:
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_once, answer, seen)
        try:
            result = await trio.to_thread.run_sync(
                lambda: client.call(f"127.0.0.1:{port}", method, "/v1/services", body, timeout=5))
        except ApiError as exc:
            result = exc
    return result, seen[0]


async def test_a_json_answer_and_the_request_it_answered() -> None:
    result, request = await _call(b'HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n{"ok": true}', "PUT", {"a": 1})
    assert result == {"ok": True}
    head, body = request.split(b"\r\n\r\n", 1)
    assert head.startswith(b"PUT /v1/services HTTP/1.1\r\n") and body == b'{"a": 1}'
    assert b"\r\ncontent-type: application/json" in head and b"\r\nconnection: close" in head


@pytest.mark.parametrize(("answer", "error"), [
    (b'HTTP/1.1 403 Forbidden\r\ncontent-length: 17\r\n\r\n{"error": "nope"}', "agent refused: nope (HTTP 403)"),
    (b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n", "agent refused: Bad Gateway (HTTP 502)"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nnot json", "sent a response that is not JSON"),
    (b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{\"cut\":", "closed before the answer was complete"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "no agent answering"),
    (b"", "closed before the answer was complete"),
])
async def test_a_broken_answer_is_one_line(answer: bytes, error: str) -> None:
    result, _ = await _call(answer)
    assert isinstance(result, ApiError) and error in str(result) and "\n" not in str(result), result


def test_a_token_with_a_line_break_is_refused_before_anything_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_API_TOKEN", "abc\r\nx-evil: 1")
    with pytest.raises(ApiError, match="line break"):
        client.call("127.0.0.1:1", "GET", "/v1/members")
