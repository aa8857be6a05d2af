"""The agent's static keys, created once under --data-dir.

* ``tunnel.key`` (X25519): peers learn the public half from gossip and use it
  to open Noise IK sessions to us.
* ``identity.key`` (Ed25519 seed): signs our alive messages, so that no other
  agent -- not even one holding the cluster key -- can claim our name or
  refute on our behalf (gossip.signing).

Both must stay the same across restarts -- hence files, written 0600 and
never logged.  Without --data-dir they live only as long as the process,
which works but makes every restart look like a new identity (and a restarted
agent must then wait until its old self is dead before it may take its name).
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
IDENTITY_FILE = "identity.key"


class IdentityError(Exception):
    """The key file exists but cannot be used; worded as one line."""


def _public(private: bytes) -> bytes:
    pub: bytes = nacl.bindings.crypto_scalarmult_base(private)
    return pub


def load_or_create(data_dir: Path | None) -> tuple[bytes, bytes, list[str]]:
    """(private, public, warnings) for this agent's tunnel identity."""
    private, warnings = load_or_create_secret(data_dir, KEY_FILE, "tunnel key")
    return private, _public(private), warnings


def load_or_create_secret(data_dir: Path | None, file_name: str, what: str) -> tuple[bytes, list[str]]:
    """32 secret bytes kept in ``data_dir/file_name`` (base64, 0600), and warnings."""
    warnings: list[str] = []
    if data_dir is None:
        warnings.append(f"no --data-dir: the {what} is new at every start")
        return nacl.utils.random(32), warnings
    path = data_dir / file_name
    if path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"{path} is readable by others; chmod 600 it")
        try:
            private = base64.b64decode(path.read_text().strip(), validate=True)
        except (OSError, binascii.Error, ValueError) as exc:
            raise IdentityError(f"cannot read {what} {path}: {exc}") from None
        if len(private) != 32:
            raise IdentityError(f"{what} {path} is not 32 bytes of base64")
        return private, warnings
    private = nacl.utils.random(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(base64.b64encode(private).decode() + "\n")
    except OSError as exc:
        raise IdentityError(f"cannot write {what} {path}: {exc.strerror}") from None
    return private, warnings
