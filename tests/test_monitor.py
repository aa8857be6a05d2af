"""`mesh-agent monitor` and GET /v1/agent/monitor: the agent's log, streamed as it happens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from agent import log
from simulations.harness import ROOT, AgentProc, Cluster, default_sigint, free_port, mesh_agent_cmd, wait_for


class Monitor:
    """A streaming CLI command (`mesh-agent monitor`; `tap` in test_traffic_api.py) writing to files, so that
    reading them never blocks it."""

    COMMAND = "monitor"
    #: What the command says on stderr once the agent has answered.
    ATTACHED = "monitoring"

    def __init__(self, tmp_path: Path, label: str, *args: str) -> None:
        self.out_path = tmp_path / f"{self.COMMAND}-{label}.out"
        self.err_path = tmp_path / f"{self.COMMAND}-{label}.err"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen([*mesh_agent_cmd(), self.COMMAND, *args], stdout=out, stderr=err,
                                          cwd=ROOT, env=env, start_new_session=True, preexec_fn=default_sigint)

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The lines printed with --json, complete ones only."""
        return [json.loads(ln) for ln in self.out().splitlines(keepends=True) if ln.endswith("\n")]

    def wait_attached(self) -> None:
        """The CLI says so once the agent has answered, which it does after subscribing."""
        wait_for(lambda: self.ATTACHED in self.err() or self.popen.poll() is not None, 15,
                 f"{self.COMMAND} attached", self.err)
        assert self.popen.poll() is None, self.err()

    def interrupt(self) -> int:
        self.popen.send_signal(signal.SIGINT)
        return self.popen.wait(timeout=30)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=5)


@pytest.fixture
def monitors() -> Any:
    started: list[Monitor] = []
    yield started
    for m in started:
        m.kill()


def run_monitor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*mesh_agent_cmd(), "monitor", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def lines_about(text: str, event: str, name: str) -> list[str]:
    return [ln for ln in text.splitlines() if event in ln and f"name={name}" in ln.split()]


@pytest.mark.slow
def test_monitor_shows_join_and_failure_and_exits_0_on_ctrl_c(cluster: Cluster, tmp_path: Path,
                                                               monitors: list[Monitor]) -> None:
    a1 = cluster.start("a1")
    mon = Monitor(tmp_path, "info", "--api", a1.api)
    monitors.append(mon)
    mon.wait_attached()

    a2 = cluster.start("a2", join=[a1.addr])
    wait_for(lambda: bool(lines_about(mon.out(), "member_alive", "a2")), 20, "member_alive for a2 in the monitor",
             mon.out)
    line = lines_about(mon.out(), "member_alive", "a2")[0]
    # As the console renderer prints it: time, [level], event, key=values.
    assert "[info" in line and "node=a1" in line and f"addr={a2.addr}" in line

    a2.signal(signal.SIGKILL)
    failed = ("member_suspect", "member_dead")
    wait_for(lambda: any(lines_about(mon.out(), ev, "a2") for ev in failed), 30,
             "member_suspect or member_dead for a2 in the monitor", mon.out)

    assert mon.interrupt() == 0
    assert "Traceback" not in mon.err(), mon.err()
    assert "KeyboardInterrupt" not in mon.err()


@pytest.mark.slow
def test_log_level_filters_and_may_go_below_the_agents(cluster: Cluster, tmp_path: Path,
                                                       monitors: list[Monitor]) -> None:
    a1 = cluster.start("a1")  # logs at info
    warn = Monitor(tmp_path, "warning", "--api", a1.api, "--log-level", "warning", "--json")
    debug = Monitor(tmp_path, "debug", "--api", a1.api, "--log-level", "debug", "--json")
    monitors += [warn, debug]
    warn.wait_attached()
    debug.wait_attached()

    cluster.start("a2", join=[a1.addr])
    wait_for(lambda: any(e["event"] == "member_alive" and e.get("name") == "a2" for e in debug.events()), 20,
             "member_alive for a2 at debug", debug.out)
    # A check turning passing is logged at debug: the monitor sees it, the agent's own log does not.
    a1.call("PUT", "/v1/services", {"name": "api", "port": a1.api_port, "check": {
        "type": "tcp", "target": a1.api, "interval": "200ms", "timeout": "200ms"}})
    wait_for(lambda: any(e["event"] == "check_state_changed" and e["level"] == "debug" for e in debug.events()),
             20, "a debug line in the debug monitor", debug.out)
    assert "check_state_changed" not in a1.log()

    # An agent claiming a1's name is refused, at error: after member_alive, in the same order for every monitor.
    cluster.start("a1", join=[a1.addr], wait=False)
    wait_for(lambda: any(e["event"] == "join_refused" for e in warn.events()), 30, "join_refused at warning",
             warn.out)
    levels = {e["level"] for e in warn.events()}
    assert levels <= {"warning", "error"}, warn.out()
    assert not any(e["event"] == "member_alive" for e in warn.events())
    assert {"info", "debug"} <= {e["level"] for e in debug.events()}


@pytest.mark.slow
def test_bad_level_and_no_agent_exit_1_with_one_line(cluster: Cluster) -> None:
    a1 = cluster.start("a1")
    p = run_monitor("--api", a1.api, "--log-level", "loud")
    assert p.returncode == 1
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert "log_level" in p.stderr and "HTTP 400" in p.stderr

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{a1.api}/v1/agent/monitor?log_level=loud", timeout=5)
    assert err.value.code == 400
    assert "unknown log_level" in json.loads(err.value.read())["error"]

    p = run_monitor("--api", f"127.0.0.1:{free_port()}")
    assert p.returncode == 1
    assert p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and "no agent answering" in p.stderr, p.stderr


def read_until(sock: socket.socket, conn: h11.Connection, want: type) -> list[Any]:
    """h11 client events up to and including the first of type ``want``."""
    events: list[Any] = []
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        events.append(ev)
        if isinstance(ev, want):
            return events


@pytest.mark.slow
def test_http_stream_is_chunked_json_lines_and_ends_with_the_connection(cluster: Cluster) -> None:
    a1 = cluster.start("a1")
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", a1.api_port), timeout=20) as sock:
        sock.sendall(conn.send(h11.Request(method="GET", target="/v1/agent/monitor?log_level=info",
                                           headers=[("host", a1.api)])) + conn.send(h11.EndOfMessage()))
        (head,) = read_until(sock, conn, h11.Response)
        headers = dict(head.headers)
        assert head.status_code == 200
        assert headers[b"transfer-encoding"] == b"chunked"
        assert headers[b"content-type"] == b"application/x-ndjson"
        assert headers[b"connection"] == b"close"

        a2: AgentProc = cluster.start("a2", join=[a1.addr])
        seen: list[dict[str, Any]] = []
        buf = b""
        while not any(e["event"] == "member_alive" and e.get("name") == a2.name for e in seen):
            for ev in read_until(sock, conn, h11.Data):
                buf += ev.data
            *complete, buf = buf.split(b"\n")
            seen += [json.loads(ln) for ln in complete]
        assert all({"timestamp", "level", "event"} <= e.keys() for e in seen)

    # The agent noticed the hang-up and keeps serving.
    assert a1.call("GET", "/v1/health")["ok"] is True


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


async def test_a_slow_monitor_loses_lines_and_is_told_and_logging_never_fails() -> None:
    # The fan-out processor, as structlog calls it from inside a logging call.
    def emit(method: str, **fields: Any) -> None:
        event = {"event": "e", "level": method, **fields}
        assert log._fan_out(None, method, event) is event

    with log.subscribe(log.level_number("info") or 0, buffer=2) as sub:
        for i in range(5):
            emit("info", i=i)
        emit("debug", i=99)  # below this monitor's level
        emit("info", bad=Unprintable())  # cannot be rendered: counted, not raised
        assert sub.dropped == 3
        assert log.monitor_stats()["monitors"] == 1
        assert log.monitor_stats()["monitor_failures"] >= 1
        got = [await sub.__anext__(), await sub.__anext__()]
        emit("info", i=5)
        note, after = (await sub.__anext__()).splitlines()
    assert [json.loads(line)["i"] for line in got] == [0, 1]
    assert json.loads(note)["event"] == "monitor_lines_dropped" and json.loads(note)["dropped"] == 3
    assert json.loads(after)["i"] == 5
    assert log.monitor_stats()["monitors"] == 0
    assert log.monitor_stats()["monitor_lines_dropped"] >= 3
    with trio.fail_after(5):  # closed on leaving the block: the stream ends
        assert [line async for line in sub] == []


def test_a_quiet_stream_outlasts_the_clients_request_timeout(cluster: Cluster) -> None:
    """The timeout that bounds reaching the agent must not end a stream that is merely quiet."""
    import threading

    from cli.client import stream_lines

    a = cluster.start("quiet")
    lines = stream_lines(a.api, "/v1/agent/monitor?log_level=error", timeout=0.5)
    got: list[bytes] = []
    ended = threading.Event()

    def read() -> None:
        got.extend(lines)
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert not ended.wait(2.5), f"the stream ended after {got!r}"  # five times the request timeout
    a.signal(signal.SIGKILL)
    assert ended.wait(10), "the stream did not end when the agent went away"
