"""An agent whose data plane, or the tunnel's fast cipher, cannot load: it stays up and says why.

A broken install is made for real: a copy of our code with one data-plane module
that refuses to import, or a ``cryptography`` package that is missing its cipher
or refuses it as OpenSSL does in FIPS mode, first on the agent's import path.
Real agents on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_dns import dig, status
from test_proxy import echo_server, roundtrip

from simulations.harness import ROOT, AgentProc, Cluster, free_port, wait_for

BROKEN = "simulated broken install: dataplane/relay.py"


def broken_plane(tmp_path: Path) -> Path:
    """A copy of our code whose data plane cannot import (one module raises, as a bad deploy would)."""
    root = tmp_path / "broken-release"
    for pkg in ("agent", "gossip", "dataplane", "cli"):
        shutil.copytree(ROOT / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    relay = root / "dataplane" / "relay.py"
    relay.write_text(f"raise ImportError({BROKEN!r})\n")
    return root


def status_of(a: AgentProc, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{a.api}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_data_plane_that_cannot_load_fails_each_request_with_its_cause(cluster: Cluster,
                                                                         tmp_path: Path) -> None:
    root = broken_plane(tmp_path)
    dns_port = free_port()
    a = cluster.start("pf-a", root=root, extra=["--dns", f"127.0.0.1:{dns_port}"])
    service = {"name": "web", "port": free_port(), "address": "127.0.0.1"}
    code, body = status_of(a, "PUT", "/v1/services", service)
    assert code == 503, body
    assert "the data plane could not start" in body["error"] and BROKEN in body["error"], body
    # Nothing half done: the instance was not registered, so no peer will route to it.
    assert a.call("GET", "/v1/services") == {} or "web" not in a.call("GET", "/v1/services")
    # Every later caller gets the same answer at once, where it used to wait for ever.
    for method, path, req in (("PUT", "/v1/services", service),
                              ("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{free_port()}"})):
        code, body = status_of(a, method, path, req)
        assert code == 503 and BROKEN in body["error"], (path, body)
    # A peer dialling the tunnel port sees its connection closed; the agent runs on.
    tunnel = a.members()["pf-a"]["tunnel"]
    host, port = tunnel.rsplit(":", 1)
    for _ in range(5):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.settimeout(10)
            s.sendall(os.urandom(64))
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:
                pass
    assert a.running() and a.call("GET", "/v1/health")["ok"]
    # Said once per attempt, not once per caller: retries wait PLANE_RETRY_AFTER.
    failures = [line for line in a.log().splitlines() if '"data_plane_failed"' in line]
    assert 1 <= len(failures) <= 2 and BROKEN in failures[0], failures
    # Gossip is untouched: a peer joins and both see each other.
    b = cluster.start("pf-b", join=[a.addr])
    cluster.wait_converged(["pf-a", "pf-b"])
    assert a.running() and b.running()
    # A virtual name needs an upstream, so the data plane: the answer is SERVFAIL, with the cause logged.
    b.call("PUT", "/v1/services", {"name": "db", "port": free_port(), "address": "127.0.0.1"})
    wait_for(lambda: len(a.call("GET", "/v1/services/db")) == 1, 10, "db visible on pf-a")
    assert status(dig(dns_port, "db.virtual.mesh")) == "SERVFAIL"
    virtual = [line for line in a.log().splitlines() if '"virtual_upstream_failed"' in line]
    assert virtual and BROKEN in virtual[0], virtual
    # The install repaired, a call after PLANE_RETRY_AFTER builds the data plane, and the service is served.
    shutil.copy(ROOT / "dataplane" / "relay.py", root / "dataplane" / "relay.py")
    wait_for(lambda: status_of(a, "PUT", "/v1/services", service)[0] == 200, 20, "the data plane built at last")
    wait_for(lambda: len(b.call("GET", "/v1/services/web")) == 1, 10, "web visible on pf-b")


def test_a_service_configured_at_start_with_no_data_plane_stops_the_start_with_the_cause(
        cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[[service]]\nname = "web"\nport = {free_port()}\naddress = "127.0.0.1"\n')
    a = cluster.start("pf-c", root=broken_plane(tmp_path), extra=["--config", str(cfg)], wait=False)
    assert a.popen.wait(30) == 1
    lines = a.log().strip().splitlines()
    assert "the data plane could not start" in lines[-1] and BROKEN in lines[-1], lines[-5:]
    assert "Traceback" not in a.log(), a.log()


def packages(site: Path, files: dict[str, str]) -> Path:
    """``site`` holding ``files`` (path -> text): packages to put first on an import path."""
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    return site


#: cryptography as a broken install leaves it: the package is there, its cipher module is not.
_MISSING = {"cryptography/__init__.py": "",
            "cryptography/exceptions.py": "class InvalidTag(Exception):\n    pass\n",
            "cryptography/hazmat/__init__.py": "",
            "cryptography/hazmat/primitives/__init__.py": "",
            "cryptography/hazmat/primitives/ciphers/__init__.py": "",
            "cryptography/hazmat/primitives/ciphers/aead.py":
                "raise ImportError('simulated: no ChaCha20Poly1305 in this cryptography')\n"}
#: cryptography over an OpenSSL in FIPS mode: the cipher imports, and refuses to be keyed.
_FIPS = dict(_MISSING, **{
    "cryptography/exceptions.py": "class InvalidTag(Exception):\n    pass\n\n"
                                  "class UnsupportedAlgorithm(Exception):\n    pass\n",
    "cryptography/hazmat/primitives/ciphers/aead.py":
        "from cryptography.exceptions import UnsupportedAlgorithm\n\n"
        "class ChaCha20Poly1305:\n"
        "    def __init__(self, key):\n"
        "        raise UnsupportedAlgorithm('ChaCha20Poly1305 is not supported by this version of OpenSSL')\n"})


@pytest.mark.parametrize(("files", "cause"), [
    (_MISSING, "no ChaCha20Poly1305 in this cryptography"),
    (_FIPS, "ChaCha20Poly1305 is not supported by this version of OpenSSL"),
], ids=["cipher-missing", "fips-openssl"])
def test_without_openssls_cipher_tunnels_seal_with_libsodium_and_say_so(
        cluster: Cluster, tmp_path: Path, files: dict[str, str], cause: str) -> None:
    fake = packages(tmp_path / "site", files)
    a = cluster.start("fc-a", pythonpath=[fake])
    c = cluster.start("fc-c", join=[a.addr], pythonpath=[fake])
    cluster.wait_converged(["fc-a", "fc-c"])
    echo_port = free_port()
    echo = echo_server(echo_port)
    try:
        c.call("PUT", "/v1/services", {"name": "echo", "port": echo_port, "address": "127.0.0.1"})
        wait_for(lambda: len(a.call("GET", "/v1/services/echo?passing")) == 1, 10, "echo visible on fc-a")
        listen = free_port()
        a.call("PUT", "/v1/upstreams", {"service": "echo", "listen": f"127.0.0.1:{listen}"})
        payload = os.urandom(1024 * 1024 + 3)
        assert roundtrip(listen, payload) == payload
        for agent in (a, c):  # both ends tried OpenSSL's cipher with their first session, and said why not
            wait_for(lambda agent=agent: '"fast_cipher_unavailable"' in agent.log(), 10,  # type: ignore[misc]
                     f"{agent.name} says why it seals with libsodium")
            line = next(x for x in agent.log().splitlines() if '"fast_cipher_unavailable"' in x)
            assert cause in line, line
        assert roundtrip(listen, payload) == payload  # and keeps carrying every byte
        assert a.running() and c.running()
    finally:
        os.killpg(echo.pid, signal.SIGKILL)
        echo.wait(5)


def test_load_fast_cipher_takes_openssls_only_once_it_seals_as_libsodium_does(tmp_path: Path) -> None:
    """In a fresh interpreter: a cipher that seals differently is refused and libsodium's kept."""
    wrong = dict(_MISSING, **{"cryptography/hazmat/primitives/ciphers/aead.py":
                              "class ChaCha20Poly1305:\n"
                              "    def __init__(self, key):\n        pass\n"
                              "    def encrypt(self, nonce, data, ad):\n        return bytes(len(data) + 16)\n"})
    fake = packages(tmp_path / "site", wrong)
    prog = ("from dataplane import noise\n"
            "try:\n    noise.load_fast_cipher()\nexcept noise.NoiseError as e:\n    print('refused:', e)\n"
            "assert noise._Fast is None\n"
            "k = bytes(32)\n"
            "a, b = noise.CipherState(k), noise.CipherState(k)\n"
            "assert b.decrypt_with_ad(b'', a.encrypt_with_ad(b'', b'hello')) == b'hello'\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}"))
    assert r.returncode == 0, r.stderr
    assert "refused: OpenSSL's ChaCha20-Poly1305 does not seal as libsodium's does" in r.stdout, r.stdout
