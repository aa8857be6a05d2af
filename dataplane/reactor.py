"""Many sockets' readiness in one task: trio's cost of a wake-up paid once per batch.

Why: with one task per proxied direction, every socket that becomes readable
costs a full trip through trio's scheduler (the epoll event is mapped to its
task, the task is rescheduled, its coroutine chain resumed, and the socket
re-armed with ``epoll_ctl`` before the task sleeps again).  Under 16
concurrent request/response streams an agent spends most of its time there:
a plain two-hop relay on trio, with no cipher at all, made 18.5k requests/s
against stunnel's ~33k.  The same relay with its sockets in one
level-triggered epoll of its own, read by one task that runs a short
synchronous callback per ready socket, made 39.6k (5 alternating rounds,
medians; the prototype is described in the commit that added this file).

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
  tasks (gossip, the API, timers).
* When the reactor stops, its waiting tasks wake and go on with trio's own
  waits (``running`` is then False).
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from typing import Final

import outcome
import trio

from dataplane.rawsocket import YIELD_EVERY

__all__ = ["OnReady", "Reactor"]

#: Called in the reactor task when the socket is readable: True to keep
#: watching (it did the work), False to wake the waiting task instead.
OnReady = Callable[[], bool]
#: Events taken from the epoll per call; more stay ready for the next one.
_MAX_EVENTS: Final = 256


class _Watch:
    __slots__ = ("fd", "on_ready", "task")

    def __init__(self, fd: int, on_ready: OnReady, task: trio.lowlevel.Task) -> None:
        self.fd = fd
        self.on_ready = on_ready
        self.task = task


class Reactor:
    """One task that watches sockets for readability and runs their callbacks (module docstring)."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._watches: dict[int, _Watch] = {}
        #: Callbacks run and tasks woken: for tests and the agents' counters.
        self.dispatched = 0
        self.woken = 0

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
        watches = self._watches
        try:
            task_status.started()
            while True:
                await trio.lowlevel.wait_readable(epoll)
                for _ in range(YIELD_EVERY):
                    events = epoll.poll(0, _MAX_EVENTS)
                    if not events:
                        break
                    for fd, _mask in events:
                        # A watch that ended earlier in this batch is gone; one
                        # that took over its descriptor number since only sees a
                        # spurious call, which every callback tolerates.
                        watch = watches.get(fd)
                        if watch is not None:
                            self._fire(watch)
        finally:
            self._epoll = None
            for watch in list(watches.values()):
                self._finish(watch, outcome.Value(None))
            epoll.close()

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
        if self._watches.get(watch.fd) is not watch:
            return
        del self._watches[watch.fd]
        if self._epoll is not None:
            try:
                self._epoll.unregister(watch.fd)
            except OSError:  # closed behind our back: the kernel dropped it already
                pass
        self.woken += 1
        trio.lowlevel.reschedule(watch.task, result)

    async def wait(self, sock: socket.socket, on_ready: OnReady) -> None:
        """Until ``on_ready()`` returns False or raises (raised here), the socket
        is closed (``ClosedResourceError``), or the reactor stops.

        ``on_ready`` runs in the reactor's task each time the socket is readable;
        it must not block and must tolerate being called when a read then finds
        nothing.  The caller must re-check its state when this returns.
        """
        epoll = self._epoll
        if epoll is None:
            raise RuntimeError("the reactor is not running")
        fd = sock.fileno()
        if fd in self._watches:
            raise trio.BusyResourceError("another task is already waiting on this socket")
        watch = _Watch(fd, on_ready, trio.lowlevel.current_task())
        # Level-triggered: a callback that leaves data unread is called again on
        # the next batch, so fairness never loses a wake-up.
        epoll.register(fd, select.EPOLLIN)
        self._watches[fd] = watch

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            if self._watches.get(fd) is watch:
                del self._watches[fd]
                if self._epoll is not None:
                    try:
                        self._epoll.unregister(fd)
                    except OSError:
                        pass
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def closing(self, sock: socket.socket) -> None:
        """``sock`` is about to be closed: wake its waiting task with ``ClosedResourceError``."""
        try:
            fd = sock.fileno()
        except OSError:
            return
        watch = self._watches.get(fd)
        if watch is not None:
            self._finish(watch, outcome.Error(trio.ClosedResourceError("this stream was closed")))
