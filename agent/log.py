"""structlog set-up: readable lines for people, JSON lines for machines.

Logs go to stderr so that ``--json`` command output on stdout stays clean.

Monitors (``GET /v1/agent/monitor``, ``mesh-agent monitor``) subscribe to the
same events in-process.  A monitor may ask for a more verbose level than the
agent writes to stderr, as ``consul monitor`` allows, so the level filter is a
processor rather than structlog's filtering wrapper: events below both the
agent's level and every monitor's are dropped first thing, before any
rendering, which keeps the cost of an unwatched ``log.debug`` small.  Each
monitor has a bounded queue; a monitor that reads too slowly loses lines (and
is told how many) rather than slowing the agent down.
"""

from __future__ import annotations

import json
import logging
import sys
import types
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from agent.feed import LossyFeed
from agent.lean import standing_in


def _import_structlog() -> types.ModuleType:
    # structlog imports asyncio for async logging methods this agent never calls (agent/lean.py).
    with standing_in("asyncio"):
        import structlog as imported
    return imported


if TYPE_CHECKING:
    import structlog
else:
    structlog = _import_structlog()

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
#: The level names a monitor may ask for.
LEVEL_NAMES = tuple(_LEVELS)
#: Logger method name -> level; structlog's ``add_log_level`` names them the same way.
_METHOD_LEVELS = {
    **_LEVELS, "warn": logging.WARNING, "exception": logging.ERROR, "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL, "msg": logging.INFO,
}
#: Lines a monitor may fall behind before new ones are dropped for it.
MONITOR_BUFFER = 1024

EventDict = MutableMapping[str, Any]


class Subscription(LossyFeed[bytes]):
    """One monitor's queue of rendered JSON lines, read with ``async for`` (agent.feed: a full queue
    drops lines and counts them); a line after a gap is preceded by a ``monitor_lines_dropped`` line,
    so that the reader sees the gap where it is."""

    def __init__(self, level: int, buffer: int) -> None:
        super().__init__(buffer)
        self.level = level

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> bytes:
        missed, line = await self.next_item()
        if not missed:
            return line
        return _render({"timestamp": _now_iso(), "level": "warning", "event": "monitor_lines_dropped",
                        "dropped": missed, "detail": "this monitor read too slowly; lines were skipped"}) + line


class _Hub:
    """The subscribers and the levels that decide which events are worth processing."""

    def __init__(self) -> None:
        self.subscribers: tuple[Subscription, ...] = ()
        self.agent_level = logging.INFO
        #: Events below this are dropped before any processing.
        self.floor = logging.INFO
        #: Events that could not be handed to monitors (a bug in rendering, say): never raised.
        self.failures = 0
        #: Lines dropped for monitors that have since gone.
        self.dropped_closed = 0

    def update(self) -> None:
        self.floor = min([self.agent_level, *(s.level for s in self.subscribers)])

    @property
    def dropped(self) -> int:
        return self.dropped_closed + sum(s.dropped for s in self.subscribers)


_hub = _Hub()


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # as TimeStamper(fmt="iso", utc=True)


def _render(event: EventDict) -> bytes:
    return (json.dumps(event, default=str) + "\n").encode()


def _level_of(method_name: str) -> int:
    return _METHOD_LEVELS.get(method_name, logging.INFO)


def _drop_unwanted(logger: Any, method_name: str, event: EventDict) -> EventDict:
    """First processor: nobody wants this event, so skip the timestamp and rendering."""
    if _level_of(method_name) < _hub.floor:
        raise structlog.DropEvent
    return event


def _fan_out(logger: Any, method_name: str, event: EventDict) -> EventDict:
    """Hand the event, rendered once as a JSON line, to every monitor that wants it.

    It runs inside the caller's logging call, so it must never raise: a
    failure is counted and the agent's own log line still goes out.
    """
    subscribers = _hub.subscribers
    if subscribers:
        try:
            level = _level_of(method_name)
            line = None
            for sub in subscribers:
                if level >= sub.level:
                    if line is None:
                        copy: EventDict = dict(event)  # the console renderer pops keys from the original
                        if "exc_info" in copy:
                            copy = structlog.processors.format_exc_info(logger, method_name, copy)
                        line = _render(copy)
                    sub.offer(line)
        except Exception:
            _hub.failures += 1
    return event


def _agent_level_only(logger: Any, method_name: str, event: EventDict) -> EventDict:
    """Keep events a monitor asked for, but the agent's level did not, out of stderr."""
    if _level_of(method_name) < _hub.agent_level:
        raise structlog.DropEvent
    return event


#: Characters that make ConsoleRenderer quote a string value (structlog.dev).
_QUOTE_IF = frozenset(" \t=\r\n\"'")
#: ConsoleRenderer's event column width, and its level width (the longest level name).
_EVENT_WIDTH = 30
_LEVEL_WIDTH = len("exception")
_MISSING = object()


class PlainConsoleRenderer:
    """``structlog.dev.ConsoleRenderer(colors=False)``'s lines, character for character,
    at a third of the cost.

    An agent writes a line per member state change, so a burst of 50 joins is 49
    lines on every agent at once.  A log call (the whole processor chain) cost
    about 75 us with ConsoleRenderer's column machinery (a StringIO per column),
    34 with JSON lines, and 25 with this.  Lines
    with a traceback or a stack go to ConsoleRenderer itself, as do loggers named
    in the event (columns this does not lay out).
    """

    _DELEGATE = frozenset({"exc_info", "exception", "stack", "logger", "logger_name"})

    def __init__(self) -> None:
        self._full = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: Any, method_name: str, event: EventDict) -> str:
        if not self._DELEGATE.isdisjoint(event):
            out: str = self._full(logger, method_name, event)
            return out
        parts = []
        ts = event.pop("timestamp", _MISSING)
        if ts is not _MISSING:
            parts.append(str(ts))
        lvl = event.pop("level", _MISSING)
        if lvl is not _MISSING:
            parts.append("[" + str(lvl).ljust(_LEVEL_WIDTH) + "]")
        ev = event.pop("event", _MISSING)
        if ev is not _MISSING:
            parts.append(str(ev).ljust(_EVENT_WIDTH))
        for key in sorted(event):
            val = event[key]
            if type(val) is str:
                parts.append(f"{key}={val!r}" if not _QUOTE_IF.isdisjoint(val) else f"{key}={val}")
            else:
                parts.append(f"{key}={val!r}")
        return " ".join(p for p in parts if p).rstrip(" ")


def configure(fmt: str = "console", level: str = "info") -> None:
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    elif sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = PlainConsoleRenderer()
    _hub.agent_level = _LEVELS[level]
    _hub.update()
    structlog.configure(
        processors=[
            _drop_unwanted,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _fan_out,
            _agent_level_only,
            renderer,
        ],
        # Filtering happens in _drop_unwanted: a monitor may lower the level at run time.
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def level_number(name: str) -> int | None:
    """A level name as a monitor gives it, or None when it is not one we know."""
    return _LEVELS.get(name.lower())


@contextmanager
def subscribe(level: int, buffer: int = MONITOR_BUFFER) -> Iterator[Subscription]:
    """Receive every event at ``level`` or above while the block runs (call from the trio thread)."""
    sub = Subscription(level, buffer)
    _hub.subscribers = (*_hub.subscribers, sub)
    _hub.update()
    try:
        yield sub
    finally:
        _hub.subscribers = tuple(s for s in _hub.subscribers if s is not sub)
        _hub.dropped_closed += sub.dropped
        _hub.update()
        sub.close()


def monitor_stats() -> dict[str, int]:
    """Monitors attached now and every line they lost, for metrics."""
    return {"monitors": len(_hub.subscribers), "monitor_lines_dropped": _hub.dropped,
            "monitor_failures": _hub.failures}


def get(name: str = "mesh") -> Any:
    return structlog.get_logger(name)
