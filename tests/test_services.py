"""Service registry and discovery across real agents on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gossip.config import LOCAL
from simulations.harness import ROOT, AgentProc, Cluster, free_port, wait_for, wait_port

pytestmark = pytest.mark.slow

N = 5
DETECTION = (N - 1) * LOCAL.probe_interval + LOCAL.probe_timeout + LOCAL.suspicion_max(N) + 10


def cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args, "--api", api], capture_output=True,
                          text=True, cwd=ROOT, timeout=30)


def start_cluster(cluster: Cluster, tmp: Path, n: int = N) -> list[AgentProc]:
    names = [f"s{i}" for i in range(1, n + 1)]
    seed = cluster.start(names[0], extra=["--data-dir", str(tmp / names[0])])
    agents = [seed] + [cluster.start(nm, join=[seed.addr], extra=["--data-dir", str(tmp / nm)])
                       for nm in names[1:]]
    cluster.wait_converged(names)
    return agents


def instances(agent: AgentProc, service: str) -> dict[str, dict[str, Any]]:
    return {i["id"]: i for i in agent.call("GET", f"/v1/services/{service}")}


def wait_everywhere(agents: list[AgentProc], service: str, pred: Any, what: str, timeout: float = 20) -> None:
    def ok() -> bool:
        return all(pred(instances(a, service)) for a in agents if a.running())

    wait_for(ok, timeout, what, lambda: json.dumps({a.name: instances(a, service) for a in agents
                                                     if a.running()}, indent=1)[:3000])


def http_service(port: int, root: Path) -> subprocess.Popen[bytes]:
    """A real service process: python's http.server, answering 200 on /."""
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_port(port, "http.server up")
    return proc


def test_register_check_flip_deregister_everywhere(cluster: Cluster, tmp_path: Path) -> None:
    agents = start_cluster(cluster, tmp_path)
    port = free_port()
    svc = http_service(port, tmp_path)
    s3 = cluster.agents["s3"]
    p = cli(s3.api, "services", "register", "--name", "web", "--port", str(port), "--tag", "v1",
            "--meta", "zone=a", "--check-http", f"http://127.0.0.1:{port}/", "--check-interval", "300ms",
            "--check-timeout", "200ms", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ok": True, "id": "web-s3"}
    t0 = time.monotonic()
    wait_everywhere(agents, "web", lambda v: v.get("web-s3", {}).get("health") == "passing", "web-s3 passing")
    print(f"registration visible and passing everywhere in {time.monotonic() - t0:.2f}s")
    seen = instances(cluster.agents["s1"], "web")["web-s3"]
    assert seen == {"id": "web-s3", "service": "web", "node": "s3", "address": f"127.0.0.1:{port}",
                    "tags": ["v1"], "meta": {"zone": "a"}, "health": "passing", "output": "",
                    "node_status": "alive", "protocol": "tcp"}
    listing = json.loads(cli(cluster.agents["s5"].api, "services", "--json").stdout)
    assert listing == [{"name": "web", "instances": 1, "passing": 1, "protocol": "tcp"}]

    os.killpg(svc.pid, signal.SIGKILL)  # the service process dies: critical everywhere
    svc.wait(5)
    wait_everywhere(agents, "web", lambda v: v.get("web-s3", {}).get("health") == "critical", "web-s3 critical")
    assert cluster.agents["s2"].call("GET", "/v1/services/web?passing") == []
    shown = json.loads(cli(cluster.agents["s2"].api, "services", "show", "web", "--json").stdout)
    assert [i["health"] for i in shown] == ["critical"]

    svc = http_service(port, tmp_path)  # it comes back: passing again
    try:
        wait_everywhere(agents, "web", lambda v: v.get("web-s3", {}).get("health") == "passing",
                        "web-s3 passing again")
    finally:
        os.killpg(svc.pid, signal.SIGKILL)
        svc.wait(5)

    p = cli(s3.api, "services", "deregister", "web-s3")
    assert p.returncode == 0, p.stderr
    wait_everywhere(agents, "web", lambda v: v == {}, "web-s3 gone")
    assert cli(s3.api, "services", "deregister", "web-s3").returncode == 1


def test_agent_death_removes_instances_and_restart_restores_them(cluster: Cluster, tmp_path: Path) -> None:
    agents = start_cluster(cluster, tmp_path)
    s4 = cluster.agents["s4"]
    for i in range(3):
        s4.call("PUT", "/v1/services", {"name": "api", "port": 9000 + i, "id": f"api-{i}"})
    wait_everywhere(agents, "api", lambda v: len(v) == 3, "3 api instances everywhere")
    s4.signal(signal.SIGKILL)
    s4.popen.wait(5)
    others = [a for a in agents if a.name != "s4"]
    wait_everywhere(others, "api", lambda v: v == {}, "dead agent's instances gone", timeout=DETECTION)
    # Restarted with the same data dir: its run-time registrations come back.
    back = cluster.start("s4", join=[cluster.agents["s1"].addr], gossip_port=s4.gossip_port,
                         api_port=s4.api_port, extra=["--data-dir", str(tmp_path / "s4")])
    assert sorted(instances(back, "api")) == ["api-0", "api-1", "api-2"]
    wait_everywhere(others + [back], "api", lambda v: len(v) == 3, "instances back after restart")


def test_suspect_members_instances_are_flagged(cluster: Cluster, tmp_path: Path) -> None:
    agents = start_cluster(cluster, tmp_path, n=4)
    s2 = cluster.agents["s2"]
    s2.call("PUT", "/v1/services", {"name": "cache", "port": 6379})
    wait_everywhere(agents, "cache", lambda v: "cache-s2" in v, "cache everywhere")
    s2.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: instances(cluster.agents["s1"], "cache").get("cache-s2", {}).get("node_status")
                 == "suspect", 20, "cache-s2 flagged suspect")
    finally:
        s2.signal(signal.SIGCONT)
    wait_everywhere(agents, "cache", lambda v: v.get("cache-s2", {}).get("node_status") == "alive",
                    "cache-s2 back to alive", timeout=30)


@pytest.mark.parametrize(
    ("body", "code", "needle"),
    [
        ({"name": "Bad_Name", "port": 80}, 400, "DNS label"),
        ({"name": "-web", "port": 80}, 400, "DNS label"),
        ({"name": "web", "port": 0}, 400, "port"),
        ({"name": "web", "port": 70000}, 400, "port"),
        ({"name": "web", "port": "80"}, 400, "port"),
        ({"name": "web", "port": 80, "meta": {f"k{i}": "v" for i in range(65)}}, 400, "meta"),
        ({"name": "web", "port": 80, "meta": {"k": "v" * 513}}, 400, "meta"),
        ({"name": "web", "port": 80, "check": {"type": "carrier-pigeon", "target": "x"}}, 400, "check"),
        ({"name": "web", "port": 80, "colour": "blue"}, 400, "unknown field"),
        ({"name": "dup", "port": 80}, 409, "already registered"),
        ([1, 2, 3], 400, "object"),
    ],
)
def test_bad_registrations_are_refused_and_change_nothing(cluster: Cluster, body: Any, code: int,
                                                          needle: str) -> None:
    a = cluster.start("v1")
    a.call("PUT", "/v1/services", {"name": "dup", "port": 80})
    before = a.call("GET", "/v1/services")
    req = urllib.request.Request(f"http://{a.api}/v1/services", data=json.dumps(body).encode(), method="PUT",
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == code
    assert needle in json.loads(err.value.read())["error"]
    assert a.call("GET", "/v1/services") == before


def test_cli_register_errors_are_one_line(cluster: Cluster) -> None:
    a = cluster.start("v2")
    p = cli(a.api, "services", "register", "--name", "web", "--port", "99999")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "port" in p.stderr
    p = cli(a.api, "services", "register", "--name", "web", "--port", "80", "--meta", "novalue")
    assert p.returncode == 2 and "KEY=VALUE" in p.stderr


def test_config_file_services_and_blocking_query(cluster: Cluster, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[[service]]\nname = "db"\nport = 5432\ntags = ["primary"]\n'
                   '[service.check]\ntype = "exec"\ntarget = "exit 1"\ninterval = "200ms"\n')
    a = cluster.start("b1", extra=["--config", str(cfg)])
    wait_for(lambda: instances(a, "db").get("db-b1", {}).get("health") == "warning", 10, "exec exit 1 = warning")
    req = urllib.request.Request(f"http://{a.api}/v1/services/web")
    with urllib.request.urlopen(req, timeout=5) as r:
        index = int(r.headers["x-mesh-index"])
        assert json.loads(r.read()) == []
    result: dict[str, Any] = {}

    def blocking() -> None:
        t0 = time.monotonic()
        url = f"http://{a.api}/v1/services/web?index={index}&wait=20s"
        with urllib.request.urlopen(url, timeout=30) as r:
            result["body"] = json.loads(r.read())
            result["index"] = int(r.headers["x-mesh-index"])
            result["took"] = time.monotonic() - t0

    t = threading.Thread(target=blocking)
    t.start()
    time.sleep(1.0)
    assert "body" not in result, "a blocking query must wait for a change"
    a.call("PUT", "/v1/services", {"name": "web", "port": 8080})
    t.join(25)
    assert [i["id"] for i in result["body"]] == ["web-b1"]
    assert result["index"] > index and result["took"] < 15
    # An index that is already stale answers at once.
    with urllib.request.urlopen(f"http://{a.api}/v1/services/web?index=0&wait=20s", timeout=5) as r:
        assert len(json.loads(r.read())) == 1


def test_bad_blocking_parameters_are_400(cluster: Cluster) -> None:
    a = cluster.start("b2")
    for q in ("index=abc", "index=-1", "wait=forever"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{a.api}/v1/services/web?{q}", timeout=5)
        assert err.value.code == 400


