"""The demo pieces, as real processes: demo-service, demo-client, and `make demo` (mesh-agent demo)."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.demo import _port_free, layout
from simulations.harness import ROOT, Cluster, Processes, default_sigint, free_port, wait_for, wait_port

ANSWER = re.compile(r"^instance=(\S+) node=(\S+) \d+\.\d ms$")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))


class Procs(Processes):
    """``mesh-agent`` commands run in the background, each logging to its own file in the test's directory."""

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir

    def cli(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.start([sys.executable, "-m", "cli.main", *args], self.workdir / f"{name}.log",
                          dict(os.environ, PYTHONPATH=str(ROOT)), ROOT)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    ps = Procs(tmp_path)
    try:
        yield ps
    finally:
        ps.close()


def get(port: int, path: str = "/") -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200
        data: dict[str, object] = json.loads(resp.read())
        return data
    finally:
        conn.close()


def test_demo_service_answers_every_request_with_its_instance_id(procs: Procs) -> None:
    port = free_port()
    p = procs.cli("svc", "demo-service", "--port", str(port), "--id", "web-7")
    wait_port(port, "demo-service up")
    assert get(port, "/hello?x=1") == {"instance": "web-7", "service": None, "node": None, "method": "GET",
                                       "path": "/hello?x=1"}
    # Keep-alive: several requests on one connection.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for path in ("/a", "/b"):
        conn.request("GET", path)
        assert json.loads(conn.getresponse().read())["path"] == path
    conn.close()
    # Not HTTP: a 400, and the service carries on.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x00garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert get(port)["instance"] == "web-7"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 0


def test_demo_service_registers_itself_and_deregisters_on_exit(procs: Procs, cluster: Cluster) -> None:
    agent = cluster.start("n1")
    port = free_port()

    def ids() -> dict[str, str]:
        return {i["id"]: i["health"] for i in agent.call("GET", "/v1/services/web")}

    args = ("demo-service", "--port", str(port), "--id", "web-1", "--register", "web", "--api", agent.api)
    p = procs.cli("svc", *args)
    wait_for(lambda: ids() == {"web-1": "passing"}, 30, "web-1 registered and passing", lambda: str(ids()))
    assert get(port) == {"instance": "web-1", "service": "web", "node": "n1", "method": "GET", "path": "/"}
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 0
    assert ids() == {}
    assert "deregistered web-1" in procs.log("svc")

    # A restarted instance whose registration outlived it (kill -9) is registered again, not refused.
    p = procs.cli("svc2", *args)
    wait_for(lambda: ids() == {"web-1": "passing"}, 30, "web-1 registered", lambda: procs.log("svc2"))
    p.kill()
    p.wait(timeout=10)
    procs.cli("svc3", *args)
    wait_for(lambda: "registered web-1" in procs.log("svc3"), 30, "registered again", lambda: procs.log("svc3"))
    wait_for(lambda: ids() == {"web-1": "passing"}, 30, "web-1 passing again", lambda: str(ids()))


def test_demo_service_waits_for_its_agent(procs: Procs, cluster: Cluster) -> None:
    api_port = free_port()
    port = free_port()
    procs.cli("svc", "demo-service", "--port", str(port), "--id", "api-1", "--register", "api",
                "--api", f"127.0.0.1:{api_port}")
    wait_for(lambda: "waiting for the agent" in procs.log("svc"), 30, "the service says it waits")
    agent = cluster.start("n1", api_port=api_port)
    wait_for(lambda: [i["id"] for i in agent.call("GET", "/v1/services/api")] == ["api-1"], 30,
             "api-1 registered once the agent is up", lambda: procs.log("svc"))


def test_demo_client_prints_who_answered_and_how_long_it_took(procs: Procs, cluster: Cluster) -> None:
    agent = cluster.start("n1")
    port, upstream = free_port(), free_port()
    procs.cli("svc", "demo-service", "--port", str(port), "--id", "web-1", "--register", "web",
                "--api", agent.api)
    wait_for(lambda: len(agent.call("GET", "/v1/services/web?passing")) == 1, 30, "web-1 passing",
             lambda: procs.log("svc"))
    url = f"http://127.0.0.1:{upstream}/"
    p = cli("demo-client", "--url", url, "--upstream", "web", "--api", agent.api, "--count", "3",
            "--interval", "0")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"upstream 127.0.0.1:{upstream} -> web added on the agent at {agent.api}"
    assert [ANSWER.match(ln).groups() for ln in lines[1:]] == [("web-1", "n1")] * 3  # type: ignore[union-attr]
    # The upstream is there now: a second client uses it as it is.
    p = cli("demo-client", "--url", url, "--upstream", "web", "--api", agent.api, "--count", "1")
    assert p.returncode == 0 and ANSWER.match(p.stdout.strip()), p.stdout + p.stderr

    # Errors are one line each and the loop goes on.
    p = cli("demo-client", "--url", f"http://127.0.0.1:{free_port()}/", "--count", "2", "--interval", "0")
    assert p.returncode == 0
    assert [ln.startswith("error: ") and "ms)" in ln for ln in p.stdout.splitlines()] == [True, True], p.stdout


@pytest.mark.parametrize(("args", "needle", "code"), [
    (["demo-client", "--url", "ftp://x/"], "expected http://", 2),
    (["demo-client", "--url", "http://x:99999/"], "--url", 2),
    (["demo-client", "--url", "http://127.0.0.1:1/", "--interval", "-1"], "--interval", 2),
    (["demo-service", "--port", "0", "--id", "x"], "--port", 2),
])
def test_bad_demo_input_is_one_line(args: list[str], needle: str, code: int) -> None:
    p = cli(*args)
    assert p.returncode == code
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_demo_service_on_a_busy_port_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = cli("demo-service", "--port", str(s.getsockname()[1]), "--id", "x")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "cannot listen" in p.stderr and "Traceback" not in p.stderr


def demo_base_port(nodes: int) -> int:
    need = 2 * nodes + len(layout(nodes)) + 1
    for _ in range(200):
        base = random.randrange(20000, 60000)
        if all(_port_free(base + i) for i in range(need)):
            return base
    raise RuntimeError("no free port range for the demo")


@pytest.mark.slow
def test_make_demo_shows_calls_moving_off_a_killed_agent_and_ctrl_c_leaves(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    with open(out, "wb") as fh:
        demo = subprocess.Popen([sys.executable, "-m", "cli.main", "demo", "--nodes", "5", "--interval", "0.2",
                                 "--base-port", str(demo_base_port(5))], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True,
                                preexec_fn=default_sigint)

    def text() -> str:
        return out.read_text(errors="replace")

    def answers(since: int = 0) -> list[str]:
        return [m.group(1) for ln in text()[since:].splitlines() if (m := ANSWER.match(ln))]

    try:
        wait_for(lambda: len(answers()) >= 10, 120, "the demo's client prints 10 answers", text)
        pids = {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (node\d): gossip .* pid (\d+)$", text(), re.M)}
        hint = re.search(r"kill -9 (\d+)\s+\((node\d), which runs ([\w-]+):", text())
        assert hint and pids[hint.group(2)] == int(hint.group(1)), text()
        assert {i.id: f"node{i.node_index + 1}" for i in layout(5)}[hint.group(3)] == hint.group(2)
        # Kill the agent of the instance the client hears from most, so its calls must move (which one
        # that is depends on the balancer); the hint's instance is one like it.
        heard = answers()
        victim = max(set(heard), key=heard.count)
        node = {i.id: f"node{i.node_index + 1}" for i in layout(5)}[victim]
        pid = pids[node]
        killed_at = len(text())
        os.kill(pid, signal.SIGKILL)
        # The demo prints node5's routes whenever they change; once the victim is gone from them, calls
        # go to the other instances only.
        around = re.compile(rf"^node5 routes web to: (?!.*{victim}).*$", re.M)
        wait_for(lambda: around.search(text(), killed_at) is not None, 120, f"node5 routes web around {node}", text)
        match = around.search(text(), killed_at)
        assert match
        wait_for(lambda: len(answers(match.end())) >= 10, 60, "10 more answers", text)
        assert victim not in answers(match.end()), text()
        assert re.search(r"^node\d\s.*\bdead\b", text(), re.M), "the membership table shows the death"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=120) == 0, text()  # every agent leaves gracefully: slow on a busy box
        final = text()
        for n in range(1, 6):
            expected = -signal.SIGKILL if f"node{n}" == node else 0
            assert f"  node{n} exited with {expected}" in final, final
        assert "Traceback" not in final
        logs = re.search(r"logs in (\S+)\)", final)
        assert logs and not Path(logs.group(1)).exists(), "a clean stop leaves no work dir behind"
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
        # Whatever the demo started and did not stop (it prints every pid).
        for child in re.findall(r"\bpid (\d+)", text()):
            try:
                os.killpg(int(child), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
