"""dataplane.reactor: callbacks in one task, tasks woken only when they must act.

Real connected sockets (socketpair), real epoll, trio's real clock.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from dataplane.rawsocket import RawSocketStream
from dataplane.reactor import OnReady, Reactor, ReactorMode

DEADLINE = 10.0


@pytest.fixture(params=[True, False], ids=["idle-hook", "task"])
def idle_hook(request: pytest.FixtureRequest) -> bool:
    """Every test runs with the reactor waiting in trio's place and as a plain task."""
    return bool(request.param)


@asynccontextmanager
async def running_reactor(idle_hook: bool) -> AsyncIterator[tuple[Reactor, trio.Nursery]]:
    reactor = Reactor(idle_hook=idle_hook)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            assert reactor.mode == (ReactorMode.IDLE_HOOK if idle_hook else ReactorMode.TASK)
            yield reactor, nursery
            nursery.cancel_scope.cancel()


async def wait_until_closed(stream: RawSocketStream, reactor: Reactor, on_ready: OnReady) -> None:
    with pytest.raises(trio.ClosedResourceError):
        await stream.wait_readable_in(reactor, on_ready)


def pair() -> tuple[RawSocketStream, socket.socket]:
    """A RawSocketStream and the plain socket at its other end."""
    a, b = socket.socketpair()
    return RawSocketStream(a), b


async def test_callbacks_do_the_work_while_the_task_sleeps(idle_hook: bool) -> None:
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

    async with running_reactor(idle_hook) as (reactor, _):
        async def waiter() -> None:
            nonlocal woke
            await stream.wait_readable_in(reactor, on_ready)
            woke += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            for i in range(20):
                peer.send(b"message %d;" % i)
                await trio.testing.wait_all_tasks_blocked()
            assert woke == 0, "the task woke although every callback returned True"
            assert reactor.watching == 1
            peer.shutdown(socket.SHUT_WR)
        assert woke == 1
        assert reactor.watching == 0
        assert reactor.dispatched >= 20 and reactor.woken == 1
    assert bytes(got) == b"".join(b"message %d;" % i for i in range(20))
    stream.close_now()
    peer.close()


async def test_a_callback_error_is_raised_in_its_task_and_the_reactor_goes_on(idle_hook: bool) -> None:
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

    async with running_reactor(idle_hook) as (reactor, nursery):
        good_done = trio.Event()

        async def good_waiter() -> None:
            await good.wait_readable_in(reactor, count)
            good_done.set()

        nursery.start_soon(good_waiter)
        await trio.testing.wait_all_tasks_blocked()
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


async def test_closing_the_socket_wakes_its_task_and_unregisters_it_first(idle_hook: bool) -> None:
    stream, peer = pair()
    async with running_reactor(idle_hook) as (reactor, nursery):
        failed: list[BaseException] = []

        async def waiter() -> None:
            try:
                await stream.wait_readable_in(reactor, lambda: True)
            except trio.ClosedResourceError as exc:
                failed.append(exc)

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert reactor.watching == 1
        stream.close_now()
        assert reactor.watching == 0  # before the descriptor was gone
        await trio.testing.wait_all_tasks_blocked()
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


async def test_another_sockets_callback_wakes_a_task_with_wake_and_it_goes_on(idle_hook: bool) -> None:
    """What the HTTP layer's turns do: the answer arrives on one socket, and its callback wakes the
    task parked on the client's socket (dataplane.http_turns)."""
    parked, parked_peer = pair()
    other, other_peer = pair()
    buf = memoryview(bytearray(16))

    def on_other() -> bool:
        other.try_receive_into(buf)
        reactor.wake(parked.raw)
        reactor.wake(parked.raw)  # a second wake finds nothing to end
        return True

    async with running_reactor(idle_hook) as (reactor, nursery):
        nursery.start_soon(other.wait_readable_in, reactor, on_other)
        await trio.testing.wait_all_tasks_blocked()
        other_peer.send(b"x")
        await parked.wait_readable_in(reactor, lambda: True)  # returns: woken, not readable
        assert reactor.watching == 1 and reactor.woken == 1  # only the parked socket's watch ended
        reactor.wake(parked.raw)  # not watched now: nothing happens
        parked_peer.send(b"y")  # and it can be waited on again
        await parked.wait_readable_in(reactor, lambda: False)
    for s in (parked, other):
        s.close_now()
    parked_peer.close()
    other_peer.close()


async def test_a_watch_for_a_task_parked_elsewhere_runs_until_unwatched_or_its_end(idle_hook: bool) -> None:
    """Reactor.watch: callbacks with no task waiting on the socket; on_end when the watch ends by itself
    (its callback returned False or raised, its socket was closed, the reactor stopped), never after
    unwatch."""
    buf = memoryview(bytearray(64))
    ends: dict[str, list[BaseException | None]] = {}

    def watched(name: str, stream: RawSocketStream, reactor: Reactor, got: bytearray) -> None:
        ends[name] = []

        def on_ready() -> bool:
            n = stream.try_receive_into(buf)
            if n is None:
                return True
            if n == 0:
                return False
            if bytes(buf[:n]) == b"boom":
                raise ValueError("boom")
            got.extend(buf[:n])
            return True

        stream.watch_in(reactor, on_ready, ends[name].append)

    streams = {name: pair() for name in ("data", "eof", "error", "closed", "unwatched", "stopped")}
    got = {name: bytearray() for name in streams}
    async with running_reactor(idle_hook) as (reactor, _):
        for name, (stream, _peer) in streams.items():
            watched(name, stream, reactor, got[name])
        assert reactor.watching == len(streams)
        streams["data"][1].send(b"hello")
        streams["eof"][1].shutdown(socket.SHUT_WR)
        streams["error"][1].send(b"boom")
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.05)
        assert got["data"] == b"hello" and ends["data"] == []
        assert ends["eof"] == [None]
        assert len(ends["error"]) == 1 and isinstance(ends["error"][0], ValueError)
        streams["closed"][0].close_now()
        assert len(ends["closed"]) == 1 and isinstance(ends["closed"][0], trio.ClosedResourceError)
        streams["unwatched"][0].unwatch()
        streams["unwatched"][1].send(b"late")
        await trio.sleep(0.05)
        assert got["unwatched"] == b"" and ends["unwatched"] == []  # nothing ran after unwatch
        assert reactor.watching == 2  # data and stopped
        assert reactor.woken == 0  # no task was woken for any of it
    assert ends["stopped"] == [None] and ends["data"] == [None]  # the reactor stopped: their end
    for stream, peer in streams.values():
        stream.close_now()
        peer.close()


async def test_a_callback_that_closes_its_own_socket_wakes_the_task_once(idle_hook: bool) -> None:
    stream, peer = pair()

    def close_it() -> bool:
        stream.close_now()
        return False  # ignored: the close already woke the task

    async with running_reactor(idle_hook) as (reactor, _):
        peer.send(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await stream.wait_readable_in(reactor, close_it)
        assert reactor.watching == 0 and reactor.woken == 1
    peer.close()


async def test_cancelling_a_waiting_task_unregisters_its_socket(idle_hook: bool) -> None:
    stream, peer = pair()
    calls = 0

    def on_ready() -> bool:
        nonlocal calls
        calls += 1
        return True

    async with running_reactor(idle_hook) as (reactor, _):
        with trio.move_on_after(0.02) as scope:
            await stream.wait_readable_in(reactor, on_ready)
        assert scope.cancelled_caught
        assert reactor.watching == 0
        peer.send(b"x")  # readable now, but nobody watches: no callback
        await trio.testing.wait_all_tasks_blocked()
        assert calls == 0
        # And the socket may be waited on again.
        with trio.move_on_after(0.02):
            await stream.wait_readable_in(reactor, on_ready)
        assert calls >= 1
    stream.close_now()
    peer.close()


async def test_one_waiter_per_socket(idle_hook: bool) -> None:
    stream, peer = pair()
    async with running_reactor(idle_hook) as (reactor, nursery):
        nursery.start_soon(wait_until_closed, stream, reactor, lambda: True)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await reactor.wait(stream.raw, lambda: True)
        stream.close_now()
    peer.close()


async def test_when_the_reactor_stops_its_tasks_wake_and_go_on_without_it(idle_hook: bool) -> None:
    stream, peer = pair()
    reactor = Reactor(idle_hook=idle_hook)
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
                await trio.testing.wait_all_tasks_blocked()
                inner.cancel_scope.cancel()
            await woke.wait()
    assert not reactor.running and reactor.watching == 0
    # The stream itself still works, with trio's own waits.
    peer.send(b"after")
    assert await stream.receive_some(10) == b"after"
    stream.close_now()
    peer.close()


async def test_a_socket_that_always_has_data_does_not_starve_other_tasks(idle_hook: bool) -> None:
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
    async with running_reactor(idle_hook) as (reactor, nursery):
        nursery.start_soon(wait_until_closed, stream, reactor, nibble)
        ticks = 0
        for _ in range(50):
            await trio.sleep(0)
            ticks += 1
        assert ticks == 50
        assert calls >= 25  # the reactor was busy all along, and we still ran
        stream.close_now()
    peer.close()


# -- the idle hook: trio's own waits keep working while the reactor waits in their place ----------


async def test_trio_io_and_timers_go_on_while_the_hook_waits() -> None:
    watched, watched_peer = pair()
    a, b = trio.socket.socketpair()
    async with running_reactor(True) as (reactor, nursery):
        nursery.start_soon(wait_until_closed, watched, reactor, lambda: True)
        await trio.testing.wait_all_tasks_blocked()
        # A socket trio waits on itself: without trio's epoll inside the hook's,
        # this would sleep until the next deadline (the test's, 10 s away).
        got: list[bytes] = []

        async def trio_reader() -> None:
            got.append(await b.recv(10))

        nursery.start_soon(trio_reader)
        await trio.testing.wait_all_tasks_blocked()
        await a.send(b"trio's own")
        with trio.fail_after(2):
            while not got:
                await trio.sleep(0.001)
        assert got == [b"trio's own"]
        # A timer: the hook waits out trio's timeout and must then not let trio
        # wait it a second time (a 0.5 s sleep would take 1 s).
        start = trio.current_time()
        await trio.sleep(0.5)
        assert trio.current_time() - start < 0.9
        # Idle detection still works (the hook stays out of its way).
        await trio.testing.wait_all_tasks_blocked(0.01)
        assert reactor.mode == ReactorMode.IDLE_HOOK
        watched.close_now()
    watched_peer.close()
    a.close()
    b.close()


class _NotAnException(BaseException):
    """What trio's instrument runner also drops a hook for (as it would a KeyboardInterrupt)."""


class _FlakyReactor(Reactor):
    """Fails once when the idle hook dispatches: a stand-in for a bug in the hook."""

    def __init__(self, error: type[BaseException]) -> None:
        super().__init__(idle_hook=True)
        self.failures = 0
        self.error = error

    def _dispatch(self) -> int:
        if self.failures == 0 and self.mode == ReactorMode.IDLE_HOOK:
            self.failures += 1
            raise self.error("injected")
        return super()._dispatch()


@pytest.mark.parametrize("error", [OSError, _NotAnException])
async def test_a_failing_hook_hands_the_sockets_to_the_reactors_task(error: type[BaseException]) -> None:
    stream, peer = pair()
    reactor = _FlakyReactor(error)
    buf = memoryview(bytearray(100))
    got = bytearray()

    def on_ready() -> bool:
        n = stream.try_receive_into(buf)
        if n:
            got.extend(buf[:n])
        return n != 0

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)  # the hook may fail from here on
            nursery.start_soon(stream.wait_readable_in, reactor, on_ready)
            while reactor.failures == 0:  # the hook's next turn dispatches, and fails
                await trio.sleep(0.001)
            await trio.testing.wait_all_tasks_blocked()  # and the waiter is registered
            assert reactor.mode == ReactorMode.TASK  # failing proves it was hooked
            peer.send(b"served all the same")
            peer.shutdown(socket.SHUT_WR)
            while reactor.watching:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    assert bytes(got) == b"served all the same"
    stream.close_now()
    peer.close()


async def test_a_mock_clock_keeps_the_reactor_a_task(autojump_clock: trio.testing.MockClock) -> None:
    async with running_reactor(False) as (reactor, _):
        assert reactor.mode == ReactorMode.TASK
    hooked = Reactor(idle_hook=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(hooked.run)
        assert hooked.mode == ReactorMode.TASK  # autojump needs trio to see its idle time
        await trio.sleep(3600)  # jumps at once
        nursery.cancel_scope.cancel()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_reactors_in_one_run_share_the_hook_and_none_sleeps_through_another() -> None:
    first, second = Reactor(idle_hook=True), Reactor(idle_hook=True)
    stream, peer = pair()
    with trio.fail_after(2):  # the next deadline: a reactor the hook forgot would wait for it
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            async with trio.open_nursery() as inner:
                await inner.start(second.run)
                assert first.mode == second.mode == ReactorMode.IDLE_HOOK

                async def send_later() -> None:
                    await trio.sleep(0.05)
                    peer.send(b"x")

                nursery.start_soon(send_later)
                await stream.wait_readable_in(second, lambda: False)
                inner.cancel_scope.cancel()
            # The second left; the first is still served.
            nursery.start_soon(send_later)
            other, other_peer = pair()
            other_peer.send(b"y")
            await other.wait_readable_in(first, lambda: False)
            nursery.cancel_scope.cancel()
    for s in (stream, other):
        s.close_now()
    for p in (peer, other_peer):
        p.close()


@pytest.mark.parametrize("defer_max", [10.0, 1e-9], ids=["batch end", "past DEFER_MAX"])
async def test_what_a_batch_defers_runs_once_in_order_at_its_end_or_past_defer_max(
        idle_hook: bool, defer_max: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """dataplane.session sends what a batch sealed for a tunnel this way: all at the batch's end, in the
    order it was deferred, unless DEFER_MAX passed since the first deferral: then after the callback
    under way (here DEFER_MAX is set so that each case is certain, whatever the machine's load)."""
    import dataplane.reactor

    monkeypatch.setattr(dataplane.reactor, "DEFER_MAX", defer_max)
    pairs = [pair() for _ in range(4)]
    log: list[str] = []

    async with running_reactor(idle_hook) as (reactor, nursery):
        def callback(i: int, stream: RawSocketStream) -> OnReady:
            buf = memoryview(bytearray(64))

            def on_ready() -> bool:
                if not stream.try_receive_into(buf):
                    return True
                log.append(f"cb{i}")
                assert reactor.in_batch
                reactor.defer(lambda: log.append(f"sent{i}"))
                return True
            return on_ready

        for i, (stream, _) in enumerate(pairs):
            nursery.start_soon(stream.wait_readable_in, reactor, callback(i, stream))
        await trio.testing.wait_all_tasks_blocked()
        runs = reactor.deferred_runs
        for _, peer in pairs:  # all four readable before the reactor's next batch
            peer.send(b"x")
        while len(log) < 8:
            await trio.sleep(0.001)
        assert not reactor.in_batch
    callbacks = [entry for entry in log if entry.startswith("cb")]
    sent = ["sent" + entry[2:] for entry in callbacks]
    assert sorted(callbacks) == ["cb0", "cb1", "cb2", "cb3"]
    if defer_max > 1:
        assert log == callbacks + sent  # one batch: every callback, then everything deferred
    else:
        assert log == [x for pair_ in zip(callbacks, sent, strict=True) for x in pair_]
    assert reactor.deferred_runs - runs == 4
    for stream, peer in pairs:
        stream.close_now()
        peer.close()
