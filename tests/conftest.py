from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Property tests run beside real agents on a 2-core machine: a slow example is the machine's load,
# not the code's, so no test fails for taking long (each @settings still sets its own examples).
settings.register_profile("mesh", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mesh")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import Lab, skip_reason  # noqa: E402

from gossip.keyring import generate_key  # noqa: E402
from simulations.harness import Cluster, Processes  # noqa: E402


@pytest.fixture
def cluster_key() -> str:
    return generate_key()


@pytest.fixture
def procs() -> Iterator[Processes]:
    """Servers, relays and the like a test starts; all killed when it ends, whatever failed."""
    ps = Processes()
    try:
        yield ps
    finally:
        ps.close()


@pytest.fixture
def cluster(tmp_path: Path, cluster_key: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, cluster_key)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Hosts in network namespaces on one bridge (tests/netns.py); skipped where that cannot run."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab(tmp_path, generate_key())
    try:
        yield lab
    finally:
        lab.close()


# -- CI refuses silent skips ---------------------------------------------------------------------

#: Skips allowed in CI: what the machine may truly lack without the project being at fault.
#: Any other skip there means a tool .ci/run should have installed, and fails the run.
CI_ALLOWED_SKIPS = ("no IPv6",)


def _unexpected_skip(report: pytest.CollectReport | pytest.TestReport) -> str | None:
    if os.environ.get("CI") != "true" or not report.skipped:
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if "xfail" in getattr(report, "keywords", {}) or any(a in reason for a in CI_ALLOWED_SKIPS):
        return None
    return reason


def _fail_unexpected_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    reason = _unexpected_skip(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where it must run: {reason} (tests/conftest.py CI_ALLOWED_SKIPS)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())
