"""What an operator is told when a command goes wrong or only half right: said plainly, never in
Python's words, and never a success that did not happen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gossip.keyring import generate_key
from simulations.harness import ROOT, Cluster, free_port, wait_for


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def test_keygen_never_overwrites_a_key_file_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "cluster.key"
    out.write_text("the only copy\n")
    p = run("keygen", "--out", str(out))
    assert p.returncode == 1 and "already exists" in one_line(p) and "--force" in p.stderr
    assert out.read_text() == "the only copy\n" and p.stdout == ""
    p = run("keygen", "--out", str(out), "--force")
    assert p.returncode == 0 and out.read_text().strip() == p.stdout.strip()


def test_removing_a_key_nobody_holds_is_not_reported_as_done(cluster: Cluster) -> None:
    a = cluster.start("kr1")
    cluster.start("kr2", join=[a.addr])
    cluster.wait_converged(["kr1", "kr2"])
    p = run("keys", "remove", generate_key(), "--api", a.api)
    assert p.returncode == 1, p.stdout
    assert "removed: 0 of 2 members acknowledged" in p.stdout and "that key is not installed" in p.stdout


def test_services_commands_say_what_happened_where(cluster: Cluster) -> None:
    a = cluster.start("sv1")
    b = cluster.start("sv2", join=[a.addr])
    cluster.wait_converged(["sv1", "sv2"])
    for agent in (a, b):  # ids are per node, as in Consul: the same id on two nodes
        assert run("services", "register", "--api", agent.api, "--name", "web", "--port", "80",
                   "--id", "web-x").returncode == 0
    p = run("services", "show", "web", "--api", a.api, "--json")
    shown = json.loads(p.stdout)
    assert [(i["id"], i["node"], i["node_status"]) for i in shown] == [("web-x", "sv1", "alive"),
                                                                       ("web-x", "sv2", "alive")]
    p = run("services", "deregister", "web-x", "--api", b.api)
    assert p.returncode == 0 and p.stdout.strip() == "deregistered web-x (service web) from node sv2"
    p = run("services", "register", "--api", a.api, "--name", "db", "--port", "5432", "--check-interval", "banana")
    assert p.returncode == 2 and "need a check" in one_line(p)
    p = run("services", "register", "--api", a.api, "--name", "db", "--port", "5432",
            "--check-tcp", "127.0.0.1:5432", "--check-interval", "1s", "--check-timeout", "5s")
    assert p.returncode == 1 and "longer than the interval" in one_line(p)
    assert a.call("GET", "/v1/services/db") == []


@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    ("PUT", "/v1/services", {"name": "x"}, "port is missing"),
    ("PUT", "/v1/services", {"name": "x", "port": True}, "got true"),
    ("PUT", "/v1/services", {"name": None, "port": 1}, "invalid service name null"),
    ("PUT", "/v1/upstreams", {"service": "x", "listen": "127.0.0.1:1", "lb": None}, "got null"),
    ("PUT", "/v1/upstreams", {"service": "x", "listen": "127.0.0.1:1", "max_connections": "abc"}, 'got "abc"'),
    ("PUT", "/v1/intentions", {"source": "a", "destination": "b", "action": 1}, "got 1"),
    ("GET", "/v1/services?index=abc", None, "index must be a non-negative integer"),
])
def test_api_errors_speak_json_not_python(cluster: Cluster, method: str, path: str, body: object,
                                          expected: str) -> None:
    import urllib.error
    import urllib.request

    a = cluster.start("err")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{a.api}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"} if data else {})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    message = json.loads(err.value.read())["error"]
    assert err.value.code == 400 and expected in message, message
    for python in ("None", "True", "invalid literal", "'abc'"):
        assert python not in message, message


def test_agent_flags_are_checked_before_anything_starts() -> None:
    p = run("agent", "--insecure", "--name", "x", "--bind", "nonsense", "--api", f"127.0.0.1:{free_port()}")
    assert p.returncode == 2 and "--bind" in one_line(p)
    for flag, value in (("--profile", "moon"), ("--log-format", "xml"), ("--log-level", "loud")):
        p = run("agent", "--insecure", "--name", "x", flag, value)
        assert p.returncode == 2 and flag in one_line(p)
    help_text = run("agent", "--help").stdout
    assert "MESH_<FLAG>" in help_text and "[lan|local|wan]" in help_text and "[console|json]" in help_text
    assert "MESH_API" in run("members", "--help").stdout


def test_a_data_dir_with_a_keyring_needs_no_key(cluster: Cluster, tmp_path: Path) -> None:
    data = tmp_path / "d"
    a = cluster.start("ring", extra=["--data-dir", str(data)])
    a.signal(15)
    a.popen.wait(timeout=15)
    b = cluster.start("other")
    # No --key and no --insecure: the keyring under --data-dir holds the cluster's key.
    api = free_port()
    log = tmp_path / "ring-again.log"
    with open(log, "wb") as fh:
        again = subprocess.Popen([sys.executable, "-m", "cli.main", "agent", "--name", "ring", "--profile", "local",
                                  "--bind", a.addr, "--api", f"127.0.0.1:{api}", "--tunnel", "127.0.0.1:0",
                                  "--data-dir", str(data), "--join", b.addr, "--log-format", "json"],
                                 stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                 env={k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
                                 | {"PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: b.members().get("ring", {}).get("status") == "alive" or again.poll() is not None, 20,
                 "the keyring-only agent joined", log.read_text)
        assert again.poll() is None, log.read_text()
        assert '"encrypted": true' in log.read_text()
    finally:
        again.kill()
        again.wait(timeout=5)


def test_services_show_says_why_a_check_fails_on_every_node(cluster: Cluster) -> None:
    a = cluster.start("co1")
    b = cluster.start("co2", join=[a.addr])
    cluster.wait_converged(["co1", "co2"])
    closed = free_port()
    assert run("services", "register", "--api", a.api, "--name", "db", "--port", str(closed),
               "--check-tcp", f"127.0.0.1:{closed}", "--check-interval", "200ms").returncode == 0

    def shown_on_b() -> list[dict[str, str]]:
        return [i for i in b.call("GET", "/v1/services/db") if i["health"] == "critical" and i["output"]]

    wait_for(lambda: bool(shown_on_b()), 15, "db critical on co2, with the check's output")
    assert "refused" in shown_on_b()[0]["output"]
    table = run("services", "show", "db", "--api", b.api).stdout
    assert "CHECK OUTPUT" in table and "refused" in table, table
