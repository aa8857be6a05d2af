"""agent/lean.py and the tunnel's late cipher: what an agent's process maps, and that it still works.

Real agents on loopback; the shared libraries an agent has mapped are read from
/proc/PID/maps, the kernel's own account of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from test_proxy import echo_server, roundtrip

from simulations.harness import AgentProc, Cluster, free_port, wait_for

#: What an agent never needs until it carries service traffic (the tunnel's cipher), or never at all.
OPENSSL = ("libssl", "libcrypto", "/_ssl.", "/_hashlib.")
ASYNCIO = "/_asyncio."
FAST_CIPHER = "cryptography/hazmat/bindings/_rust"


def mapped(a: AgentProc) -> str:
    return Path(f"/proc/{a.popen.pid}/maps").read_text()


def has_fast_cipher(a: AgentProc) -> bool:
    return FAST_CIPHER in mapped(a)


_LEAN = r"""
import sys
from agent import lean
lean.import_trio()
import trio
assert "ssl" not in sys.modules and "_ssl" not in sys.modules, "trio's import loaded ssl"
assert "_hashlib" not in sys.modules, "hashlib loaded OpenSSL"
assert "idna" not in sys.modules, "trio's import loaded idna"
import hashlib, hmac
assert hashlib.sha256(b"abc").hexdigest() == (
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
assert hmac.new(b"key", b"The quick brown fox jumps over the lazy dog", "sha256").hexdigest() == (
    "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")
assert hmac.compare_digest(b"a", b"a") and not hmac.compare_digest(b"a", b"b")
# trio's own reference to ssl reads through to the real module, which any other importer gets.
bio = trio._ssl._stdlib_ssl.MemoryBIO()
import ssl
assert type(ssl).__name__ == "module" and isinstance(bio, ssl.MemoryBIO)
# The same for idna: a host name that is not ASCII is encoded by the real module, on first use.
assert trio._socket.encode_hostname("bücher.example") == b"xn--bcher-kva.example"
assert trio._socket.encode_hostname("127.0.0.1") == b"127.0.0.1"
import idna
assert type(idna).__name__ == "module" and idna.encode("bücher.example") == b"xn--bcher-kva.example"
print("ok")
"""


def test_trio_imports_without_ssl_idna_or_ldconfig_and_hashlib_without_openssl() -> None:
    r = subprocess.run([sys.executable, "-c", _LEAN], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


_FIND_LIBRARY = r"""
import sys
from agent import lean
with lean.pthread_without_ldconfig():
    import ctypes
    import ctypes.util
    assert ctypes.util.find_library("pthread") == "libpthread.so.0"
    assert "shutil" not in sys.modules
    # Any other question goes to the real module, which stays for every later importer.
    assert ctypes.util.find_library("c") == "libc.so.6"
    assert "shutil" in sys.modules
import ctypes.util as real
assert type(real).__name__ == "module" and real.find_library("pthread") == "libpthread.so.0"
assert ctypes.util is real and sys.modules["ctypes.util"] is real
print("ok")
"""


def test_the_pthread_answer_and_every_other_question_to_ctypes_util() -> None:
    r = subprocess.run([sys.executable, "-c", _FIND_LIBRARY], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


@pytest.mark.slow
def test_openssl_is_mapped_by_the_first_session_and_not_by_services(cluster: Cluster) -> None:
    a = cluster.start("ln-a")
    c = cluster.start("ln-c", join=[a.addr])
    cluster.wait_converged(["ln-a", "ln-c"])
    echo_port = free_port()
    echo = echo_server(echo_port)
    try:
        c.call("PUT", "/v1/services", {"name": "echo", "port": echo_port, "address": "127.0.0.1"})
        a.call("PUT", "/v1/services", {"name": "other", "port": free_port(), "address": "127.0.0.1"})
        wait_for(lambda: len(a.call("GET", "/v1/services/echo?passing")) == 1, 10, "echo visible on ln-a")
        for agent in (a, c):
            maps = mapped(agent)
            assert not [lib for lib in (*OPENSSL, ASYNCIO, FAST_CIPHER) if lib in maps], agent.name
        listen = free_port()
        a.call("PUT", "/v1/upstreams", {"service": "echo", "listen": f"127.0.0.1:{listen}"})
        # The first session's messages go through libsodium until OpenSSL's cipher is loaded, and
        # through OpenSSL after: every byte arrives either way.
        payload = os.urandom(1024 * 1024 + 3)
        assert roundtrip(listen, payload) == payload
        for agent in (a, c):
            wait_for(partial(has_fast_cipher, agent), 10, f"the cipher loaded on {agent.name}")
        assert roundtrip(listen, payload) == payload
        assert not [lib for lib in (*OPENSSL, ASYNCIO) if lib in mapped(a)]
    finally:
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait(5)
