"""Health checks for registered service instances: tcp, http and exec probes.

A check answers one question for the mesh: may traffic be routed to this
instance?  So a check starts ``critical`` (as in Consul: not routable until
proven) and its state only flips after a run of consecutive results, so that
one slow answer does not pull a healthy instance out of rotation and one lucky
answer does not put a broken one back.

Probes never raise for a failing service: every failure -- refused, timed out,
garbage on the wire, a crashed command -- is a ``critical`` result with a short
human-readable line, because "the check could not tell" must not be mistaken
for "healthy".  Everything is plain trio: no threads.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio

from agent import log
from agent.durations import parse_duration as parse_duration  # re-exported: checks' intervals are durations

HEALTH = ("passing", "warning", "critical")
CHECK_TYPES = ("tcp", "http", "exec")

JITTER = 0.1
"""Each wait is the interval times a random factor in [1 - JITTER, 1 + JITTER], so that instances started
together drift apart instead of probing in lockstep."""

OUTPUT_LIMIT = 200
"""Longest output line kept: it is for people reading ``members``/API output, not a log store."""

EXEC_CAPTURE_LIMIT = 4096
"""Bytes of command output kept (as Consul); the rest is read and dropped so the command never blocks on a full pipe."""

EXEC_DRAIN_GRACE = 0.1
"""After the command exits, how long to wait for its output pipe to close.  A background child that inherited the
pipe must not hold the check open until its timeout."""

USER_AGENT = "mesh-agent health check"

_FIELDS = ("type", "target", "interval", "timeout", "success_before_passing", "failures_before_critical")


def _parse_host_port(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; port 0 is refused since nothing can listen there for us to reach."""
    bad = f"bad tcp target {target!r}: expected host:port or [v6]:port"
    if target != target.strip() or not target:
        raise ValueError(bad)
    if target.startswith("["):
        end = target.find("]")
        if end < 0 or not target[end + 1 :].startswith(":"):
            raise ValueError(bad)
        host, port_text = target[1:end], target[end + 2 :]
    elif target.count(":") == 1:
        host, port_text = target.split(":")
    else:
        raise ValueError(bad)
    if not host or any(c.isspace() or c in "[]/" for c in host):
        raise ValueError(bad)
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad tcp target {target!r}: port must be a number from 1 to 65535")
    return host, int(port_text)


@dataclass(frozen=True)
class _HttpTarget:
    host: str
    port: int
    host_header: str
    path: str


def _parse_http_url(target: str) -> _HttpTarget:
    """Only plain ``http://``: the agent holds no CA bundle policy yet, and a check that silently skips verification
    would be worse than none."""
    bad = f"bad http target {target!r}: expected http://host[:port]/path"
    if not target.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in target):
        raise ValueError(f"bad http target {target!r}: URL must be ASCII without spaces (percent-encode the rest)")
    try:
        split = urlsplit(target)
        port = split.port
    except ValueError:
        raise ValueError(f"bad http target {target!r}: port must be a number from 1 to 65535") from None
    scheme = split.scheme.lower()
    if scheme == "https":
        raise ValueError(f"https checks are not supported: {target!r} (use an http:// URL or a tcp check)")
    if scheme != "http" or not split.hostname:
        raise ValueError(bad)
    if "@" in split.netloc:
        raise ValueError(f"bad http target {target!r}: credentials in the URL are not supported")
    if port == 0:
        raise ValueError(f"bad http target {target!r}: port must be a number from 1 to 65535")
    path = split.path or "/"
    if split.query:
        path += "?" + split.query
    return _HttpTarget(split.hostname, port or 80, split.netloc, path)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class CheckSpec:
    """What to probe and how often; immutable so a running check can be compared with a re-registered one."""

    type: str
    target: str
    interval: float = 10.0
    timeout: float = 2.0
    success_before_passing: int = 1
    failures_before_critical: int = 1

    def validate(self) -> None:
        """Raise ValueError with a one-line reason.

        A timeout longer than the interval is refused: the check would be late
        on every slow probe, and the interval the operator asked for would be a lie.
        """
        if not isinstance(self.type, str) or self.type not in CHECK_TYPES:
            raise ValueError(f"unknown check type {self.type!r}: use tcp, http or exec")
        if not isinstance(self.target, str):
            raise ValueError(f"check target must be a string, not {type(self.target).__name__}")
        if self.type == "tcp":
            _parse_host_port(self.target)
        elif self.type == "http":
            _parse_http_url(self.target)
        elif not self.target.strip():
            raise ValueError("exec check needs a command")
        elif "\x00" in self.target:
            raise ValueError("exec check command contains a NUL byte")
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {json.dumps(value)}")
        if self.timeout > self.interval:
            raise ValueError(f"timeout ({self.timeout:g}s) is longer than the interval ({self.interval:g}s): "
                             "give a timeout no longer than the interval")
        for name in ("success_before_passing", "failures_before_critical"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {json.dumps(value)}")

    def to_dict(self) -> dict[str, object]:
        return {
            "type": self.type,
            "target": self.target,
            "interval": float(self.interval),
            "timeout": float(self.timeout),
            "success_before_passing": self.success_before_passing,
            "failures_before_critical": self.failures_before_critical,
        }

    @staticmethod
    def from_dict(d: dict[str, object]) -> CheckSpec:
        """Build and validate a spec from JSON-ish input; unknown keys are errors so a typo is not silently ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"a check must be an object with keys {', '.join(_FIELDS)}")
        unknown = sorted(str(k) for k in d if k not in _FIELDS)
        if unknown:
            raise ValueError(f"unknown check field {unknown[0]!r}: expected {', '.join(_FIELDS)}")
        for key in ("type", "target"):
            if key not in d:
                raise ValueError(f"check is missing {key!r}")
            if not isinstance(d[key], str):
                raise ValueError(f"check {key} must be a string, not {type(d[key]).__name__}")
        kwargs: dict[str, Any] = {"type": d["type"], "target": d["target"]}
        for key in ("interval", "timeout"):
            if key in d:
                raw = d[key]
                if not isinstance(raw, (str, int, float)):
                    raise ValueError(f"{key}: bad duration {raw!r}")
                try:
                    kwargs[key] = parse_duration(raw)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        if "timeout" not in kwargs and "interval" in kwargs and _is_number(kwargs["interval"]):
            # The default timeout never outlasts a short interval the operator chose.
            kwargs["timeout"] = min(CheckSpec.timeout, kwargs["interval"])
        for key in ("success_before_passing", "failures_before_critical"):
            if key in d:
                kwargs[key] = d[key]  # validate() says what is wrong with it
        spec = CheckSpec(**kwargs)
        spec.validate()
        return spec


# -- probes --------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    """The first non-blank line, shortened: outputs end up in tables and one-line logs."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(line) > OUTPUT_LIMIT:
        line = line[: OUTPUT_LIMIT - 3] + "..."
    return line


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _connect_error(exc: OSError) -> str:
    """Name the usual suspects plainly; trio wraps per-address failures in a group behind a generic message."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    causes: list[BaseException] = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        causes = list(cause.exceptions)
    if all(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connect refused"
    first = causes[0]
    if isinstance(first, OSError) and first.errno is not None:
        return f"connect failed: {first.strerror or errno.errorcode.get(first.errno, first.errno)}"
    return f"connect failed: {first}"


async def _probe_tcp(spec: CheckSpec) -> tuple[str, str]:
    host, port = _parse_host_port(spec.target)
    with trio.move_on_after(spec.timeout):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return "critical", _one_line(_connect_error(exc))
        await trio.aclose_forcefully(stream)
        return "passing", f"TCP connect {spec.target}: success"
    return "critical", f"connect timed out after {_seconds(spec.timeout)}"


def _http_health(status: int) -> str:
    if 200 <= status < 300:
        return "passing"
    if status == 429:  # the service is up but shedding load: keep it visible, but say so
        return "warning"
    return "critical"


async def _probe_http(spec: CheckSpec) -> tuple[str, str]:
    """One GET; only the status line and headers are awaited, so a slow or endless body does not matter.

    Redirects are not followed: a health endpoint that redirects is misconfigured, and following it could
    send the probe somewhere else entirely.
    """
    import h11  # loaded by the first HTTP check: an agent with none never pays for it

    url = _parse_http_url(spec.target)
    phase = "connect"
    with trio.move_on_after(spec.timeout):
        try:
            stream = await trio.open_tcp_stream(url.host, url.port)
        except OSError as exc:
            return "critical", _one_line(_connect_error(exc))
        phase = "waiting for a response"
        try:
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(
                method="GET",
                target=url.path,
                headers=[
                    ("host", url.host_header),
                    ("user-agent", USER_AGENT),
                    ("accept", "*/*"),
                    ("connection", "close"),
                ],
            )
            await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return "critical", "connection closed without an HTTP response"
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    reason = event.reason.decode("ascii", "replace")
                    line = f"HTTP {event.status_code}" + (f" {reason}" if reason else "")
                    return _http_health(event.status_code), _one_line(line)
                elif isinstance(event, h11.InformationalResponse):
                    continue  # 100 Continue and friends: the real answer follows
                else:
                    return "critical", "connection closed without an HTTP response"
        except h11.RemoteProtocolError as exc:
            return "critical", _one_line(f"bad HTTP response: {exc}")
        except h11.LocalProtocolError as exc:
            return "critical", _one_line(f"cannot send request: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__
            detail = cause.strerror if isinstance(cause, OSError) and cause.strerror else "connection broken"
            return "critical", _one_line(f"HTTP request failed: {detail}")
        except OSError as exc:
            return "critical", _one_line(f"HTTP request failed: {exc.strerror or exc}")
        finally:
            await trio.aclose_forcefully(stream)
    return "critical", f"timed out after {_seconds(spec.timeout)} ({phase})"


async def _collect(stream: trio.abc.ReceiveStream, into: bytearray, eof: trio.Event) -> None:
    while True:
        data = await stream.receive_some(65536)
        if not data:
            eof.set()
            return
        room = EXEC_CAPTURE_LIMIT - len(into)
        if room > 0:
            into += data[:room]


def _kill_group(proc: trio.Process) -> None:
    """The command runs in its own session: kill the whole group, or ``sh -c 'a | b'`` leaves orphans behind."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


async def _probe_exec(spec: CheckSpec) -> tuple[str, str]:
    """Nagios plugin convention: exit 0 passing, 1 warning, anything else critical; stdout+stderr interleaved."""
    try:
        proc = await trio.lowlevel.open_process(
            ["/bin/sh", "-c", spec.target],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return "critical", _one_line(f"cannot start /bin/sh: {exc.strerror or exc}")
    assert proc.stdout is not None
    captured = bytearray()
    code: int | None = None
    try:
        with trio.move_on_after(spec.timeout):
            async with trio.open_nursery() as nursery:
                eof = trio.Event()
                nursery.start_soon(_collect, proc.stdout, captured, eof)
                code = await proc.wait()
                with trio.move_on_after(EXEC_DRAIN_GRACE):
                    await eof.wait()
                nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            _kill_group(proc)
            with trio.move_on_after(5, shield=True):
                await proc.wait()
        with trio.CancelScope(shield=True):
            await proc.stdout.aclose()
    if code is None:
        return "critical", f"timed out after {_seconds(spec.timeout)}"
    text = _one_line(captured.decode("utf-8", "replace"))
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        head = f"killed by signal {name}"
    else:
        head = f"exit {code}"
    health = "passing" if code == 0 else "warning" if code == 1 else "critical"
    return health, _one_line(f"{head}: {text}" if text else head)


async def probe(spec: CheckSpec) -> tuple[str, str]:
    """Run one check, bounded by ``spec.timeout``; returns (health, one line for humans).

    A failing service is a result, not an exception.  ValueError means the spec itself is invalid.
    """
    if spec.type == "tcp":
        return await _probe_tcp(spec)
    if spec.type == "http":
        return await _probe_http(spec)
    if spec.type == "exec":
        return await _probe_exec(spec)
    raise ValueError(f"unknown check type {spec.type!r}: use tcp, http or exec")


# -- the runner --------------------------------------------------------------------------------


class CheckRunner:
    """Runs one instance's check forever: an immediate first probe, then every interval (with a small random jitter
    to avoid synchronised checks), applying the thresholds.

    Threshold rules, kept deliberately simple:

    * leaving ``passing`` takes ``failures_before_critical`` consecutive non-passing results; the new state is the
      latest of them (``warning`` or ``critical``);
    * entering ``passing`` takes ``success_before_passing`` consecutive passing results;
    * while already non-passing, a ``warning``/``critical`` result is applied at once: both keep the instance out of
      rotation, so damping the change between them would only hide information.

    ``output`` is the output of the latest result that was applied, so it always explains ``health``; a result held
    back by a threshold changes neither.  Probes never overlap: each starts an interval after the previous one
    started, or at once if that one took longer than the interval.
    """

    def __init__(self, spec: CheckSpec, on_change: Callable[[str, str], None], initial: str = "critical") -> None:
        spec.validate()
        if initial not in HEALTH:
            raise ValueError(f"unknown health {initial!r}: use passing, warning or critical")
        self.spec = spec
        self.on_change = on_change
        self._health = initial
        self._output = ""
        self._passes = 0
        self._failures = 0
        self._rng = random.Random()
        self.log = log.get("mesh.health")

    @property
    def health(self) -> str:
        return self._health

    @property
    def output(self) -> str:
        return self._output

    def record(self, result: str, output: str = "") -> bool:
        """Apply one probe result; True (after calling ``on_change``) only if the state flipped."""
        if result not in HEALTH:
            raise ValueError(f"unknown health {result!r}: use passing, warning or critical")
        if result == "passing":
            self._passes += 1
            self._failures = 0
            apply = self._health == "passing" or self._passes >= self.spec.success_before_passing
        else:
            self._failures += 1
            self._passes = 0
            apply = self._health != "passing" or self._failures >= self.spec.failures_before_critical
        if not apply:
            return False
        changed = result != self._health
        # A check starts critical with no reason given: its first failing result is the reason.
        first_reason = result != "passing" and bool(output) and not self._output
        self._health = result
        self._output = output
        if changed or first_reason:
            self.on_change(result, output)
        return changed

    async def _probe_once(self) -> tuple[str, str]:
        """One probe; a bug in a probe becomes a critical result rather than a dead runner."""
        try:
            return await probe(self.spec)
        except Exception as exc:
            self.log.exception("check_probe_failed", type=self.spec.type, target=self.spec.target)
            return "critical", _one_line(f"check error: {type(exc).__name__}: {exc}")

    def _next_delay(self) -> float:
        return self.spec.interval * self._rng.uniform(1.0 - JITTER, 1.0 + JITTER)

    async def run(self) -> None:
        """Probe forever; cancel the surrounding scope to stop (a running exec probe's processes are killed)."""
        while True:
            started = trio.current_time()
            health, output = await self._probe_once()
            if self.record(health, output):
                self.log.debug("check_state_changed", type=self.spec.type, target=self.spec.target,
                               health=health, output=output)
            await trio.sleep_until(started + self._next_delay())
