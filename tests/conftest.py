from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
