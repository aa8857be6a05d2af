"""What the agent's dependencies import and the agent never uses, kept out of its process.

An agent runs on every node and is restarted on every rollout, so what its
process imports for nothing is paid in start-up CPU and in memory many times
over (docs/footprint.md).  Four such imports are worth refusing:

- structlog imports asyncio, for async logging methods this agent never calls
  (it runs on trio);
- trio imports ssl, for TLS streams the agent never opens (its tunnels are
  Noise over TCP), and ssl loads and initialises OpenSSL's libssl and
  libcrypto;
- trio imports the ``idna`` package (and its tables) to encode host names
  that are not ASCII, which the agent never resolves: its addresses are IP
  literals or plain host names;
- hashlib imports OpenSSL's ``_hashlib`` for its constructors, which maps and
  initialises libcrypto again.  The agent hashes with BLAKE2b, which is always
  CPython's own implementation, and with SHA-256 over a few hundred bytes at a
  time, where CPython's builtin serves as well; without ``_hashlib`` hashlib
  uses the builtins for every algorithm, and libcrypto is never mapped.

The first three are imported through a stand-in (:class:`OnDemand`) that holds
their place in ``sys.modules`` only while the dependency itself is imported:
the dependency's references to it import the real module on first use, and
any other importer gets the real module.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class OnDemand(types.ModuleType):
    """What an importer gets for a module while it stands in: the real module, imported on first use.

    ``import name`` reads nothing from the module it finds in ``sys.modules``
    but ``__spec__``, which every module object has, so it does not load the
    real one; the first other attribute read does, and reads through to it from
    then on.  ``importlib.util.LazyLoader`` cannot be used instead: on Python
    3.11 the import statement's read of ``__spec__`` loads a lazy module at once.
    """

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:  # used while the dependency is still being imported
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(vars(real))
        return getattr(real, attr)


@contextmanager
def standing_in(*names: str) -> Iterator[None]:
    """While the block runs, ``import name`` gives a stand-in for each of ``names`` not yet imported."""
    placed: dict[str, OnDemand] = {}
    for name in names:
        if name not in sys.modules:
            placed[name] = sys.modules[name] = OnDemand(name)
    try:
        yield
    finally:
        for name, stand_in in placed.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


def hashlib_without_openssl() -> None:
    """Import hashlib and hmac on CPython's own hash functions, before anything else imports them.

    A no-op once either is imported (hashlib chooses its constructors once, at import).
    """
    if "hashlib" in sys.modules or "hmac" in sys.modules or "_hashlib" in sys.modules:
        return
    sys.modules["_hashlib"] = None  # type: ignore[assignment]  # how sys.modules says "no such module"
    try:
        import hashlib  # noqa: F401
        import hmac  # noqa: F401
    finally:
        del sys.modules["_hashlib"]


def import_trio() -> None:
    """Import trio without ssl and idna, and hashlib and hmac (which trio imports) without OpenSSL."""
    hashlib_without_openssl()
    with standing_in("ssl", "idna"):
        import trio  # noqa: F401
