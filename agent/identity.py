"""The agent's static keys, created once under --data-dir.

* ``tunnel.key`` (X25519): peers learn the public half from gossip and use it
  to open Noise IK sessions to us.
* ``identity.key`` (Ed25519 seed): signs our alive messages, so that no other
  agent -- not even one holding the cluster key -- can claim our name or
  refute on our behalf (gossip.signing).

Both must stay the same across restarts -- hence files, written 0600 and
never logged.  Without --data-dir they are kept in a default place of their
own (``default_dir``): one per agent name and gossip bind address, under the
user's state directory, locked while an agent uses it, so that two agents
never share an identity and a restart keeps it.  Only the identity lives
there: run-time registrations and the keyring still need --data-dir, so the
default place never holds a key that could override an explicit --key.
Where it cannot be used (no writable home, or another agent holds it), the
keys are new at every start; the mesh still takes a restarted agent's new key
once its address answers with it (gossip.state: StateRules.replaced_at_address).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import re
import stat
from pathlib import Path

import nacl.bindings
import nacl.utils

KEY_FILE = "tunnel.key"
IDENTITY_FILE = "identity.key"


class IdentityError(Exception):
    """The key file exists but cannot be used; worded as one line."""


LOCK_FILE = "lock"


def default_dir(name: str, bind: tuple[str, int], environ: dict[str, str] | None = None) -> Path | None:
    """Where an agent without --data-dir keeps its identity: $XDG_STATE_HOME (or ~/.local/state)/mesh-agent/."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or (str(Path(env["HOME"]) / ".local" / "state") if env.get("HOME") else "")
    if not base:
        return None
    host = re.sub(r"[^A-Za-z0-9.-]", "_", bind[0])
    return Path(base) / "mesh-agent" / "identity" / f"{name}@{host}_{bind[1]}"


class DirInUse(IdentityError):
    """Another running agent holds the directory's lock."""


def claim_dir(path: Path) -> int:
    """Create and lock ``path`` for this process; the lock's descriptor.

    The lock lasts as long as the process (the descriptor is kept open, and
    the kernel drops the lock when the process ends, however it ends).
    DirInUse when another agent holds it; IdentityError when it cannot be used.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise IdentityError(f"cannot use {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DirInUse(f"{path} is in use by another agent of the same name and address") from None
    return fd


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
