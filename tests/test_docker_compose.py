"""docker-compose.yml run for real: the image built, the eleven containers up on a Docker engine.

The image is built the way a machine without access to an image registry or
the package index builds it (docker/build-offline.sh: a Debian base made with
mmdebstrap, wheels made on the host), since that is the only way that works
here and the default build differs from it only in those two build arguments.
Everything the test makes carries a name of its own -- the compose project,
the image, the wheel directory, the base image unless one already exists --
and is removed when the test ends, whatever failed; the teardown checks that
nothing of the project is left.

Needs root, Docker (docker.io: the engine; docker-compose) and mmdebstrap; a
stopped engine is started for the test and stopped after it.  Skipped where
no engine can start, which fails the run in CI (tests/conftest.py).

The timings (build, up to healthy, kill to dead, the client's slowest call
around the kill) are printed, not asserted: ``pytest -s`` shows them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from gossip.keyring import generate_key
from simulations.harness import ROOT, wait_for

pytestmark = pytest.mark.slow

COMPOSE = ROOT / "docker-compose.yml"
BUILD_OFFLINE = ROOT / "docker" / "build-offline.sh"
#: What `make docker-offline` builds on; reused when it exists (it takes mmdebstrap about 20 s).
SHARED_BASE = "mesh-agent-base:bookworm"
AGENTS = [f"agent{i}" for i in range(1, 6)]
WEB = {"web-1": "agent2", "web-2": "agent3", "web-3": "agent4"}
ANSWER = re.compile(r"^(\S+) instance=(\S+) node=\S+ ([\d.]+) ms$")
FAILURE = re.compile(r"^(\S+) error: (.*)$")


def _run(args: list[str], timeout: float = 120, check: bool = True, cwd: Path | None = None,
         env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env, input=stdin)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args[:6])} ... failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def _engine_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker engine that answers: the running one, or one started here (and stopped after)."""
    for tool, package in (("docker", "docker.io"), ("docker-compose", "docker-compose"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {package}; .ci/run does)")
    started: subprocess.Popen[bytes] | None = None
    if not _engine_answers():
        if shutil.which("dockerd") is None or os.geteuid() != 0:
            pytest.skip("no Docker engine answers, and none can be started here (needs root and dockerd)")
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with log.open("wb") as out:
            started = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not _engine_answers():
            if started.poll() is not None or time.monotonic() > deadline:
                started.kill()
                pytest.skip(f"the Docker engine would not start: {log.read_text(errors='replace')[-500:]}")
            time.sleep(0.5)
    try:
        yield
    finally:
        if started is not None:
            started.terminate()
            try:
                started.wait(30)
            except subprocess.TimeoutExpired:
                started.kill()


# -- the demo as a compose project of its own -----------------------------------------------------


@dataclass
class Demo:
    project: str
    image: str
    base: str
    wheels: str
    env: dict[str, str]
    env_file: Path
    images_before: set[str]
    timings: dict[str, float] = field(default_factory=dict)
    _cids: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["docker-compose", "-p", self.project, "-f", str(COMPOSE), "--env-file", str(self.env_file),
                     *args], timeout=timeout, check=check, env=self.env, cwd=ROOT)

    def cid(self, service: str) -> str:
        """The container of a service (looked up again after a re-creation: call ``forget``)."""
        if service not in self._cids:
            out = self.compose("ps", "-q", service).stdout.strip()
            assert out, f"no container for {service}"
            self._cids[service] = out
        return self._cids[service]

    def forget(self, *services: str) -> None:
        for s in services:
            self._cids.pop(s, None)

    def cli(self, agent: str, *args: str, timeout: float = 30) -> str:
        """`mesh-agent ARGS` inside the agent's container, as `docker compose exec` runs it."""
        return _run(["docker", "exec", self.cid(agent), "mesh-agent", *args], timeout=timeout).stdout

    def members(self, agent: str) -> dict[str, str] | None:
        p = subprocess.run(["docker", "exec", self.cid(agent), "mesh-agent", "members", "--json"],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            return None
        return {m["name"]: m["status"] for m in json.loads(p.stdout)}

    def health(self, service: str) -> str:
        return _run(["docker", "inspect", "--format", "{{.State.Health.Status}}", self.cid(service)]).stdout.strip()

    def logs(self, service: str) -> list[str]:
        """The service's log lines, each led by Docker's timestamp."""
        return self.compose("logs", "--no-color", "--timestamps", service).stdout.splitlines()

    def client_calls(self) -> list[tuple[float, str | None, float | None, str]]:
        """(when it ended, instance or None, milliseconds or None, the line) per call the client printed."""
        out = []
        for line in self.logs("client"):
            text = line.split("| ", 1)[-1].strip()
            if m := ANSWER.match(text):
                out.append((_when(m.group(1)), m.group(2), float(m.group(3)), text))
            elif m := FAILURE.match(text):
                out.append((_when(m.group(1)), None, None, text))
        return out

    def log_events(self, service: str, event: str, name: str) -> list[float]:
        """When the service logged ``event`` about member ``name`` (Docker's timestamps)."""
        out = []
        for line in self.logs(service):
            text = line.split("| ", 1)[-1].strip()
            stamp, _, rest = text.partition(" ")
            if f" {event} " in f" {rest} " and re.search(rf"\bname={re.escape(name)}\b", rest):
                out.append(_when(stamp))
        return out


def _when(stamp: str) -> float:
    """Docker's RFC 3339 timestamp (nanoseconds, Z) as a Unix time."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def _all_images() -> set[str]:
    return set(_run(["docker", "image", "ls", "-a", "-q", "--no-trunc"]).stdout.split())


@pytest.fixture
def demo(engine: None, tmp_path: Path) -> Iterator[Demo]:
    tag = f"{os.getpid()}{secrets.token_hex(3)}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "COMPOSE_", "DOCKER_"))}
    shared_base = subprocess.run(["docker", "image", "inspect", SHARED_BASE], capture_output=True).returncode == 0
    d = Demo(
        project=f"meshtest{tag}",
        image=f"mesh-agent-test:{tag}",
        base=SHARED_BASE if shared_base else f"mesh-agent-test-base:{tag}",
        wheels=f"build/wheels-test-{tag}",
        env={**env, "MESH_CLUSTER_KEY": generate_key()},
        env_file=tmp_path / "empty.env",  # not ./.env: a developer's own key and settings stay out of it
        images_before=_all_images(),
    )
    d.env_file.write_text("")
    d.env.update(MESH_IMAGE=d.image, MESH_BASE_IMAGE=d.base, MESH_WHEELS=d.wheels)
    try:
        yield d
    finally:
        d.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=180, check=False)
        made = [d.image] + ([] if shared_base else [d.base])
        subprocess.run(["docker", "rmi", "--force", *made], capture_output=True, timeout=120)
        # Whatever else the build left (the build stage's images), and nothing that was there before.
        for image in _all_images() - d.images_before:
            subprocess.run(["docker", "rmi", image], capture_output=True, timeout=60)
        shutil.rmtree(ROOT / d.wheels, ignore_errors=True)
        label = f"label=com.docker.compose.project={d.project}"
        left = (_run(["docker", "ps", "-a", "-q", "--filter", label]).stdout.split()
                + _run(["docker", "network", "ls", "-q", "--filter", label]).stdout.split())
        images = _all_images() - d.images_before
        assert not left and not images, f"left behind: containers/networks {left}, images {sorted(images)}"


def _wait_members(d: Demo, expect: dict[str, str], observers: list[str], timeout: float, what: str) -> None:
    views: dict[str, dict[str, str] | None] = {}

    def ok() -> bool:
        for o in observers:
            views[o] = d.members(o)
        return all(v is not None and all(v.get(n) == s for n, s in expect.items()) for v in views.values())

    wait_for(ok, timeout, what, lambda: json.dumps(views, indent=1), interval=0.3)


def _passing(d: Demo, agent: str, service: str) -> set[str]:
    return {r["id"] for r in json.loads(d.cli(agent, "services", "show", "--passing", "--json", service))}


def test_the_demo_runs_on_a_docker_engine(demo: Demo) -> None:
    d = demo
    # -- build: the offline path (docker/build-offline.sh), then compose's own build reaches the same image.
    t0 = time.monotonic()
    _run([str(BUILD_OFFLINE)], timeout=900, cwd=ROOT,
         env={**d.env, "PYTHON": sys.executable})
    d.timings["build_s"] = time.monotonic() - t0
    image_id = _run(["docker", "image", "inspect", "--format", "{{.Id}}", d.image]).stdout.strip()
    d.compose("build", "agent1")  # compose passes MESH_BASE_IMAGE / MESH_WHEELS as the build arguments
    assert _run(["docker", "image", "inspect", "--format", "{{.Id}}", d.image]).stdout.strip() == image_id
    size = int(_run(["docker", "image", "inspect", "--format", "{{.Size}}", d.image]).stdout)
    user = _run(["docker", "run", "--rm", "--entrypoint", "id", d.image, "-u"]).stdout.strip()
    assert user == "10001", "the agent runs as the image's unprivileged user"

    # -- up, and every agent healthy by the image's own health check.
    t0 = time.monotonic()
    d.compose("up", "-d")
    wait_for(lambda: all(d.health(a) == "healthy" for a in AGENTS), 180, "every agent container healthy",
             lambda: str({a: d.health(a) for a in AGENTS}), interval=0.5)
    d.timings["up_to_healthy_s"] = time.monotonic() - t0
    _wait_members(d, dict.fromkeys(AGENTS, "alive"), AGENTS, 90, "every agent sees all five alive")
    table = d.cli("agent1", "members")
    assert sum(1 for line in table.splitlines() if " alive " in line) == 5, table
    wait_for(lambda: _passing(d, "agent1", "web") == set(WEB) and _passing(d, "agent1", "api") == {"api-1", "api-2"},
             90, "web 3/3 and api 2/2 passing", lambda: d.cli("agent1", "services"))
    services = d.cli("agent1", "services")
    assert re.search(r"^api\s+2\s+2\s*$", services, re.M) and re.search(r"^web\s+3\s+3\s*$", services, re.M), services
    wait_for(lambda: {c[1] for c in d.client_calls()} >= set(WEB), 120, "the client hears web-1, web-2 and web-3",
             lambda: "\n".join(c[3] for c in d.client_calls()[-10:]))
    for _, instance, _, _ in d.client_calls():
        assert instance is None or instance in WEB

    # -- kill agent3: seen dead, and the client's calls go on without a failure.
    steady = len(d.client_calls())
    kill_at = time.time()
    d.compose("kill", "agent3")
    others = [a for a in AGENTS if a != "agent3"]
    _wait_members(d, {"agent3": "dead"}, others, 60, "the other agents see agent3 dead")
    dead_at = max(max(d.log_events(a, "member_dead", "agent3"), default=kill_at) for a in others)
    d.timings["kill_to_dead_s"] = dead_at - kill_at
    wait_for(lambda: len(d.client_calls()) >= steady + 20 and
             all(c[1] != "web-2" for c in d.client_calls()[-6:]),
             60, "the client's calls move to web-1 and web-3", lambda: "\n".join(c[3] for c in d.client_calls()[-10:]))
    calls = d.client_calls()
    around = [c for c in calls if kill_at - 1 <= c[0] <= dead_at + 3 and c[2] is not None]
    d.timings["worst_call_around_kill_ms"] = max((c[2] for c in around if c[2] is not None), default=0.0)
    failures = [c[3] for c in calls[steady - 1:] if c[1] is None]
    assert not failures, failures
    # Had the client's agent dialled the vanished agent3, its callers left after a few RTTs, not a timeout.
    # The dial itself goes on and may time out later (a late session is kept): that is fine, as long as
    # nobody was still waiting for it (abandoned_by=0).
    dials = [line for line in d.logs("agent5") if "tunnel_d" in line and "agent3" in line]
    waited_out = [line for line in dials if "tunnel_dial_failed" in line and "abandoned_by=0" in line
                  and " in 2s" in line]
    assert not waited_out, dials
    d.timings["dials_to_agent3_given_up_at_rtt_bound"] = sum("tunnel_dial_rtt_bound" in line for line in dials)

    # -- back: agent3 and web-2 re-created, it rejoins and web-2 answers again.
    d.compose("up", "-d", "--force-recreate", "agent3", "web-2")
    d.forget("agent3", "web-2")
    _wait_members(d, dict.fromkeys(AGENTS, "alive"), AGENTS, 90, "agent3 rejoined: all five alive everywhere")
    wait_for(lambda: _passing(d, "agent5", "web") == set(WEB), 90, "web-2 passing again")
    mark = len(d.client_calls())
    wait_for(lambda: "web-2" in {c[1] for c in d.client_calls()[mark:]}, 90, "the client hears web-2 again",
             lambda: "\n".join(c[3] for c in d.client_calls()[-10:]))
    failures = [c[3] for c in d.client_calls()[steady - 1:] if c[1] is None]
    assert not failures, failures

    # -- down: every agent leaves gracefully, and the others log it (read as it happens: down removes the logs).
    logs: list[str] = []
    follower = subprocess.Popen(
        ["docker-compose", "-p", d.project, "-f", str(COMPOSE), "--env-file", str(d.env_file), "logs", "-f",
         "--no-color", *AGENTS], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=d.env, cwd=ROOT)
    reader = threading.Thread(target=lambda: logs.extend(follower.stdout or []), daemon=True)
    reader.start()
    try:
        time.sleep(2)  # the follower has attached to every container
        d.compose("down", "--timeout", "20", timeout=180)
    finally:
        follower.wait(30)
        reader.join(10)
    left_seen = {a: {n for line in logs if line.startswith(a) and " member_left " in line
                     for n in re.findall(r"\bname=(agent\d)\b", line)} for a in AGENTS}
    for a in AGENTS:
        assert any(line.startswith(a) and " leaving " in line for line in logs), f"{a} did not leave gracefully"
        seen_by = [o for o in AGENTS if a in left_seen[o]]
        assert seen_by, f"no other agent logged {a}'s graceful leave: {left_seen}"
    assert _run(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={d.project}"]).stdout == ""

    print(f"\ndocker-compose demo: image {size / 1e6:.0f} MB; "
          + ", ".join(f"{k} {v:.2f}" for k, v in d.timings.items()))


def test_the_build_context_keeps_secrets_out(engine: None, tmp_path: Path) -> None:
    """What .dockerignore lets through, as the engine itself reads it: no .env, no key, no venv, no .git."""
    ctx = tmp_path / "ctx"
    shutil.copytree(ROOT, ctx, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "__pycache__", ".*_cache"))
    for decoy in (".env", "agent/.env", ".env.local", ".venv/bin/python", ".git/config", "cluster.key",
                  "dataplane/tls.pem", "notes.txt", "build/other/x.whl"):
        (ctx / decoy).parent.mkdir(parents=True, exist_ok=True)
        (ctx / decoy).write_text("secret")
    (ctx / "build/wheels/x.whl").parent.mkdir(parents=True)
    (ctx / "build/wheels/x.whl").write_text("wheel")
    tag = f"mesh-agent-ctx-test:{os.getpid()}{secrets.token_hex(3)}"
    before = _all_images()
    cid = ""
    try:
        # The context copied into an empty image, read back as the container's file system.
        _run(["docker", "build", "-q", "-t", tag, "-f", "-", str(ctx)], stdin="FROM scratch\nCOPY . /ctx\n")
        cid = _run(["docker", "create", "--entrypoint", "/none", tag]).stdout.strip()
        listing = subprocess.run(f"docker export {cid} | tar -t", shell=True, capture_output=True, text=True,
                                 timeout=60, check=True).stdout
    finally:
        if cid:
            subprocess.run(["docker", "rm", "--force", cid], capture_output=True, timeout=60)
        subprocess.run(["docker", "rmi", "--force", tag], capture_output=True, timeout=60)
        for image in _all_images() - before:
            subprocess.run(["docker", "rmi", image], capture_output=True, timeout=60)
    files = {f.removeprefix("ctx/") for f in listing.split() if f.startswith("ctx/") and not f.endswith("/")}
    assert {"pyproject.toml", "README.md", "agent/runner.py", "build/wheels/x.whl"} <= files
    leaked = {f for f in files if re.search(r"(^|/)(\.env|\.venv|\.git|notes\.txt|other)|\.(key|pem)$", f)}
    assert not leaked, leaked
