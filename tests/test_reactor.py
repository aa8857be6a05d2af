"""dataplane.reactor: callbacks in one task, tasks woken only when they must act.

Real connected sockets (socketpair), real epoll, trio's real clock.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from dataplane.rawsocket import RawSocketStream
from dataplane.reactor import OnReady, Reactor

DEADLINE = 10.0


@asynccontextmanager
async def running_reactor() -> AsyncIterator[tuple[Reactor, trio.Nursery]]:
    reactor = Reactor()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            yield reactor, nursery
            nursery.cancel_scope.cancel()


async def wait_until_closed(stream: RawSocketStream, reactor: Reactor, on_ready: OnReady) -> None:
    with pytest.raises(trio.ClosedResourceError):
        await stream.wait_readable_in(reactor, on_ready)


def pair() -> tuple[RawSocketStream, socket.socket]:
    """A RawSocketStream and the plain socket at its other end."""
    a, b = socket.socketpair()
    return RawSocketStream(a), b


async def test_callbacks_do_the_work_while_the_task_sleeps() -> None:
    stream, peer = pair()
    got = bytearray()
    buf = memoryview(bytearray(4096))
    woke = 0

    def on_ready() -> bool:
        n = stream.try_receive_into(buf)
        if n is None:
            return True  # nothing after all: keep watching
        if n == 0:
            return False  # the end: the task's to handle
        got.extend(buf[:n])
        return True

    async with running_reactor() as (reactor, _):
        async def waiter() -> None:
            nonlocal woke
            await stream.wait_readable_in(reactor, on_ready)
            woke += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            for i in range(20):
                peer.send(b"message %d;" % i)
                await trio.sleep(0.005)
            assert woke == 0, "the task woke although every callback returned True"
            assert reactor.watching == 1
            peer.shutdown(socket.SHUT_WR)
        assert woke == 1
        assert reactor.watching == 0
        assert reactor.dispatched >= 20 and reactor.woken == 1
    assert bytes(got) == b"".join(b"message %d;" % i for i in range(20))
    stream.close_now()
    peer.close()


async def test_a_callback_error_is_raised_in_its_task_and_the_reactor_goes_on() -> None:
    bad, bad_peer = pair()
    good, good_peer = pair()
    buf = memoryview(bytearray(100))
    good_calls = 0

    def explode() -> bool:
        raise ValueError("bug in a callback")

    def count() -> bool:
        nonlocal good_calls
        if good.try_receive_into(buf):
            good_calls += 1
        return True

    async with running_reactor() as (reactor, nursery):
        good_done = trio.Event()

        async def good_waiter() -> None:
            await good.wait_readable_in(reactor, count)
            good_done.set()

        nursery.start_soon(good_waiter)
        await trio.sleep(0.01)
        bad_peer.send(b"x")
        with pytest.raises(ValueError, match="bug in a callback"):
            await bad.wait_readable_in(reactor, explode)
        assert reactor.running
        good_peer.send(b"still served")
        while good_calls == 0:
            await trio.sleep(0.001)
        assert not good_done.is_set()
    for s in (bad, good):
        s.close_now()
    for p in (bad_peer, good_peer):
        p.close()


async def test_closing_the_socket_wakes_its_task_and_unregisters_it_first() -> None:
    stream, peer = pair()
    async with running_reactor() as (reactor, nursery):
        failed: list[BaseException] = []

        async def waiter() -> None:
            try:
                await stream.wait_readable_in(reactor, lambda: True)
            except trio.ClosedResourceError as exc:
                failed.append(exc)

        nursery.start_soon(waiter)
        await trio.sleep(0.01)
        assert reactor.watching == 1
        stream.close_now()
        assert reactor.watching == 0  # before the descriptor was gone
        await trio.sleep(0.01)
        assert len(failed) == 1
        # Its number may now go to a new socket, which the reactor watches afresh.
        fresh, fresh_peer = pair()
        calls = 0

        def on_ready() -> bool:
            nonlocal calls
            calls += 1
            return False

        fresh_peer.send(b"x")
        await fresh.wait_readable_in(reactor, on_ready)
        assert calls == 1
        fresh.close_now()
        fresh_peer.close()
    peer.close()


async def test_a_callback_that_closes_its_own_socket_wakes_the_task_once() -> None:
    stream, peer = pair()

    def close_it() -> bool:
        stream.close_now()
        return False  # ignored: the close already woke the task

    async with running_reactor() as (reactor, _):
        peer.send(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await stream.wait_readable_in(reactor, close_it)
        assert reactor.watching == 0 and reactor.woken == 1
    peer.close()


async def test_cancelling_a_waiting_task_unregisters_its_socket() -> None:
    stream, peer = pair()
    calls = 0

    def on_ready() -> bool:
        nonlocal calls
        calls += 1
        return True

    async with running_reactor() as (reactor, _):
        with trio.move_on_after(0.02) as scope:
            await stream.wait_readable_in(reactor, on_ready)
        assert scope.cancelled_caught
        assert reactor.watching == 0
        peer.send(b"x")  # readable now, but nobody watches: no callback
        await trio.sleep(0.02)
        assert calls == 0
        # And the socket may be waited on again.
        with trio.move_on_after(0.02):
            await stream.wait_readable_in(reactor, on_ready)
        assert calls >= 1
    stream.close_now()
    peer.close()


async def test_one_waiter_per_socket() -> None:
    stream, peer = pair()
    async with running_reactor() as (reactor, nursery):
        nursery.start_soon(wait_until_closed, stream, reactor, lambda: True)
        await trio.sleep(0.01)
        with pytest.raises(trio.BusyResourceError):
            await reactor.wait(stream.raw, lambda: True)
        stream.close_now()
    peer.close()


async def test_when_the_reactor_stops_its_tasks_wake_and_go_on_without_it() -> None:
    stream, peer = pair()
    reactor = Reactor()
    with pytest.raises(RuntimeError, match="not running"):
        await reactor.wait(stream.raw, lambda: True)
    woke = trio.Event()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as inner:
                await inner.start(reactor.run)

                async def waiter() -> None:
                    await stream.wait_readable_in(reactor, lambda: True)
                    woke.set()

                outer.start_soon(waiter)
                await trio.sleep(0.01)
                inner.cancel_scope.cancel()
            await woke.wait()
    assert not reactor.running and reactor.watching == 0
    # The stream itself still works, with trio's own waits.
    peer.send(b"after")
    assert await stream.receive_some(10) == b"after"
    stream.close_now()
    peer.close()


async def test_a_socket_that_always_has_data_does_not_starve_other_tasks() -> None:
    stream, peer = pair()
    peer.setblocking(False)
    buf = memoryview(bytearray(1))  # a byte per call: the socket stays readable
    calls = 0

    def nibble() -> bool:
        nonlocal calls
        calls += 1
        if stream.try_receive_into(buf) and calls % 64 == 0:
            try:
                peer.send(b"y" * 64)  # keep it readable for ever
            except BlockingIOError:
                pass
        return True

    peer.send(b"y" * 4096)
    async with running_reactor() as (reactor, nursery):
        nursery.start_soon(wait_until_closed, stream, reactor, nibble)
        ticks = 0
        for _ in range(50):
            await trio.sleep(0)
            ticks += 1
        assert ticks == 50
        assert calls > 50  # the reactor was busy all along, and we still ran
        stream.close_now()
    peer.close()
