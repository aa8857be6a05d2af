"""The local API's connection handling (agent.api.ApiServer.handle) on real loopback
sockets: keep-alive, pipelining, and the two timeouts, with a stand-in agent."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio

from agent import api
from agent.access import AccessPolicy

GET = b"GET /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"


def _server() -> api.ApiServer:
    agent: Any = SimpleNamespace(cfg=SimpleNamespace(name="n1"), access=AccessPolicy(("127.0.0.1", 0), None),
                                 membership=SimpleNamespace(me=SimpleNamespace(status=SimpleNamespace(value="alive"))))
    return api.ApiServer(agent)


async def _read_until_closed(stream: trio.SocketStream, timeout: float = 5.0) -> bytes:
    got = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            got += chunk
    return got


async def _answers(stream: trio.SocketStream, n: int) -> bytes:
    got = b""
    with trio.fail_after(5):
        while got.count(b'"ok": true') < n and got.count(b'"ok":true') < n:
            got += await stream.receive_some(65536)
    return got


async def _client(nursery: trio.Nursery) -> trio.SocketStream:
    """A served ApiServer and a client connection to it that got one answer already."""
    listeners = await nursery.start(trio.serve_tcp, _server().handle, 0)
    client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    await client.send_all(GET)
    assert b"HTTP/1.1 200 " in await _answers(client, 1)
    return client


@pytest.fixture
def quick_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(api, "KEEPALIVE_IDLE", 0.3)


async def test_keep_alive_and_pipelining_then_idle_close(quick_timeouts: None) -> None:
    async with trio.open_nursery() as nursery:
        client = await _client(nursery)
        await client.send_all(GET + GET)  # two requests in one packet
        assert (await _answers(client, 2)).count(b"HTTP/1.1 200 ") == 2
        assert await _read_until_closed(client) == b""  # idle past KEEPALIVE_IDLE: closed
        nursery.cancel_scope.cancel()


async def test_a_request_that_never_ends_gets_408_then_close(quick_timeouts: None) -> None:
    async with trio.open_nursery() as nursery:
        client = await _client(nursery)
        await client.send_all(b"GET /v1/health HTTP/1.1\r\nhost:")  # and nothing more
        reply = await _read_until_closed(client)
        assert reply.startswith(b"HTTP/1.1 408") and b"request not received in time" in reply
        nursery.cancel_scope.cancel()


async def _exchange(nursery: trio.Nursery, request: bytes) -> bytes:
    """``request`` sent on a fresh connection, and all the server sends until it closes."""
    listeners = await nursery.start(trio.serve_tcp, _server().handle, 0)
    client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    await client.send_all(request)
    return await _read_until_closed(client)


@pytest.mark.parametrize(("request_bytes", "status", "detail"), [
    (b"GET /v1/health HTTP/1.1\r\n\r\n", b"400", b"Host"),  # RFC 9112 3.2
    (b"GET /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\nhost: evil.example\r\n\r\n", b"400", b"Host"),  # 3.2 too
    (b"GET /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n", b"400", b"too large"),
    (b"GET /v1/" + b"v" * 20_000 + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n", b"400", b"too large"),
    (b"POST /v1/join HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
     b"400", b"bad HTTP request"),
    (b"GET /v1/health HTTP/1.1\r\nbad header: x\r\nhost: 127.0.0.1\r\n\r\n", b"400", b"bad HTTP request"),
])
async def test_a_malformed_request_gets_a_json_4xx_then_close(request_bytes: bytes, status: bytes,
                                                              detail: bytes) -> None:
    async with trio.open_nursery() as nursery:
        reply = await _exchange(nursery, request_bytes)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status) and b"connection: close" in head.lower(), reply[:300]
        assert detail in body and body.startswith(b'{"error": '), body
        nursery.cancel_scope.cancel()


async def test_a_body_past_the_limit_is_refused_before_it_is_all_sent() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _server().handle, 0)
        client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        await client.send_all(b"PUT /v1/services HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                              b"content-length: 50000000\r\n\r\n" + b"x" * (api.api_http.MAX_BODY + 1))
        reply = await _read_until_closed(client)  # not 50 MB later: the server answers and closes
        assert reply.startswith(b"HTTP/1.1 413") and b"too large" in reply, reply[:200]
        nursery.cancel_scope.cancel()


async def test_http10_and_connection_close_get_one_answer_then_close() -> None:
    async with trio.open_nursery() as nursery:
        for request in (b"GET /v1/health HTTP/1.0\r\n\r\n",
                        b"GET /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"):
            reply = await _exchange(nursery, request)
            assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1, reply
            assert b"connection: close" in reply.lower() and reply.endswith(b"}\n")
        nursery.cancel_scope.cancel()


async def test_a_chunked_request_body_is_read_and_a_head_request_gets_no_body() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, _server().handle, 0)
        client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        # A chunked body on a route that takes none is read to its end: the next request is answered.
        await client.send_all(b"GET /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"2\r\n{}\r\n0\r\n\r\n" + GET)
        assert (await _answers(client, 2)).count(b"HTTP/1.1 200 ") == 2
        await client.send_all(b"HEAD /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        reply = await _read_until_closed(client)
        assert reply.startswith(b"HTTP/1.1 405") and reply.endswith(b"\r\n\r\n"), reply  # a head, no body
        nursery.cancel_scope.cancel()


async def test_an_upgrade_request_is_answered_as_a_plain_one_then_closed() -> None:
    async with trio.open_nursery() as nursery:
        reply = await _exchange(nursery, b"GET /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: upgrade\r\n"
                                         b"upgrade: websocket\r\n\r\n\x81\x85garbage")
        assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1, reply
        assert b"connection: close" in reply.lower()
        nursery.cancel_scope.cancel()


async def test_http10_keep_alive_is_not_offered() -> None:
    async with trio.open_nursery() as nursery:
        reply = await _exchange(nursery, b"GET /v1/health HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200") and b"connection: close" in reply.lower(), reply
        nursery.cancel_scope.cancel()
