"""Many sockets' readiness in one task: trio's cost of a wake-up paid once per batch.

Why: with one task per proxied direction, every socket that becomes readable
costs a full trip through trio's scheduler (the epoll event is mapped to its
task, the task is rescheduled, its coroutine chain resumed, and the socket
re-armed with ``epoll_ctl`` before the task sleeps again).  Under many
concurrent request/response streams an agent spends most of its time there.
With its sockets in one level-triggered epoll of its own, read by one task
that runs a short synchronous callback per ready socket, that trip is paid
once per batch of ready sockets instead of once per socket (the measurements
are in docs/dataplane.md, "The reactor").

The pattern is the classic Reactor (Schmidt, "Reactor: An Object Behavioral
Pattern for Demultiplexing and Dispatching Handles for Synchronous Events",
1995), nested inside trio: trio waits on the reactor's epoll descriptor, which
is readable whenever any of its sockets is, and the reactor task then
dispatches every ready socket in one scheduler turn.

What it keeps of trio's rules:

* A task that waits here stays the owner of its socket.  Its callback does only
  what can be done at once without blocking (the fast path: a read and a
  send).  Anything that needs waiting - for credit, for room, for the end of a
  stream - is the task's: the callback returns ``False`` and the task wakes.
* A callback's exception is raised in the waiting task, never in the reactor,
  so a bug in one stream costs that stream, not the agent's data plane.
* Waiting here is a cancel point: a cancelled task unregisters and leaves.
* A socket closed while its task waits here (``RawSocketStream.close_now``)
  is unregistered before the descriptor is closed, and its task is woken with
  ``ClosedResourceError``, as trio's ``notify_closing`` does.
* Fairness: at most ``YIELD_EVERY`` batches are dispatched between two trips
  through trio's scheduler, so a bulk transfer cannot starve the agent's other
  tasks (gossip, the API, timers).  In the idle hook (below) the reactor goes
  on only while trio has nothing to run, and any work of trio's ends its turn.
* When the reactor stops, its waiting tasks wake and go on with trio's own
  waits (``running`` is then False).

Sends at the end of a batch
---------------------------
Many requests ready at once on many client sockets all go to the same peer,
through one tunnel: sent one by one, each pays a system call and, on the
far side, a wake-up and a read of its own.  A callback that writes to a
tunnel may ``defer`` the send to the end of the batch (dataplane.session),
so what a batch wrote to one tunnel leaves in one write, in the order it was
sealed.  Nothing waits longer than the batch it was written in, and a batch
of one (one request in flight) sends as before.  Nor does it wait for long
batches: past DEFER_MAX after the first deferral, what is deferred runs after
the callback under way.  Where each callback is costly (an HTTP request parsed
and re-framed), waiting for the whole batch held the first request back while
the rest were handled, and the instance's side sat idle meanwhile.

The idle hook
-------------
Nested in trio, a readable socket still costs one trip through trio's
scheduler before its callback runs: epoll returns, the reactor's task is
rescheduled, its coroutine chain resumed.  At one request in flight nothing
is batched, and that trip is a fixed cost on the latency of every hop.

So, where it can, the reactor waits where trio itself would wait: in an
instrument's ``before_io_wait`` hook, which trio calls with the timeout it is
about to block for, once it has run every runnable task.  The hook blocks for
that same timeout in an epoll that holds both trio's epoll and the reactor's,
runs the callbacks of ready sockets at once, and returns as soon as trio has
something to do: I/O of its own (trio's epoll is readable, so trio's wait
returns at once), a task that a callback woke, a deadline moved or reached
(then it wakes trio's wait, as trio's own wake-up for threads does).  Trio
therefore never blocks any longer, nor any shorter, than it would have; it
only stops paying its trip for sockets that the reactor serves.

This needs three things trio keeps private (its epoll, its run queue and its
deadlines, reached through ``trio._core._run``); ``_IdleHook.attach`` checks
that each is what it expects, and that the clock is trio's own SystemClock
(a MockClock's autojump and ``wait_all_tasks_blocked`` need trio to see idle
time itself), and otherwise the reactor runs as a task.  It does the same if
the hook ever fails.  Checked against trio 0.35.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Final

import outcome
import trio

from dataplane.rawsocket import YIELD_EVERY

__all__ = ["OnEnd", "OnReady", "Reactor"]

#: How long what a batch's callbacks defer may wait for the batch's end (seconds).
DEFER_MAX: Final = 50e-6

#: Called in the reactor task when the socket is readable: True to keep
#: watching (it did the work), False to wake the waiting task instead.
OnReady = Callable[[], bool]
#: Events taken from the epoll per call; more stay ready for the next one.
_MAX_EVENTS: Final = 256


#: Called in the reactor when a watch made by ``Reactor.watch`` ends by itself: with the error its
#: callback raised (or the socket's close), or None (the callback returned False, or the reactor stopped).
OnEnd = Callable[[BaseException | None], None]


class _Watch:
    __slots__ = ("fd", "on_ready", "task", "on_end")

    def __init__(self, fd: int, on_ready: OnReady, task: trio.lowlevel.Task | None,
                 on_end: OnEnd | None = None) -> None:
        self.fd = fd
        self.on_ready = on_ready
        #: The task waiting in ``wait``; None for a watch made by ``watch``, which ends with ``on_end``.
        self.task = task
        self.on_end = on_end


class ReactorMode(StrEnum):
    """How a reactor waits (the module docstring says why there are two ways); the values are metric labels."""

    OFF = "off"
    IDLE_HOOK = "idle_hook"
    TASK = "task"


class Reactor:
    """Watches sockets for readability and runs their callbacks, from trio's idle
    hook or from a task of its own (module docstring)."""

    def __init__(self, *, idle_hook: bool = True) -> None:
        self._epoll: select.epoll | None = None
        self._watches: dict[int, _Watch] = {}
        self._idle_hook = idle_hook
        #: IDLE_HOOK or TASK while running, OFF before.
        self.mode = ReactorMode.OFF
        #: Callbacks run and tasks woken, for tests and diagnosis.
        self.dispatched = 0
        self.woken = 0
        #: True while a batch's callbacks run: what they ``defer`` runs when it ends.
        self.in_batch = False
        self._deferred: list[Callable[[], None]] = []
        self._defer_until = 0.0
        #: Deferred calls run, for tests and diagnosis.
        self.deferred_runs = 0

    @property
    def running(self) -> bool:
        """Whether ``wait`` may be used (the reactor's task is running)."""
        return self._epoll is not None

    @property
    def watching(self) -> int:
        return len(self._watches)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch readiness until cancelled; then wake every waiting task."""
        if self._epoll is not None:
            raise RuntimeError("Reactor.run may run only once at a time")
        epoll = select.epoll()
        self._epoll = epoll
        hook = _IdleHook.attach(self, epoll) if self._idle_hook else None
        try:
            self.mode = ReactorMode.TASK if hook is None else ReactorMode.IDLE_HOOK
            task_status.started()
            if hook is not None:
                await hook.failed.wait()
                hook.detach(epoll)  # a bug in the hook: serve from this task instead
                hook = None
                self.mode = ReactorMode.TASK
            while True:
                # Never while the hook is attached: its epoll holds trio's, and
                # trio's must then not hold ours.
                await trio.lowlevel.wait_readable(epoll)
                self._turn()
        finally:
            if hook is not None:
                hook.detach(epoll)
            self._epoll = None
            for watch in list(self._watches.values()):
                self._finish(watch, outcome.Value(None))
            epoll.close()

    def _turn(self) -> None:
        """Serve what is ready, as many batches as fairness allows between two trips through trio."""
        for _ in range(YIELD_EVERY):
            if not self._dispatch():
                break

    def _dispatch(self) -> int:
        """Run the callbacks of the sockets ready now; how many were."""
        assert self._epoll is not None
        events = self._epoll.poll(0, _MAX_EVENTS)
        watches = self._watches
        self.in_batch = True
        try:
            for fd, _mask in events:
                # A watch that ended earlier in this batch is gone; one that took
                # over its descriptor number since only sees a spurious call, which
                # every callback tolerates.
                watch = watches.get(fd)
                if watch is not None:
                    self._fire(watch)
                    if self._deferred and time.perf_counter() >= self._defer_until:
                        self._run_deferred()
        finally:
            self.in_batch = False
            if self._deferred:
                self._run_deferred()
        return len(events)

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the batch under way ends (module docstring, "Sends at the end of a batch");
        only from a callback (``in_batch``).  ``fn`` must not raise: nobody could be told."""
        if not self._deferred:
            self._defer_until = time.perf_counter() + DEFER_MAX
        self._deferred.append(fn)

    def _run_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for fn in deferred:
            self.deferred_runs += 1
            fn()

    def _fire(self, watch: _Watch) -> None:
        self.dispatched += 1
        try:
            keep = watch.on_ready()
        except Exception as exc:
            self._finish(watch, outcome.Error(exc))
            return
        if not keep:
            self._finish(watch, outcome.Value(None))

    def _finish(self, watch: _Watch, result: outcome.Outcome[None]) -> None:
        """Stop watching and wake the task with ``result``, once (a callback may
        already have ended its own watch, by closing its socket)."""
        if self._forget(watch):
            if watch.task is None:
                assert watch.on_end is not None
                watch.on_end(result.error if isinstance(result, outcome.Error) else None)
                return
            self.woken += 1
            trio.lowlevel.reschedule(watch.task, result)

    def _forget(self, watch: _Watch) -> bool:
        """Stop watching, unless that already happened; whether it did now."""
        if self._watches.get(watch.fd) is not watch:
            return False
        del self._watches[watch.fd]
        if self._epoll is not None:
            try:
                self._epoll.unregister(watch.fd)
            except OSError:  # closed behind our back: the kernel dropped it already
                pass
        return True

    async def wait(self, sock: socket.socket, on_ready: OnReady) -> None:
        """Until ``on_ready()`` returns False or raises (raised here), the socket
        is closed (``ClosedResourceError``), or the reactor stops.

        ``on_ready`` runs in the reactor each time the socket is readable;
        it must not block and must tolerate being called when a read then finds
        nothing.  The caller must re-check its state when this returns.
        """
        watch = self._add(sock, on_ready, trio.lowlevel.current_task(), None)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._forget(watch)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def watch(self, sock: socket.socket, on_ready: OnReady, on_end: OnEnd) -> None:
        """Run ``on_ready`` each time ``sock`` is readable, for a task that waits elsewhere (the HTTP
        layer's turns read a local instance's answer so, while the task is parked on its client's
        socket: dataplane.http_turns), until ``unwatch``, or until the watch ends by itself: then
        ``on_end`` runs, in the reactor, and must not raise."""
        self._add(sock, on_ready, None, on_end)

    def _add(self, sock: socket.socket, on_ready: OnReady, task: trio.lowlevel.Task | None,
             on_end: OnEnd | None) -> _Watch:
        epoll = self._epoll
        if epoll is None:
            raise RuntimeError("the reactor is not running")
        fd = sock.fileno()
        if fd in self._watches:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        watch = _Watch(fd, on_ready, task, on_end)
        # Level-triggered: a callback that leaves data unread is called again on
        # the next batch, so fairness never loses a wake-up.
        epoll.register(fd, select.EPOLLIN)
        self._watches[fd] = watch
        return watch

    def unwatch(self, sock: socket.socket) -> None:
        """End a watch made by ``watch``, without its ``on_end``; nothing if there is none."""
        watch = self._watches.get(sock.fileno())
        if watch is not None and watch.task is None:
            self._forget(watch)

    def wake(self, sock: socket.socket) -> None:
        """End ``sock``'s watch and wake its task, from another socket's callback that found work for
        that task (dataplane.http_turns); nothing if it is not watched."""
        watch = self._watches.get(sock.fileno())
        if watch is not None:
            self._finish(watch, outcome.Value(None))

    def closing(self, sock: socket.socket) -> None:
        """``sock`` is about to be closed: wake its waiting task with ``ClosedResourceError``."""
        watch = self._watches.get(sock.fileno())  # -1 once closed: never watched
        if watch is not None:
            self._finish(watch, outcome.Error(trio.ClosedResourceError("this stream was closed")))


class _IdleHook(trio.abc.Instrument):
    """The reactors' wait in trio's place (module docstring, "The idle hook").

    One per trio run, shared by every reactor in it: a hook that waited on its
    own reactor's sockets only would sleep through another's.
    """

    def __init__(self, runner: Any) -> None:
        self._runq = runner.runq
        self._deadlines = runner.deadlines
        self._waiting_for_idle = runner.waiting_for_idle
        self._force_wakeup: Callable[[], None] = runner.io_manager.force_wakeup
        self._trio_fd: int = runner.io_manager._epoll.fileno()
        self._both = select.epoll()
        self._both.register(self._trio_fd, select.EPOLLIN)
        #: The attached reactors, by their epoll's descriptor.
        self._reactors: dict[int, Reactor] = {}
        self._broken = False
        #: Set if the hook ever failed: each reactor's task takes over its sockets.
        self.failed = trio.Event()

    @classmethod
    def attach(cls, reactor: Reactor, epoll: select.epoll) -> _IdleHook | None:
        """Serve ``reactor`` from this run's hook (installed on first use), or None where it cannot work."""
        hook = _HOOK.get()
        if hook is None:
            try:
                from trio._core._run import GLOBAL_RUN_CONTEXT

                runner: Any = GLOBAL_RUN_CONTEXT.runner
                io = runner.io_manager
                usable = (
                    isinstance(getattr(io, "_epoll", None), select.epoll)
                    and callable(getattr(io, "force_wakeup", None))
                    and hasattr(runner.runq, "__len__")
                    and callable(getattr(runner.deadlines, "next_deadline", None))
                    and hasattr(runner.waiting_for_idle, "__len__")
                    and type(runner.clock).__name__ == "SystemClock"
                    and not getattr(runner, "is_guest", True)  # a host loop does the waiting there
                )
            except (ImportError, AttributeError, RuntimeError):
                return None
            if not usable:
                return None
            hook = cls(runner)
            trio.lowlevel.add_instrument(hook)
            _HOOK.set(hook)
        if hook._broken:
            return None
        hook._both.register(epoll.fileno(), select.EPOLLIN)
        hook._reactors[epoll.fileno()] = reactor
        return hook

    def detach(self, epoll: select.epoll) -> None:
        """Stop serving the reactor of ``epoll``; the last one out removes the hook."""
        fd = epoll.fileno()
        if self._reactors.pop(fd, None) is not None and not self._both.closed:
            self._both.unregister(fd)
        if self._reactors:
            return
        try:
            trio.lowlevel.remove_instrument(self)
        except KeyError:  # trio already dropped it
            pass
        self._both.close()
        if _HOOK.get() is self:
            _HOOK.set(None)

    def before_io_wait(self, timeout: float) -> None:
        if self._broken:
            return
        try:
            self._serve(timeout)
        except BaseException as exc:
            # Trio drops a hook that raises anything at all (BaseException
            # included), and then nobody would serve the reactors' sockets:
            # their tasks do that now (Reactor.run), once trio's wait, about to
            # start, returns.  Whatever is not an Exception (KeyboardInterrupt,
            # SystemExit) still goes on to trio, which logs it.
            self._broken = True
            self.failed.set()
            self._force_wakeup()
            if not isinstance(exc, Exception):
                raise

    def _serve(self, timeout: float) -> None:
        # Trio is busy (timeout 0) or about to wait: either way, what is ready
        # now is served first, as much as a reactor's task would serve per turn.
        # Unless trio will not block, or must see the idle time itself, the
        # hook then waits in its place, and must notice a deadline a callback moves.
        waits = timeout > 0 and not self._waiting_for_idle
        deadline = self._deadlines.next_deadline() if waits else 0.0
        for reactor in list(self._reactors.values()):
            reactor._turn()
        if not waits:
            return
        end = time.monotonic() + timeout
        while True:
            if self._runq or self._deadlines.next_deadline() != deadline:
                # A callback woke a task, or moved a deadline: trio must not
                # wait the timeout it had computed.
                self._force_wakeup()
                return
            remaining = end - time.monotonic()
            events = self._both.poll(remaining, len(self._reactors) + 1) if remaining > 0 else []
            if not events:
                self._force_wakeup()  # trio's timeout ran out here: it must not wait it again
                return
            trio_ready = False
            for fd, _mask in events:
                ready = self._reactors.get(fd)
                if ready is not None:
                    ready._dispatch()
                elif fd == self._trio_fd:
                    trio_ready = True
            if trio_ready:
                return  # trio's own wait returns at once


#: This trio run's idle hook, if one is installed.
_HOOK: trio.lowlevel.RunVar[_IdleHook | None] = trio.lowlevel.RunVar("mesh_reactor_idle_hook", default=None)
