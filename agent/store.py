"""The small JSON files under --data-dir that keep what users registered at run time.

Services, upstreams and intentions all keep their API-made records the same
way, so they share this: a file is read leniently at start (a damaged one is
logged and ignored, never fatal: the agent must still come up), and written
whole through a temporary file and a rename, so a crash mid-write leaves the
previous version intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: Path | None, log: Any, event: str) -> Any:
    """The file's JSON, or None when there is no file or it cannot be read."""
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.error(event, path=str(path), error=str(exc))
        return None


def read_records(path: Path | None, log: Any, event: str) -> list[dict[str, Any]]:
    """A file holding a JSON list of objects; anything else counts as empty."""
    data = read_json(path, log, event)
    if data is None:
        return []
    if not isinstance(data, list):
        log.error(event, path=str(path), error="unexpected shape")
        return []
    return [r for r in data if isinstance(r, dict)]


def write_json(path: Path, body: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))  # compact: indent= makes json use its slow pure-Python encoder
    os.replace(tmp, path)
