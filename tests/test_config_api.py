"""Config entries through a real agent's API and the CLI: write, read, list, check-and-set, delete, restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from simulations.harness import ROOT, Cluster


def cli(api: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args, "--api", api], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, input=stdin, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


CANARY = [
    {"kind": "service-defaults", "name": "web", "protocol": "http", "lb": "round_robin"},
    {"kind": "service-resolver", "name": "web", "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}}},
    {"kind": "service-splitter", "name": "web", "splits": [{"weight": 90, "subset": "v1"},
                                                           {"weight": 10, "subset": "v2"}]},
]


def test_write_read_list_cas_delete_and_restart(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.start("cfg1", extra=["--data-dir", str(tmp_path / "cfg1")])
    f = tmp_path / "canary.json"
    f.write_text(json.dumps(CANARY))
    p = cli(a.api, "config", "write", str(f))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and all(ln.startswith(f"wrote {e['kind']} web (version ")
                                   for e, ln in zip(CANARY, lines, strict=True)), p.stdout
    p = cli(a.api, "config", "write", "-", "--json",
            stdin=json.dumps({"kind": "intention", "source": "web", "destination": "db", "action": "deny"}))
    assert p.returncode == 0, p.stderr
    deny = json.loads(p.stdout)
    assert deny["name"] == "web/db" and deny["writer"] == "cfg1"

    listed = json.loads(cli(a.api, "config", "list", "--json").stdout)
    assert [(e["kind"], e["name"]) for e in listed] == [("intention", "web/db"), ("service-defaults", "web"),
                                                        ("service-resolver", "web"), ("service-splitter", "web")]
    assert [e["kind"] for e in json.loads(cli(a.api, "config", "list", "service-splitter", "--json").stdout)] \
        == ["service-splitter"]
    shown = cli(a.api, "config", "read", "intention", "web/db")
    assert shown.returncode == 0 and "writer:     cfg1" in shown.stdout and '"action": "deny"' in shown.stdout
    assert a.call("GET", "/v1/config/intention/web%2Fdb") == a.call("GET", "/v1/config/intention/web/db")

    # Check-and-set: a write over a change since the read is refused, with the version it is at.
    allow = json.dumps({"kind": "intention", "source": "web", "destination": "db", "action": "allow"})
    line = one_line(cli(a.api, "config", "write", "-", "--cas", str(deny["version"] - 1), stdin=allow))
    assert "changed since it was read" in line and "(HTTP 409)" in line
    ok = cli(a.api, "config", "write", "-", "--cas", str(deny["version"]), "--json", stdin=allow)
    assert ok.returncode == 0 and json.loads(ok.stdout)["action"] == "allow"

    # Bad entries: one line each, nothing written.
    for body, needle in ((CANARY[2] | {"splits": [{"weight": 50, "subset": "v1"}]}, "add up to 50"),
                         ({"kind": "service-router", "name": "db", "routes": []}, "needs db to speak http"),
                         ({"kind": "nonsense", "name": "x"}, "unknown kind")):
        assert needle in one_line(cli(a.api, "config", "write", "-", stdin=json.dumps(body)))
    assert "not JSON" in one_line(cli(a.api, "config", "write", "-", stdin="{oops"))
    assert "no intention entry" in one_line(cli(a.api, "config", "read", "intention", "x/y"))
    line = one_line(cli(a.api, "config", "delete", "service-resolver", "web"))
    assert "delete or change it first" in line  # the splitter still uses its subsets
    assert len(json.loads(cli(a.api, "config", "list", "--json").stdout)) == 4

    p = cli(a.api, "config", "delete", "service-splitter", "web")
    assert p.returncode == 0 and p.stdout.startswith("deleted service-splitter web")

    # A restart serves the same entries, alone, before meeting anyone.
    before = json.loads(cli(a.api, "config", "list", "--json").stdout)
    a.signal(15)
    a.popen.wait(10)
    back = cluster.start("cfg1", api_port=a.api_port, extra=["--data-dir", str(tmp_path / "cfg1")])
    assert json.loads(cli(back.api, "config", "list", "--json").stdout) == before


def test_the_api_refuses_bad_cas_and_empty_lists(cluster: Cluster) -> None:
    a = cluster.start("cfg2")
    for path, body, needle in (("/v1/config?cas=x", CANARY[0], "cas must be"),
                               ("/v1/config?cas=1", CANARY, "cas applies to one entry"),
                               ("/v1/config", [], "empty list")):
        with pytest.raises(urllib.error.HTTPError) as info:
            a.call("PUT", path, body)
        assert info.value.code == 400 and needle in json.loads(info.value.read())["error"]


def test_config_file_entries_apply_only_when_the_file_changed(cluster: Cluster, tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[[config]]\nkind = "service-defaults"\nname = "web"\nprotocol = "http"\n'
                    '[[intention]]\nsource = "*"\ndestination = "db"\naction = "deny"\n')
    data = ["--data-dir", str(tmp_path / "d"), "--config", str(conf)]
    a = cluster.start("f1", extra=data)
    assert {(e["kind"], e["name"]) for e in a.call("GET", "/v1/config")} == {("service-defaults", "web"),
                                                                              ("intention", "*/db")}
    a.call("DELETE", "/v1/config/intention/*/db")  # an operator's later edit
    a.signal(15)
    a.popen.wait(10)
    a = cluster.start("f1", api_port=a.api_port, extra=data)  # the same file: the delete stands
    assert [(e["kind"], e["name"]) for e in a.call("GET", "/v1/config")] == [("service-defaults", "web")]
    conf.write_text(conf.read_text().replace('"deny"', '"allow"'))
    a.signal(15)
    a.popen.wait(10)
    a = cluster.start("f1", api_port=a.api_port, extra=data)  # a changed file is applied
    assert a.call("GET", "/v1/config/intention/*/db")["action"] == "allow"


def test_bad_config_file_entries_stop_the_start_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('[[config]]\nkind = "service-splitter"\nname = "web"\n'
                    'splits = [{weight = 60}, {weight = 30, service = "canary"}]\n')
    p = subprocess.run([sys.executable, "-m", "cli.main", "agent", "--name", "x", "--config", str(conf), "--insecure"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "config entry #1: the weights of splits add up to 90, not 100" in p.stderr


def test_info_and_metrics_show_the_entries(cluster: Cluster) -> None:
    a = cluster.start("cfg3")
    a.call("PUT", "/v1/config", CANARY[:2] + [{"kind": "intention", "source": "web", "destination": "db",
                                              "action": "deny"}])
    a.call("DELETE", "/v1/config/intention/web/db")
    view = a.info()["config_entries"]
    assert view["entries"] == {"intention": 0, "service-defaults": 1, "service-resolver": 1,
                               "service-splitter": 0, "service-router": 0}
    assert view["tombstones"] == 1 and view["stale"] is False and len(view["digest"]) == 16
    assert view["counters"]["written"] == 3 and view["counters"]["deleted"] == 1
    metrics = a.call_text("/metrics")
    assert 'mesh_config_entries{kind="service-resolver"} 1.0' in metrics
    assert "mesh_config_tombstones 1.0" in metrics
    assert 'mesh_config_writes_total{op="delete"} 1.0' in metrics
