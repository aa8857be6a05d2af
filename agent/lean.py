"""What the agent's dependencies import and the agent never uses, kept out of its process.

An agent runs on every node and is restarted on every rollout, so what its
process imports for nothing is paid in start-up CPU and in memory many times
over (docs/footprint.md).  Five such imports are worth refusing:

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
  uses the builtins for every algorithm, and libcrypto is never mapped;
- trio's thread cache asks ``ctypes.util.find_library("pthread")`` once, at
  import, for the library that names its worker threads.  On Linux that
  module imports shutil, tempfile, bz2 and lzma and runs ``ldconfig -p`` in a
  child process to answer; on glibc the answer is always the soname
  ``libpthread.so.0`` (:func:`glibc_pthread`), so trio is given it directly.

The first three are imported through a stand-in (:class:`OnDemand`) that holds
their place in ``sys.modules`` only while the dependency itself is imported:
the dependency's references to it import the real module on first use, and
any other importer gets the real module.
"""

from __future__ import annotations

import importlib
import os
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


#: The soname glibc gives its threads library (in libc itself since 2.34, kept as a stub).
GLIBC_PTHREAD = "libpthread.so.0"


def glibc_pthread() -> str | None:
    """``libpthread.so.0`` where the C library is glibc, else None (musl, say, has no such library)."""
    try:
        return GLIBC_PTHREAD if os.confstr("CS_GNU_LIBC_VERSION") else None
    except (ValueError, OSError):  # a C library without the name: not glibc
        return None


class _FindPthread(OnDemand):
    """``ctypes.util`` for trio's import on glibc: the pthread question answered without ldconfig.

    Any other question, or any other attribute, goes to the real module.
    """

    def find_library(self, name: str) -> str | None:
        if name == "pthread":
            return glibc_pthread()
        find: Any = self.__getattr__("find_library")
        return find(name)  # type: ignore[no-any-return]


@contextmanager
def pthread_without_ldconfig() -> Iterator[None]:
    """While the block runs, ``ctypes.util`` is :class:`_FindPthread`, on glibc and unless already imported."""
    if "ctypes.util" in sys.modules or glibc_pthread() is None:
        yield
        return
    import ctypes

    stand_in = _FindPthread("ctypes.util")
    sys.modules["ctypes.util"] = ctypes.util = stand_in  # the import system sets the attribute only on a load
    try:
        yield
    finally:
        if sys.modules.get("ctypes.util") is stand_in:
            del sys.modules["ctypes.util"]
        if getattr(ctypes, "util", None) is stand_in:
            del ctypes.util


def import_trio() -> None:
    """Import trio without ssl and idna, and hashlib and hmac (which trio imports) without OpenSSL.

    On glibc, trio finds the library that names its threads without running ldconfig.
    """
    hashlib_without_openssl()
    with standing_in("ssl", "idna"), pthread_without_ldconfig():
        import trio  # noqa: F401
