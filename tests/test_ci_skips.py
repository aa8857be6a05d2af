"""In CI (CI=true) a skipped test fails the run, but for what a machine may truly lack (tests/conftest.py)."""

from __future__ import annotations

import pytest
from conftest import _unexpected_skip


def report(outcome: str, reason: str) -> pytest.TestReport:
    return pytest.TestReport("t.py::x", ("t.py", 1, "x"), {}, outcome,  # type: ignore[arg-type]
                             ("t.py", 1, f"Skipped: {reason}") if outcome == "skipped" else None, "setup")


def test_a_skip_in_ci_is_a_failure_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    assert _unexpected_skip(report("skipped", "promtool is not installed")) == "Skipped: promtool is not installed"
    assert _unexpected_skip(report("skipped", "no IPv6 loopback on this machine")) is None
    assert _unexpected_skip(report("passed", "")) is None
    monkeypatch.setenv("CI", "")
    assert _unexpected_skip(report("skipped", "promtool is not installed")) is None  # on a laptop: a skip
