from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import Lab, skip_reason  # noqa: E402
from procs import Cluster  # noqa: E402

from gossip.keyring import generate_key  # noqa: E402


@pytest.fixture
def cluster_key() -> str:
    return generate_key()


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
