"""The agent's static tunnel key: X25519, created once under --data-dir.

Peers learn the public half from gossip and use it to open Noise IK sessions
to us, so it must stay the same across restarts -- hence a file, written
0600 and never logged.  Without --data-dir the key lives only as long as the
process, which works but makes every restart look like a new identity.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

import nacl.bindings
import nacl.utils

KEY_FILE = "tunnel.key"


class IdentityError(Exception):
    """The key file exists but cannot be used; worded as one line."""


def _public(private: bytes) -> bytes:
    pub: bytes = nacl.bindings.crypto_scalarmult_base(private)
    return pub


def load_or_create(data_dir: Path | None) -> tuple[bytes, bytes, list[str]]:
    """(private, public, warnings) for this agent's tunnel identity."""
    warnings: list[str] = []
    if data_dir is None:
        private = nacl.utils.random(32)
        warnings.append("no --data-dir: the tunnel key is new at every start")
        return private, _public(private), warnings
    path = data_dir / KEY_FILE
    if path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"{path} is readable by others; chmod 600 it")
        try:
            private = base64.b64decode(path.read_text().strip(), validate=True)
        except (OSError, binascii.Error, ValueError) as exc:
            raise IdentityError(f"cannot read tunnel key {path}: {exc}") from None
        if len(private) != 32:
            raise IdentityError(f"tunnel key {path} is not 32 bytes of base64")
        return private, _public(private), warnings
    private = nacl.utils.random(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(private).decode() + "\n")
    except OSError as exc:
        raise IdentityError(f"cannot write tunnel key {path}: {exc.strerror}") from None
    return private, _public(private), warnings
