"""agent.log's plain console renderer writes exactly what structlog's ConsoleRenderer(colors=False) writes."""

from __future__ import annotations

import string
from typing import Any

import structlog
from hypothesis import given
from hypothesis import strategies as st

from agent.log import PlainConsoleRenderer

_values = st.one_of(
    st.text(alphabet=string.printable + "é→", max_size=20),
    st.integers(), st.floats(allow_nan=False), st.none(), st.booleans(),
    st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_keys = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12).filter(
    lambda k: k not in PlainConsoleRenderer._DELEGATE)


def _both(event: dict[str, Any]) -> tuple[str, str]:
    ours = PlainConsoleRenderer()(None, "info", dict(event))
    theirs = structlog.dev.ConsoleRenderer(colors=False)(None, "info", dict(event))
    return ours, theirs


@given(st.dictionaries(_keys, _values, max_size=8),
       st.sampled_from(["debug", "info", "warning", "error", "critical"]),
       st.text(max_size=40), st.booleans())
def test_lines_match_consolerenderer(fields: dict[str, Any], level: str, event: str, with_ts: bool) -> None:
    ev: dict[str, Any] = {**fields, "level": level, "event": event}
    if with_ts:
        ev["timestamp"] = "2026-11-26T13:56:43.167745Z"
    ours, theirs = _both(ev)
    assert ours == theirs


def test_a_member_line_as_the_agent_writes_it() -> None:
    ours, theirs = _both({"timestamp": "2026-11-26T13:56:43.167745Z", "level": "info", "event": "member_left",
                          "addr": "127.0.0.1:21051", "incarnation": 1, "name": "a17", "node": "a3",
                          "previous": "alive", "reason": "left gracefully", "status": "left"})
    assert ours == theirs == (
        "2026-11-26T13:56:43.167745Z [info     ] member_left                    addr=127.0.0.1:21051 "
        "incarnation=1 name=a17 node=a3 previous=alive reason='left gracefully' status=left")


def test_tracebacks_are_left_to_consolerenderer() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        ours, theirs = _both({"level": "error", "event": "api_handler_failed", "exc_info": exc})
    assert "ValueError: boom" in ours
    assert ours == theirs
