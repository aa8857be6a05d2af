"""agent.log's plain console renderer writes exactly what structlog's ConsoleRenderer(colors=False) writes."""

from __future__ import annotations

import string
import subprocess
import sys
from pathlib import Path
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


_STAND_IN = r"""
import sys
import agent.log
import structlog
assert "asyncio" not in sys.modules, "structlog's import loaded asyncio"
import structlog._native
stand_in = vars(structlog._native)["asyncio"]
# Another importer gets the real module, and structlog's reference reads through to it.
import asyncio
assert type(asyncio).__name__ == "module" and stand_in.get_running_loop is asyncio.get_running_loop
lines = []
structlog.configure(processors=[lambda _l, _m, ev: lines.append(ev["event"]) or ev["event"]],
                    logger_factory=structlog.ReturnLoggerFactory(),
                    wrapper_class=structlog.make_filtering_bound_logger(0))
asyncio.run(structlog.get_logger().ainfo("async methods still log"))  # run_in_executor, through the stand-in
assert lines == ["async methods still log"], lines
print("ok")
"""


def test_structlog_is_imported_without_asyncio_which_loads_on_first_use() -> None:
    """agent.log keeps structlog's unconditional ``import asyncio`` from costing an agent at start."""
    r = subprocess.run([sys.executable, "-c", _STAND_IN], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
