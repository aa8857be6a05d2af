"""agent.health: tcp/http/exec probes against real loopback services, thresholds, the runner, spec parsing."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.health import HEALTH, JITTER, CheckRunner, CheckSpec, parse_duration, probe

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=200)

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound (so nobody else takes it) but never listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def serve(nursery: trio.Nursery, handler: Handler, host: str = "127.0.0.1") -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=host))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def read_head(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(4096)
        if not data:
            break
        buf += data
    return buf


def answer(raw: bytes, seen: list[bytes] | None = None) -> Handler:
    """A server that reads the request head, sends ``raw`` and hangs up."""

    async def handle(stream: trio.SocketStream) -> None:
        head = await read_head(stream)
        if seen is not None:
            seen.append(head)
        await stream.send_all(raw)

    return handle


def status(code: int, reason: str = "Whatever") -> bytes:
    return f"HTTP/1.1 {code} {reason}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".encode()


# -- tcp ---------------------------------------------------------------------------------------


async def test_tcp_passing_against_a_listener(nursery: trio.Nursery) -> None:
    port = await serve(nursery, answer(b""))
    assert await probe(CheckSpec("tcp", f"127.0.0.1:{port}")) == ("passing", f"TCP connect 127.0.0.1:{port}: success")
    health, _ = await probe(CheckSpec("tcp", f"localhost:{port}"))
    assert health == "passing"


async def test_tcp_passing_over_ipv6(nursery: trio.Nursery) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = await serve(nursery, answer(b""), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    assert (await probe(CheckSpec("tcp", f"[::1]:{port}")))[0] == "passing"


async def test_tcp_critical_against_a_closed_port(closed_port: int) -> None:
    assert await probe(CheckSpec("tcp", f"127.0.0.1:{closed_port}")) == ("critical", "connect refused")


async def test_tcp_unresolvable_host_is_critical() -> None:
    health, output = await probe(CheckSpec("tcp", "no-such-host.invalid:80", timeout=1.0))
    assert health == "critical"
    assert output.startswith(("cannot resolve host", "connect", "timed out"))


# -- http --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, expected",
    [(200, "passing"), (204, "passing"), (299, "passing"), (429, "warning"), (503, "critical"),
     (500, "critical"), (404, "critical"), (301, "critical")],
)
async def test_http_status_mapping(nursery: trio.Nursery, code: int, expected: str) -> None:
    port = await serve(nursery, answer(status(code, "Reason Here")))
    assert await probe(CheckSpec("http", f"http://127.0.0.1:{port}/health")) == (expected, f"HTTP {code} Reason Here")


async def test_http_sends_a_proper_get(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []
    port = await serve(nursery, answer(status(200), seen))
    assert (await probe(CheckSpec("http", f"http://localhost:{port}/v1/status?verbose=1")))[0] == "passing"
    lines = seen[0].decode().split("\r\n")
    assert lines[0] == "GET /v1/status?verbose=1 HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    assert headers["host"] == f"localhost:{port}"
    assert headers["connection"] == "close"
    assert "mesh-agent" in headers["user-agent"]


async def test_http_empty_path_requests_root(nursery: trio.Nursery) -> None:
    seen: list[bytes] = []
    port = await serve(nursery, answer(status(200), seen))
    assert (await probe(CheckSpec("http", f"http://127.0.0.1:{port}")))[0] == "passing"
    assert seen[0].startswith(b"GET / HTTP/1.1\r\n")


async def test_http_server_that_never_answers_is_critical_within_timeout(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await serve(nursery, silent)
    t0 = time.monotonic()
    health, output = await probe(CheckSpec("http", f"http://127.0.0.1:{port}/", timeout=0.3))
    elapsed = time.monotonic() - t0
    assert health == "critical"
    assert output == "timed out after 0.3s (waiting for a response)"
    assert 0.25 <= elapsed < 1.5


async def test_http_garbage_server_is_critical(nursery: trio.Nursery) -> None:
    port = await serve(nursery, answer(b"SSH-2.0-OpenSSH_9.6\r\nnot http at all\r\n\r\n"))
    health, output = await probe(CheckSpec("http", f"http://127.0.0.1:{port}/"))
    assert health == "critical"
    assert output.startswith("bad HTTP response")
    assert "\n" not in output and len(output) <= 200


async def test_http_hang_up_without_answer_is_critical(nursery: trio.Nursery) -> None:
    port = await serve(nursery, answer(b""))
    assert await probe(CheckSpec("http", f"http://127.0.0.1:{port}/")) == (
        "critical", "connection closed without an HTTP response")


async def test_http_only_waits_for_the_head_not_the_body(nursery: trio.Nursery) -> None:
    async def slow_body(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\npartial")
        await trio.sleep_forever()

    port = await serve(nursery, slow_body)
    assert await probe(CheckSpec("http", f"http://127.0.0.1:{port}/", timeout=0.5)) == ("passing", "HTTP 200 OK")


async def test_http_skips_informational_responses(nursery: trio.Nursery) -> None:
    port = await serve(nursery, answer(b"HTTP/1.1 100 Continue\r\n\r\n" + status(200, "OK")))
    assert await probe(CheckSpec("http", f"http://127.0.0.1:{port}/")) == ("passing", "HTTP 200 OK")


async def test_http_closed_port_is_critical(closed_port: int) -> None:
    assert await probe(CheckSpec("http", f"http://127.0.0.1:{closed_port}/")) == ("critical", "connect refused")


# -- exec --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [("exit 0", "passing"), ("exit 1", "warning"), ("exit 2", "critical"), ("sleep 5", "critical")],
)
async def test_exec_exit_codes(command: str, expected: str) -> None:
    t0 = time.monotonic()
    health, output = await probe(CheckSpec("exec", command, timeout=0.2))
    assert health == expected
    assert time.monotonic() - t0 < 2.0
    if command == "sleep 5":
        assert output == "timed out after 0.2s"
    else:
        assert output == f"exit {command[-1]}"


async def test_exec_output_is_the_first_line_of_stdout_and_stderr() -> None:
    health, output = await probe(CheckSpec("exec", "echo; echo 'disk 97% full' >&2; echo more; exit 2"))
    assert (health, output) == ("critical", "exit 2: disk 97% full")


async def test_exec_long_output_is_cut_and_does_not_block() -> None:
    health, output = await probe(CheckSpec("exec", "head -c 3000000 /dev/zero | tr '\\0' x; exit 0", timeout=5))
    assert health == "passing"
    assert output.startswith("exit 0: xxx") and len(output) <= 200


async def test_exec_killed_by_signal_is_critical() -> None:
    assert await probe(CheckSpec("exec", "kill -KILL $$")) == ("critical", "killed by signal SIGKILL")


async def test_exec_missing_command_is_critical() -> None:
    health, output = await probe(CheckSpec("exec", "no-such-command-xyz"))
    assert health == "critical" and output.startswith("exit 127")


async def test_exec_background_child_does_not_hold_the_check_open() -> None:
    t0 = time.monotonic()
    assert await probe(CheckSpec("exec", "sleep 1 & echo started", timeout=3)) == ("passing", "exit 0: started")
    assert time.monotonic() - t0 < 0.8


def _gone(pid: int) -> bool:
    """Dead or a zombie (an orphan may wait for a reaper that a container's init never runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def _wait_gone(pid: int) -> bool:
    with trio.move_on_after(2):
        while not _gone(pid):
            await trio.sleep(0.01)
    return _gone(pid)


async def test_exec_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    health, _ = await probe(CheckSpec("exec", f"sleep 30 & echo $! > {pidfile}; wait", timeout=0.3))
    assert health == "critical"
    assert await _wait_gone(int(pidfile.read_text()))


async def test_exec_cancellation_kills_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with trio.move_on_after(0.3):
        await probe(CheckSpec("exec", f"sleep 30 & echo $! > {pidfile}; wait", timeout=10))
        pytest.fail("probe outlived its cancellation")
    assert await _wait_gone(int(pidfile.read_text()))


# -- thresholds: CheckRunner.record ------------------------------------------------------------


class Changes:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, health: str, output: str) -> None:
        self.calls.append((health, output))


def runner(success: int = 1, failures: int = 1, initial: str = "critical") -> tuple[CheckRunner, Changes]:
    changes = Changes()
    s = CheckSpec("tcp", "127.0.0.1:80", success_before_passing=success, failures_before_critical=failures)
    return CheckRunner(s, changes, initial=initial), changes


def test_starts_critical_and_default_thresholds_flip_at_once() -> None:
    r, changes = runner()
    assert (r.health, r.output) == ("critical", "")
    assert r.record("passing", "ok") is True
    assert r.record("passing", "ok again") is False
    assert r.output == "ok again"
    assert r.record("warning", "slow") is True
    assert r.record("critical", "down") is True
    assert changes.calls == [("passing", "ok"), ("warning", "slow"), ("critical", "down")]


def test_success_threshold() -> None:
    r, changes = runner(success=3)
    assert not r.record("passing", "1") and not r.record("passing", "2")
    assert (r.health, r.output) == ("critical", "")
    assert r.record("passing", "3")
    assert changes.calls == [("passing", "3")]


def test_a_failure_resets_the_success_run() -> None:
    r, changes = runner(success=2)
    for result in ["passing", "critical", "passing", "critical", "passing"]:
        assert not r.record(result)
    assert r.health == "critical"
    assert r.record("passing")
    assert changes.calls == [("passing", "")]


def test_failure_threshold_keeps_passing_and_its_output() -> None:
    r, changes = runner(failures=3, initial="passing")
    assert not r.record("critical", "blip") and not r.record("critical", "blip")
    assert (r.health, r.output) == ("passing", "")
    assert not r.record("passing", "fine")  # resets the failure run
    assert not r.record("warning", "a") and not r.record("critical", "b")
    assert r.record("warning", "c")  # the new state is the latest result
    assert (r.health, r.output) == ("warning", "c")
    assert changes.calls == [("warning", "c")]


def test_warning_and_critical_switch_at_once_while_not_passing() -> None:
    r, changes = runner(success=5, failures=5, initial="warning")
    assert r.record("critical", "x")
    assert r.record("warning", "y")
    assert not r.record("warning", "z")
    assert r.output == "z"
    assert changes.calls == [("critical", "x"), ("warning", "y")]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown health"):
        runner()[0].record("ok")
    with pytest.raises(ValueError, match="unknown health"):
        runner(initial="healthy")
    with pytest.raises(ValueError, match="success_before_passing"):
        runner(success=0)


results = st.sampled_from(HEALTH)


@SETTINGS
@given(
    initial=results,
    seq=st.lists(results, max_size=60),
    success=st.integers(1, 5),
    failures=st.integers(1, 5),
)
def test_record_invariants(initial: str, seq: list[str], success: int, failures: int) -> None:
    r, changes = runner(success, failures, initial)
    passes = fails = 0
    for i, result in enumerate(seq):
        before = r.health
        passes, fails = (passes + 1, 0) if result == "passing" else (0, fails + 1)
        calls = len(changes.calls)
        had_reason = bool(r.output)
        flipped = r.record(result, f"{i}:{result}")
        assert r.health in HEALTH
        # record() reports a flip exactly when the state changed; on_change saw it, and also the
        # first reason given for a state that is not passing (a check starts critical with none).
        assert flipped == (r.health != before)
        first_reason = not flipped and r.health != "passing" and not had_reason and bool(r.output)
        assert len(changes.calls) == calls + (flipped or first_reason)
        if flipped or first_reason:
            assert changes.calls[-1] == (r.health, r.output)
        # A state can only change to the latest result.
        assert r.health in (before, result)
        # The output always explains the state: it came from a result equal to it.
        if r.output:
            assert r.output.split(":")[1] == r.health
        # Thresholds: in or out of passing only after enough consecutive results.
        if before != "passing" and r.health == "passing":
            assert passes >= success
        if before == "passing" and r.health != "passing":
            assert fails >= failures
        if result == "passing" and passes >= success:
            assert r.health == "passing"
        if result != "passing" and fails >= failures:
            assert r.health == result


@SETTINGS
@given(seq=st.lists(st.sampled_from(["warning", "critical", "passing"]), max_size=60), failures=st.integers(2, 6))
def test_short_failure_runs_never_leave_passing(seq: list[str], failures: int) -> None:
    r, changes = runner(failures=failures, initial="passing")
    run = 0
    for result in seq:
        run = 0 if result == "passing" else run + 1
        if run >= failures:
            break
        r.record(result)
        assert r.health == "passing"
    if run < failures:
        assert changes.calls == []


# -- CheckRunner.run ---------------------------------------------------------------------------


class ScriptedRunner(CheckRunner):
    """Replays results instead of probing, so the schedule can be checked on a mock clock."""

    def __init__(self, spec: CheckSpec, script: list[str], on_change: Callable[[str, str], None]) -> None:
        super().__init__(spec, on_change)
        self.script = script
        self.times: list[float] = []

    async def _probe_once(self) -> tuple[str, str]:
        self.times.append(trio.current_time())
        await trio.sleep(0.01)  # probes take time; the schedule is start to start
        i = len(self.times) - 1
        return self.script[min(i, len(self.script) - 1)], f"probe {i}"


async def test_run_schedule_and_thresholds_on_a_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    spec = CheckSpec("exec", "true", interval=10, success_before_passing=2, failures_before_critical=3)
    script = ["passing"] * 4 + ["critical"] * 6
    changes = Changes()
    r = ScriptedRunner(spec, script, changes)
    start = trio.current_time()
    with trio.move_on_after(95):
        await r.run()
    assert r.times[0] == start  # the first probe does not wait for an interval
    gaps = [b - a for a, b in zip(r.times, r.times[1:], strict=False)]
    assert len(gaps) >= 8
    assert all(10 * (1 - JITTER) <= g <= 10 * (1 + JITTER) for g in gaps)
    assert len(set(gaps)) > 1  # jittered
    assert changes.calls == [("passing", "probe 1"), ("critical", "probe 6")]
    assert r.health == "critical" and r.output.startswith("probe ")


async def test_run_slow_probe_does_not_overlap(autojump_clock: trio.testing.MockClock) -> None:
    class Slow(ScriptedRunner):
        async def _probe_once(self) -> tuple[str, str]:
            self.times.append(trio.current_time())
            await trio.sleep(25)
            return "passing", ""

    r = Slow(CheckSpec("exec", "true", interval=10, timeout=10), ["passing"], Changes())
    with trio.move_on_after(100):
        await r.run()
    assert [b - a for a, b in zip(r.times, r.times[1:], strict=False)] == [25, 25, 25]


async def _wait_for(changes: Changes, health: str) -> None:
    with trio.fail_after(5):
        while not changes.calls or changes.calls[-1][0] != health:
            await trio.sleep(0.01)


async def test_run_tcp_flips_when_the_service_stops(nursery: trio.Nursery) -> None:
    server = trio.CancelScope()

    async def service(task_status: trio.TaskStatus[int]) -> None:
        with server:
            async with trio.open_nursery() as inner:
                task_status.started(await serve(inner, answer(b"")))

    port: int = await nursery.start(service)
    changes = Changes()
    spec = CheckSpec("tcp", f"127.0.0.1:{port}", interval=0.1, timeout=0.1,
                     success_before_passing=2, failures_before_critical=2)
    r = CheckRunner(spec, changes)
    nursery.start_soon(r.run)
    await _wait_for(changes, "passing")
    server.cancel()
    await _wait_for(changes, "critical")
    assert changes.calls == [("passing", f"TCP connect 127.0.0.1:{port}: success"), ("critical", "connect refused")]


async def test_run_exec_follows_a_flag_file(tmp_path: Path) -> None:
    flag = tmp_path / "up"
    flag.write_text("")
    changes = Changes()
    spec = CheckSpec("exec", f"test -f {flag} && echo up || {{ echo down; exit 2; }}", interval=0.3, timeout=0.3)
    r = CheckRunner(spec, changes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await _wait_for(changes, "passing")
        flag.unlink()
        await _wait_for(changes, "critical")
        nursery.cancel_scope.cancel()  # cancellation ends run() cleanly
    assert changes.calls == [("passing", "exit 0: up"), ("critical", "exit 2: down")]
    assert (r.health, r.output) == ("critical", "exit 2: down")


# -- parse_duration and CheckSpec validation ---------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("10s", 10.0), ("500ms", 0.5), ("1m", 60.0), ("1.5s", 1.5), (3, 3.0), (0.25, 0.25), ("1m30s", 90.0),
     ("2h", 7200.0), ("5", 5.0), (" 10s ", 10.0), (".5s", 0.5), ("0s", 0.0)],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "s", "10x", "-1s", "1.5.5s", "10 s", "ms", "1s2", "1e3s", "nan", "10S", True, None, [], math.nan,
     math.inf, -1],
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(ValueError, match="bad duration") as exc:
        parse_duration(text)  # type: ignore[arg-type]
    assert "\n" not in str(exc.value)


@SETTINGS
@given(st.integers(0, 10**9))
def test_parse_duration_units_agree(n: int) -> None:
    assert parse_duration(f"{n}ms") == pytest.approx(n / 1000)
    assert parse_duration(f"{n}s") == parse_duration(n) == n


GOOD: dict[str, object] = {"type": "http", "target": "http://127.0.0.1:8080/health"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"type": "grpc"}, "unknown check type 'grpc'"),
        ({"intervl": "10s"}, "unknown check field 'intervl'"),
        ({"target": 8080}, "target must be a string"),
        ({"interval": "fast"}, "interval: bad duration 'fast'"),
        ({"interval": 0}, "interval must be a positive"),
        ({"interval": "0s"}, "interval must be a positive"),
        ({"timeout": -1}, "timeout: bad duration -1"),
        ({"timeout": [2]}, "timeout: bad duration"),
        ({"success_before_passing": 0}, "success_before_passing must be a whole number of at least 1"),
        ({"failures_before_critical": "2"}, "failures_before_critical must be a whole number"),
        ({"failures_before_critical": True}, "failures_before_critical must be a whole number"),
        ({"failures_before_critical": 1.5}, "failures_before_critical must be a whole number"),
        ({"target": "https://example.com/"}, "https checks are not supported"),
        ({"target": "ftp://example.com/"}, "bad http target"),
        ({"target": "http:///path"}, "bad http target"),
        ({"target": "http://h:99999/"}, "port must be a number from 1 to 65535"),
        ({"target": "http://h:0/"}, "port must be a number from 1 to 65535"),
        ({"target": "http://user:pw@h/"}, "credentials"),
        ({"target": "http://h/a b"}, "without spaces"),
        ({"type": "tcp", "target": "nohost"}, "bad tcp target 'nohost'"),
        ({"type": "tcp", "target": "h:0"}, "port must be a number from 1 to 65535"),
        ({"type": "tcp", "target": "h:70000"}, "port must be a number from 1 to 65535"),
        ({"type": "tcp", "target": "::1:80"}, "bad tcp target"),
        ({"type": "tcp", "target": "[::1]80"}, "bad tcp target"),
        ({"type": "tcp", "target": ":80"}, "bad tcp target"),
        ({"type": "exec", "target": "   "}, "exec check needs a command"),
    ],
)
def test_from_dict_rejects(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        CheckSpec.from_dict({**GOOD, **changes})
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("missing", ["type", "target"])
def test_from_dict_requires_type_and_target(missing: str) -> None:
    d = dict(GOOD)
    del d[missing]
    with pytest.raises(ValueError, match=f"missing '{missing}'"):
        CheckSpec.from_dict(d)


def test_from_dict_rejects_a_non_object() -> None:
    with pytest.raises(ValueError, match="must be an object"):
        CheckSpec.from_dict(["tcp"])  # type: ignore[arg-type]


def test_from_dict_durations_and_defaults() -> None:
    s = CheckSpec.from_dict({"type": "tcp", "target": "[::1]:53", "interval": "1m", "timeout": "500ms"})
    assert s == CheckSpec("tcp", "[::1]:53", interval=60.0, timeout=0.5)
    assert CheckSpec.from_dict(GOOD) == CheckSpec("http", "http://127.0.0.1:8080/health", 10.0, 2.0, 1, 1)
    # A timeout longer than the interval is refused (see the test below).
    with pytest.raises(ValueError, match="longer than the interval"):
        CheckSpec.from_dict({**GOOD, "interval": 1, "timeout": 5})


def test_validate_catches_direct_construction() -> None:
    with pytest.raises(ValueError, match="interval must be a positive"):
        CheckSpec("tcp", "h:1", interval=math.inf).validate()
    with pytest.raises(ValueError, match="unknown check type"):
        CheckSpec("TCP", "h:1").validate()
    with pytest.raises(ValueError, match="timeout must be a positive"):
        CheckRunner(CheckSpec("exec", "true", timeout=0), Changes())


hosts = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "db.internal", "10.0.0.7"])
positive = st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)
specs = st.builds(
    CheckSpec,
    type=st.just("tcp"),
    target=st.builds(lambda h, p: f"{h}:{p}", hosts, st.integers(1, 65535)),
    interval=positive,
    timeout=positive,
    success_before_passing=st.integers(1, 50),
    failures_before_critical=st.integers(1, 50),
) | st.builds(
    CheckSpec,
    type=st.just("http"),
    target=st.builds(lambda h, p, path: f"http://{h}:{p}/{path}", hosts, st.integers(1, 65535),
                     st.from_regex(r"[a-z0-9/]{0,12}(\?[a-z]=[0-9])?", fullmatch=True)),
    interval=positive,
) | st.builds(CheckSpec, type=st.just("exec"), target=st.text(min_size=1).filter(lambda t: t.strip() and "\0" not in t))
specs = specs.filter(lambda s: s.timeout <= s.interval)  # validate() refuses the rest


@SETTINGS
@given(specs)
def test_to_dict_round_trips_through_json(s: CheckSpec) -> None:
    s.validate()
    d = s.to_dict()
    assert list(d) == ["type", "target", "interval", "timeout", "success_before_passing", "failures_before_critical"]
    assert CheckSpec.from_dict(json.loads(json.dumps(d))) == s


def test_exec_target_with_nul_is_rejected() -> None:
    with pytest.raises(ValueError, match="NUL"):
        CheckSpec("exec", "true\0").validate()


async def test_exec_sees_the_agent_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_HEALTH_TEST", "hello")
    assert await probe(CheckSpec("exec", 'echo "$MESH_HEALTH_TEST"')) == ("passing", "exit 0: hello")


def test_a_timeout_longer_than_the_interval_is_refused_and_a_default_one_fits_a_short_interval() -> None:
    with pytest.raises(ValueError, match="longer than the interval"):
        CheckSpec.from_dict({"type": "tcp", "target": "127.0.0.1:1", "interval": "1s", "timeout": "5s"})
    assert CheckSpec.from_dict({"type": "tcp", "target": "127.0.0.1:1", "interval": "200ms"}).timeout == 0.2
    assert CheckSpec.from_dict({"type": "tcp", "target": "127.0.0.1:1", "interval": "1m"}).timeout == 2.0
