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
