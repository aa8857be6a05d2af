"""The local API under attack, on real agent processes (README, "Security").

Every attack is sent as raw HTTP, the way a browser or another local user
would send it, and must be refused with 401/403/415 and change nothing: the
agent's state is read back through the authorized API before and after.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gossip.keyring import generate_key
from simulations.harness import ROOT, AgentProc, Cluster, free_port, wait_for

NOBODY = 65534
TOKEN = "operator-token-" + "7" * 24

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="acting as another local user needs root")


def raw(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
        uid: int | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One request on a fresh connection, its socket made as ``uid``: (status, parsed JSON body or text)."""
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close"}
    hdrs.update(headers or {})
    if body:
        hdrs["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items() if v) + "\r\n"
    if uid is not None:
        os.seteuid(uid)  # the socket's owner is fixed when it is created
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    finally:
        os.seteuid(0)
    with s:
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    try:
        parsed: Any = json.loads(payload)
    except ValueError:
        parsed = payload.decode(errors="replace")
    return int(status_line.split()[1]), parsed


@pytest.fixture
def target(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[AgentProc, AgentProc, Path]]:
    """Two agents; the first holds a service, an upstream and an intention, and an API token."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    data = tmp_path / "data-a"
    a = cluster.start("sec-a", extra=["--data-dir", str(data), "--api-token-file", str(token_file)])
    b = cluster.start("sec-b", join=[a.addr])
    cluster.wait_converged(["sec-a", "sec-b"])
    a.call("PUT", "/v1/services", {"name": "web", "port": 8080, "id": "web-1"})
    a.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{free_port()}"})
    a.call("PUT", "/v1/intentions", {"source": "a0", "destination": "b0", "action": "deny"})
    yield a, b, data


def state(a: AgentProc, data: Path) -> dict[str, Any]:
    """Everything an attack could change, read through the authorized API and from the data dir."""
    def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k in ("service", "listen", "public", "id", "name", "port", "health",
                                                      "source", "destination", "action", "tags", "meta")}
                for r in rows]

    keys = a.call("GET", "/v1/keys", timeout=15)
    return {
        "members": sorted((m["name"], m["status"]) for m in a.call("GET", "/v1/members")),
        "services": strip(a.call("GET", "/v1/services/web")) + strip(a.call("GET", "/v1/services/x")),
        "upstreams": strip(a.call("GET", "/v1/upstreams")),
        "intentions": a.call("GET", "/v1/intentions"),
        "keys": (sorted(keys["keys"]), keys["primary"]),
        "status": a.call("GET", "/v1/agent/self")["status"],
        "files": {p.name: p.read_bytes() for p in sorted(data.iterdir()) if p.is_file()},
    }


Attack = tuple[str, str, str, dict[str, str], bytes, int | None]


def attack_matrix(port: int, marker: Path, new_key: str) -> list[Attack]:
    """(name, method, path, headers, body, uid) for every state-changing route under every attack."""
    evil_check = {"name": "x", "port": 1, "check": {"type": "exec", "target": f"touch {marker}", "interval": "1s"}}
    routes: list[tuple[str, str, Any]] = [
        ("POST", "/v1/join", {"addresses": ["127.0.0.1:1"]}),
        ("POST", "/v1/leave", None),
        ("PUT", "/v1/services", evil_check),
        ("DELETE", "/v1/services/web-1", None),
        ("PUT", "/v1/upstreams", {"service": "x", "listen": f"0.0.0.0:{free_port()}", "public": True}),
        ("DELETE", "/v1/upstreams/web", None),
        ("PUT", "/v1/intentions", {"source": "a", "destination": "b", "action": "deny"}),
        ("DELETE", "/v1/intentions/a0/b0", None),
        ("POST", "/v1/keys", {"op": "install", "key": new_key}),
        ("GET", "/v1/keys", None),  # a query to the whole mesh
    ]
    json_type = {"Content-Type": "application/json"}
    variants: list[tuple[str, dict[str, str], int | None, bool]] = [
        # (name, headers, uid, only for routes with a body)
        ("cross-origin text/plain", {"Origin": "http://evil.example", "Content-Type": "text/plain"}, None, False),
        ("cross-origin form", {"Origin": f"http://127.0.0.1:{port + 1}",
                               "Content-Type": "application/x-www-form-urlencoded"}, None, False),
        ("cross-origin multipart", {"Origin": "http://localhost:8000",
                                    "Content-Type": "multipart/form-data; boundary=x"}, None, False),
        ("opaque origin", {"Origin": "null", **json_type}, None, False),
        ("fetch metadata cross-site", {"Sec-Fetch-Site": "cross-site", **json_type}, None, False),
        ("dns rebinding", {"Host": f"evil.example:{port}", **json_type}, None, False),
        ("dns rebinding, own origin", {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
                                       **json_type}, None, False),
        ("other local user", json_type, NOBODY, False),
        ("other user, wrong token", {"Authorization": "Bearer wrong-token-0123456789", **json_type}, NOBODY, False),
        ("other user, basic auth", {"Authorization": f"Basic {TOKEN}", **json_type}, NOBODY, False),
        ("operator, wrong token", {"Authorization": "Bearer wrong-token-0123456789", **json_type}, None, False),
        ("operator, text/plain body", {"Content-Type": "text/plain"}, None, True),
        ("operator, form body", {"Content-Type": "application/x-www-form-urlencoded"}, None, True),
        ("operator, no content type", {}, None, True),
    ]
    out = []
    for method, path, body in routes:
        payload = b"" if body is None else json.dumps(body).encode()
        for name, headers, uid, needs_body in variants:
            if needs_body and not payload:
                continue
            out.append((f"{name}: {method} {path}", method, path, headers, payload, uid))
    return out


def test_every_attack_is_refused_and_changes_nothing(target: tuple[AgentProc, AgentProc, Path],
                                                     tmp_path: Path) -> None:
    a, b, data = target
    marker = tmp_path / "owned"
    before = state(a, data)
    refused_before = a.info()["counters"]["api_refused_total"]
    matrix = attack_matrix(a.api_port, marker, generate_key())
    wrong = []
    for name, method, path, headers, body, uid in matrix:
        status, answer = raw(a.api_port, method, path, headers, body, uid)
        if status not in (401, 403, 415) or not (isinstance(answer, dict) and answer.get("error")):
            wrong.append(f"{name} -> {status} {answer}")
    assert not wrong, "accepted or badly refused:\n" + "\n".join(wrong)
    time.sleep(1.5)  # an exec check would have run by now; a leave would have spread
    assert not marker.exists()
    assert a.running() and state(a, data) == before
    assert b.members()["sec-a"]["status"] == "alive"
    counters = a.info()["counters"]
    assert counters["api_refused_total"] - refused_before == len(matrix)
    assert all(counters["api_refused"][r] > 0 for r in ("host", "origin", "credential", "token", "content_type"))
    metrics = raw(a.api_port, "GET", "/metrics")[1]
    assert 'mesh_api_refused_total{reason="origin"}' in metrics
    assert '"event": "api_refused"' in a.log()
    print(f"attack matrix: {len(matrix)} requests, all refused")


def test_without_the_credential_nothing_is_readable_but_health(target: tuple[AgentProc, AgentProc, Path],
                                                               cluster_key: str) -> None:
    a, _, _ = target
    gets = ["/v1/members", "/v1/agent/self", "/v1/services", "/v1/services/web", "/v1/upstreams", "/v1/intentions",
            "/v1/routes", "/v1/tunnels", "/v1/coordinate", "/v1/rtt?to=sec-b", "/v1/keys", "/metrics", "/",
            "/v1/agent/monitor", "/v1/nope"]
    for path in gets:
        status, answer = raw(a.api_port, "GET", path, uid=NOBODY)
        assert status == 401 and "token" in answer["error"], (path, status, answer)
        assert cluster_key not in json.dumps(answer)
        status, _ = raw(a.api_port, "GET", path, {"Host": f"rebound.example:{a.api_port}"})
        assert status == 403, path
    assert raw(a.api_port, "GET", "/v1/health", uid=NOBODY) == (200, {"ok": True, "name": "sec-a",
                                                                      "status": "alive"})
    # With the token, another user reads; even the operator's reads carry no secret but the keyring's own route.
    status, members = raw(a.api_port, "GET", "/v1/members", {"Authorization": f"Bearer {TOKEN}"}, uid=NOBODY)
    assert status == 200 and {m["name"] for m in members} == {"sec-a", "sec-b"}
    for path in [g for g in gets if g not in ("/v1/keys", "/v1/agent/monitor")]:
        status, answer = raw(a.api_port, "GET", path)
        text = answer if isinstance(answer, str) else json.dumps(answer)
        assert cluster_key not in text and TOKEN not in text, path
    assert TOKEN not in a.log() and cluster_key not in a.log()


def test_the_operator_still_acts_and_every_change_is_audited(target: tuple[AgentProc, AgentProc, Path]) -> None:
    a, _, _ = target
    json_type = {"Content-Type": "application/json"}
    body = json.dumps({"name": "api", "port": 9090, "id": "api-1"}).encode()
    # The agent's own user (here root) with nothing else; another user with the token; the dashboard's origin.
    assert raw(a.api_port, "PUT", "/v1/services", json_type, body)[0] == 200
    assert raw(a.api_port, "DELETE", "/v1/services/api-1", {"Authorization": f"Bearer {TOKEN}"}, uid=NOBODY)[0] == 200
    own = {"Origin": f"http://127.0.0.1:{a.api_port}", "Sec-Fetch-Site": "same-origin", **json_type}
    key = generate_key()
    status, answer = raw(a.api_port, "POST", "/v1/keys", own, json.dumps({"op": "install", "key": key}).encode())
    assert status == 200 and answer["ok"], answer
    lines = [json.loads(ln) for ln in a.log().splitlines() if '"api_change"' in ln]
    seen = [(ln["method"], ln["route"], ln["by"]) for ln in lines]
    assert ("PUT", "/v1/services", "uid:0") in seen
    assert ("DELETE", "/v1/services/api-1", "token") in seen
    assert ("POST", "/v1/keys", "uid:0") in seen
    keys_line = next(ln for ln in lines if ln["route"] == "/v1/keys")
    assert keys_line["change"] == {"op": "install", "key": "<redacted>"} and key not in a.log()


def test_exec_checks_need_the_setting_over_the_api_but_not_in_the_config_file(cluster: Cluster,
                                                                              tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    conf = tmp_path / "a.toml"
    conf.write_text(f'[[service]]\nname = "local"\nport = 1\n[service.check]\ntype = "exec"\n'
                    f'target = "touch {marker}-config"\ninterval = "200ms"\n')
    a = cluster.start("exec-a", extra=["--config", str(conf)])
    check = {"type": "exec", "target": f"touch {marker}", "interval": "200ms"}
    status, answer = raw(a.api_port, "PUT", "/v1/services", {"Content-Type": "application/json"},
                         json.dumps({"name": "x", "port": 1, "check": check}).encode())
    assert status == 403 and "--enable-script-checks" in answer["error"]
    assert a.info()["counters"]["api_refused"]["script_checks"] == 1
    p = subprocess.run([sys.executable, "-m", "cli.main", "services", "register", "--api", a.api, "--name", "x",
                        "--port", "1", "--check-exec", f"touch {marker}"], capture_output=True, text=True,
                       cwd=ROOT, timeout=30)
    assert p.returncode == 1 and "--enable-script-checks" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    wait_for(lambda: Path(f"{marker}-config").exists(), 10, "the config file's exec check ran")
    assert not marker.exists()
    b = cluster.start("exec-b", extra=["--enable-script-checks"])
    b.call("PUT", "/v1/services", {"name": "x", "port": 1, "check": check})
    wait_for(marker.exists, 10, "an API exec check ran with --enable-script-checks")


def test_stored_exec_checks_are_held_not_lost_while_the_setting_is_off(cluster: Cluster, tmp_path: Path) -> None:
    data = tmp_path / "d"
    a = cluster.start("held", extra=["--data-dir", str(data), "--enable-script-checks"])
    a.call("PUT", "/v1/services", {"name": "x", "port": 1, "id": "x-1",
                                   "check": {"type": "exec", "target": "true", "interval": "1s"}})
    a.signal(15)
    a.popen.wait(timeout=15)
    a = cluster.start("held", extra=["--data-dir", str(data)], gossip_port=a.gossip_port)
    assert a.call("GET", "/v1/services/x") == []
    assert '"stored_service_held"' in a.log() and "--enable-script-checks" in a.log()
    a.call("PUT", "/v1/services", {"name": "y", "port": 2, "id": "y-1"})  # a save keeps the held one
    a.signal(15)
    a.popen.wait(timeout=15)
    a = cluster.start("held", extra=["--data-dir", str(data), "--enable-script-checks"], gossip_port=a.gossip_port)
    assert [i["id"] for i in a.call("GET", "/v1/services/x")] == ["x-1"]
    assert [i["id"] for i in a.call("GET", "/v1/services/y")] == ["y-1"]


def test_an_upstream_off_loopback_needs_an_opt_in_and_warns(cluster: Cluster) -> None:
    a = cluster.start("pub")
    port = free_port()
    status, answer = raw(a.api_port, "PUT", "/v1/upstreams", {"Content-Type": "application/json"},
                         json.dumps({"service": "web", "listen": f"0.0.0.0:{port}"}).encode())
    assert status == 403 and "--public" in answer["error"] and "0.0.0.0" in answer["error"]
    assert a.call("GET", "/v1/upstreams") == []
    p = subprocess.run([sys.executable, "-m", "cli.main", "upstreams", "add", "--api", a.api, "--service", "web",
                        "--listen", f"0.0.0.0:{port}", "--public"], capture_output=True, text=True, cwd=ROOT,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    assert [(u["listen"], u["public"]) for u in a.call("GET", "/v1/upstreams")] == [(f"0.0.0.0:{port}", True)]
    warning = next(json.loads(ln) for ln in a.log().splitlines() if '"upstream_public"' in ln)
    assert warning["listen"] == f"0.0.0.0:{port}" and warning["level"] == "warning"


def test_a_non_loopback_api_without_a_token_is_refused_at_start(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "cli.main", "agent", "--name", "open", "--insecure",
                        "--bind", f"127.0.0.1:{free_port()}", "--api", f"0.0.0.0:{free_port()}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "not a loopback address" in p.stderr and "token" in p.stderr


def test_the_cli_needs_no_flags_as_the_agents_user_and_reports_a_wrong_token(
        target: tuple[AgentProc, AgentProc, Path], tmp_path: Path) -> None:
    a, _, _ = target

    def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_API_TOKEN")}
        full_env.update(env or {}, MESH_API=a.api)
        return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=30, env=full_env)

    p = cli("members", "--json")
    assert p.returncode == 0 and {m["name"] for m in json.loads(p.stdout)} == {"sec-a", "sec-b"}
    p = cli("services", "register", "--name", "cli", "--port", "1")
    assert p.returncode == 0, p.stderr
    p = cli("members", env={"MESH_API_TOKEN": "wrong-token-0123456789"})
    assert p.returncode == 1 and p.stderr.strip() == "mesh-agent: agent refused: wrong API token (HTTP 401)"
    assert cli("members", env={"MESH_API_TOKEN": TOKEN}).returncode == 0
    p = cli("info")
    assert p.returncode == 0 and "api refused: token 1\n" in p.stdout, p.stdout
    token_file = tmp_path / "cli-token"
    token_file.write_text(TOKEN)
    assert cli("members", "--token-file", str(token_file)).returncode == 0
    assert cli("info", env={"MESH_API_TOKEN_FILE": str(token_file)}).returncode == 0
    p = cli("members", "--token-file", str(tmp_path / "missing"))
    assert p.returncode == 1 and "cannot read API token file" in p.stderr


def test_no_answer_ever_carries_cors_headers(target: tuple[AgentProc, AgentProc, Path]) -> None:
    """Without them a browser lets no cross-origin page read an answer, nor send a preflighted request."""
    a, _, _ = target
    evil = {"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type"}
    for method, path in (("OPTIONS", "/v1/services"), ("OPTIONS", "/v1/keys"), ("GET", "/v1/members"),
                         ("GET", "/v1/health"), ("GET", "/"), ("PUT", "/v1/services")):
        hdrs = evil if method == "OPTIONS" else {"Origin": "http://evil.example"}
        s = socket.create_connection(("127.0.0.1", a.api_port), timeout=10)
        with s:
            head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{a.api_port}\r\nConnection: close\r\n"
            s.sendall((head + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n").encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        response_head = data.partition(b"\r\n\r\n")[0].decode().lower()
        assert "access-control-" not in response_head, (method, path, response_head)
        assert not (method == "OPTIONS" and response_head.startswith("http/1.1 2")), response_head
