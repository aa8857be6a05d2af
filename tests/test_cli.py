"""The mesh-agent command line: one-line errors, contract-shaped JSON."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, resolve
from simulations.harness import ROOT, Cluster, free_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
    )


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_keygen_prints_32_random_bytes_and_writes_0600(tmp_path: Path) -> None:
    a, b = run("keygen"), run("keygen")
    assert a.returncode == 0
    assert len(base64.b64decode(a.stdout.strip())) == 32
    assert a.stdout != b.stdout
    out = tmp_path / "cluster.key"
    p = run("keygen", "--out", str(out))
    assert p.returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().strip() == p.stdout.strip()


@pytest.mark.parametrize("cmd", [["members"], ["info"], ["join", "127.0.0.1:1"], ["leave"], ["members", "--json"]])
def test_no_agent_answering_exits_1_with_one_line(cmd: list[str]) -> None:
    p = run(*cmd, "--api", f"127.0.0.1:{free_port()}")
    assert p.returncode == 1
    assert "no agent answering" in one_line_error(p)
    assert p.stdout == ""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--key", "not-base64!!"], "unusable cluster key"),
        (["--key", base64.b64encode(b"short").decode()], "32 bytes"),
        ([], "encrypted by default"),
        (["--insecure", "--profile", "moon"], "--profile"),
        (["--insecure", "--bind", "127.0.0.1:notaport"], "--bind"),
        (["--insecure", "--name", "bad name!"], "--name"),
        (["--key-file", "/nonexistent/key"], "does not exist"),
        (["--insecure", "--config", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_agent_bad_flags_give_one_line(args: list[str], needle: str) -> None:
    p = run("agent", "--name", "x", "--bind", f"127.0.0.1:{free_port()}", "--api", f"127.0.0.1:{free_port()}", *args)
    assert needle in one_line_error(p)


def test_agent_port_in_use_gives_one_line(cluster: Cluster) -> None:
    a = cluster.start("holder")
    p = run("agent", "--insecure", "--name", "y", "--bind", a.addr, "--api", f"127.0.0.1:{free_port()}")
    assert "already in use" in one_line_error(p)
    p = run("agent", "--insecure", "--name", "y", "--bind", f"127.0.0.1:{free_port()}", "--api", a.api)
    assert "already in use" in one_line_error(p)


def test_members_and_info_json_follow_the_contract(cluster: Cluster) -> None:
    s = cluster.start("c1")
    cluster.start("c2", join=[s.addr])
    cluster.wait_converged(["c1", "c2"])
    p = run("members", "--json", "--api", s.api)
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert [m["name"] for m in data] == ["c1", "c2"]
    for m in data:
        assert set(m) == {"name", "address", "status", "incarnation", "tags"}
        assert m["status"] == "alive" and isinstance(m["incarnation"], int)
    assert json.loads(run("members", "--json", "--status", "dead", "--api", s.api).stdout) == []
    table = run("members", "--api", s.api).stdout.splitlines()
    assert table[0].split() == ["NAME", "ADDRESS", "STATUS", "INCARNATION", "TAGS"]
    assert len(table) == 3
    info = json.loads(run("info", "--json", "--api", s.api).stdout)
    assert info["name"] == "c1" and info["address"] == s.addr
    assert info["members"]["alive"] == 2
    assert "dropped" in info["counters"]
    assert "dropped:" in run("info", "--api", s.api).stdout


_CLIENT_COMMANDS = (
    ["members", "--json"], ["info"], ["services"], ["upstreams"], ["intentions"], ["routes"],
    ["keys", "list"], ["rtt", "c1"], ["stat"], ["stat", "web", "--json"], ["tap", "Not_A_Name"],
)
#: Run every client command in one interpreter, then print which of our own
#: packages (and the protocol's dependencies) that interpreter ever imported.
_IMPORT_PROBE = """
import sys, click
from cli.main import main
for argv in {commands!r}:
    try:
        main(argv + ["--api", {api!r}], standalone_mode=False)
    except (SystemExit, click.ClickException):
        pass
watched = ("gossip", "agent", "dataplane", "msgpack", "nacl", "trio", "structlog")
print("IMPORTED", *sorted(m for m in sys.modules if m.split(".")[0] in watched))
"""


def test_client_commands_speak_only_http(cluster: Cluster) -> None:
    """What a client command prints comes from the agent, never from a protocol module it loaded."""
    s = cluster.start("c1")
    probe = _IMPORT_PROBE.format(commands=[list(c) for c in _CLIENT_COMMANDS], api=s.api)
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    assert '"name": "c1"' in p.stdout  # the commands did reach the agent
    imported = p.stdout.splitlines()[-1].split()[1:]
    # The one shared piece is the host:port parser, kept apart from the wire format for this.
    assert imported == ["gossip", "gossip.address"], p.stdout


_CODEC_PROBE = """
import sys
from cli.main import main
for argv in (["members"], ["info"], ["services"]):
    try:
        main(argv + ["--api", {api!r}], standalone_mode=False)
    except SystemExit:
        pass
print("LOADED", "encodings.idna" in sys.modules, "stringprep" in sys.modules)
"""


def test_the_commands_operators_call_all_day_load_no_idna_codec(cluster: Cluster) -> None:
    """``members``, ``info`` and ``services`` reach the agent by an ASCII name or address: the resolver is
    asked without Python's "idna" codec, which loads stringprep and unicodedata at every call."""
    s = cluster.start("c1")
    for api in (s.api, f"localhost:{s.api_port}"):
        p = subprocess.run([sys.executable, "-c", _CODEC_PROBE.format(api=api)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert p.returncode == 0, p.stderr
        assert "c1" in p.stdout  # the commands did reach the agent
        assert p.stdout.splitlines()[-1] == "LOADED False False", p.stdout


def test_join_command_and_env_api(cluster: Cluster) -> None:
    a = cluster.start("j1")
    b = cluster.start("j2")
    p = run("join", "--json", b.addr, env={"MESH_API": a.api})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["ok"] is True
    cluster.wait_converged(["j1", "j2"])
    bad = run("join", f"127.0.0.1:{free_port()}", "--api", a.api)
    assert bad.returncode == 1
    assert "joined through 0 of 1" in bad.stdout


def test_config_precedence_flag_env_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    key = run("keygen").stdout.strip()
    cfg.write_text(
        f'name = "from-file"\nbind = "127.0.0.1:1111"\njoin = ["10.0.0.1:7946"]\nkey = "{key}"\n'
        'profile = "wan"\n[timing]\nprobe_interval = 2.5\n[tags]\nrole = "web"\n'
    )
    c = resolve({"config": str(cfg)}, environ={})
    assert (c.name, c.bind, c.profile, c.gossip.probe_interval) == ("from-file", ("127.0.0.1", 1111), "wan", 2.5)
    assert c.join == [("10.0.0.1", 7946)] and c.tags == {"role": "web"}
    c = resolve({"config": str(cfg)}, environ={"MESH_NAME": "from-env", "MESH_JOIN": "a:1,b:2"})
    assert c.name == "from-env" and c.join == [("a", 1), ("b", 2)]
    c = resolve({"config": str(cfg), "name": "from-flag"}, environ={"MESH_NAME": "from-env"})
    assert c.name == "from-flag"
    assert c.tunnel == ("127.0.0.1", 7948)
    assert c.api == ("127.0.0.1", 7947)
    cfg.write_text('name = "x"\ninsecure = true\n[timing]\nprobe_intervl = 1\n')
    with pytest.raises(ConfigError, match="unknown timing setting"):
        resolve({"config": str(cfg)}, environ={})
    cfg.write_text('nmae = "x"\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        resolve({"config": str(cfg)}, environ={})


def test_key_file_is_read_and_loose_permissions_warned(tmp_path: Path) -> None:
    kf = tmp_path / "k"
    kf.write_text(run("keygen").stdout)
    kf.chmod(0o644)
    c = resolve({"name": "k", "key_file": str(kf)}, environ={})
    assert c.key is not None and len(c.key) == 32
    assert any("chmod 600" in w for w in c.warnings)
    kf.chmod(0o600)
    assert resolve({"name": "k", "key_file": str(kf)}, environ={}).warnings == []


def test_secret_key_never_logged(cluster: Cluster, cluster_key: str) -> None:
    a = cluster.start("quiet")
    assert cluster_key not in a.log()
