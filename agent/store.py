"""The small JSON files under --data-dir that keep what users registered at run time.

Services, upstreams and intentions all keep their API-made records the same
way, so they share this: a file is read leniently at start (a damaged one is
logged and ignored, never fatal: the agent must still come up), and written
whole through a temporary file and a rename, so a crash mid-write leaves the
previous version intact.

A write that fails (a full disk, a read-only remount, a lost permission)
must not leave a change live that a restart would forget: every writer here
saves *before* it applies, or rolls back, and the failure reaches the caller
as one line (``StoreError``), is counted per file (``Saver``), and is shown by
``mesh-agent info`` and ``/metrics`` until a later write succeeds.
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


class StoreError(Exception):
    """A file under --data-dir could not be written; the message names the file and the cause."""


def write_json(path: Path, body: Any, mode: int = 0o600) -> None:
    """Write ``body`` whole, through a temporary file fsynced and renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    data = json.dumps(body).encode()  # compact: indent= makes json use its slow pure-Python encoder
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # a full disk shows here, not after the rename
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise StoreError(f"cannot save {path}: {exc.strerror or exc}; nothing was changed") from None


class Saver:
    """One file's writer: counts failures and keeps the last one, for info and metrics."""

    def __init__(self, path: Path | None, log: Any) -> None:
        self.path = path
        self.log = log
        self.failures = 0
        #: The last failure's message, until a write succeeds.
        self.error: str | None = None

    def save(self, body: Any) -> None:
        """Write ``body`` (nothing without a data dir); StoreError when it cannot be written."""
        if self.path is None:
            return
        try:
            write_json(self.path, body)
        except StoreError as exc:
            self.failures += 1
            self.error = str(exc)
            self.log.error("store_write_failed", path=str(self.path), detail=str(exc))
            raise
        self.error = None

    def view(self) -> dict[str, Any]:
        return {"failures": self.failures, "error": self.error}
