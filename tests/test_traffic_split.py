"""Splits, subsets and failover from config entries, through real agents (tcp: one choice per connection)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from test_routing import ID_SERVER, ask

from simulations.harness import AgentProc, Cluster, Processes, free_port, wait_for, wait_port


def instance(procs: Processes, agent: AgentProc, iid: str, tags: list[str]) -> None:
    port = free_port()
    procs.python(ID_SERVER, port, iid)
    wait_port(port, f"{iid} up")
    agent.call("PUT", "/v1/services", {"name": "web", "id": iid, "port": port, "address": "127.0.0.1",
                                       "tags": tags})


def two_versions(cluster: Cluster, procs: Processes, prefix: str) -> tuple[AgentProc, AgentProc, AgentProc, int]:
    a = cluster.start(f"{prefix}1")
    b = cluster.start(f"{prefix}2", join=[a.addr])
    c = cluster.start(f"{prefix}3", join=[a.addr])
    cluster.wait_converged([a.name, b.name, c.name])
    instance(procs, b, "web-v1", ["v1"])
    instance(procs, c, "web-v2", ["v2"])
    wait_for(lambda: len(a.call("GET", "/v1/services/web?passing")) == 2, 15, "both versions on the caller")
    listen = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{listen}"})
    return a, b, c, listen


def write_everywhere(writer: AgentProc, agents: list[AgentProc], body: Any) -> None:
    written = writer.call("PUT", "/v1/config", body)
    versions = {(e["kind"], e["name"]): e["version"] for e in (written if isinstance(written, list) else [written])}
    wait_for(lambda: all({(e["kind"], e["name"]): e["version"] for e in a.call("GET", "/v1/config")}.items()
                         >= versions.items() for a in agents), 10, "the entries on every agent")


RESOLVER = {"kind": "service-resolver", "name": "web",
            "subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}}}


def test_a_90_10_split_over_1000_connections_lands_within_3_points(cluster: Cluster, procs: Processes) -> None:
    a, b, c, listen = two_versions(cluster, procs, "p")
    write_everywhere(b, [a], [RESOLVER, {"kind": "service-splitter", "name": "web", "splits": [
        {"weight": 90, "subset": "v1"}, {"weight": 10, "subset": "v2"}]}])
    got = Counter(ask(listen) for _ in range(1000))
    assert sum(got.values()) == 1000
    assert 870 <= got["web-v1"] <= 930, got  # 90% within 3 points
    rows = {r["instance"]: r for r in a.call("GET", "/v1/routes?service=web")}
    assert (rows["web-v1"]["target"], rows["web-v1"]["split_weight"]) == ("web/v1", 90.0)
    assert (rows["web-v2"]["target"], rows["web-v2"]["split_weight"]) == ("web/v2", 10.0)
    ups = a.call("GET", "/v1/upstreams")[0]
    assert ups["connections"] >= 1000 and ups["connect_failures"] == 0
    # Deleting the splitter sends connections to every instance again.
    a.call("DELETE", "/v1/config/service-splitter/web")
    assert set(Counter(ask(listen) for _ in range(40))) == {"web-v1", "web-v2"}


def test_failover_to_the_backup_subset_and_back(cluster: Cluster, procs: Processes) -> None:
    a, b, c, listen = two_versions(cluster, procs, "o")
    write_everywhere(c, [a], {**RESOLVER, "default_subset": "v1", "failover": [{"subset": "v2"}]})
    assert set(Counter(ask(listen) for _ in range(20))) == {"web-v1"}  # the default subset only
    primary = next(i for i in b.call("GET", "/v1/services/web") if i["id"] == "web-v1")
    primary_port = int(primary["address"].rsplit(":", 1)[1])
    b.call("DELETE", "/v1/services/web-v1")  # the primary has no passing instance left
    wait_for(lambda: len(a.call("GET", "/v1/services/web?passing")) == 1, 10, "web-v1 gone on the caller")
    assert set(Counter(ask(listen) for _ in range(20))) == {"web-v2"}
    row = a.call("GET", "/v1/routes?service=web")[0]
    assert (row["target"], row["failover_from"]) == ("web/v2", "web/v1")
    assert a.call("GET", "/v1/upstreams")[0]["connect_failures"] == 0
    b.call("PUT", "/v1/services", {"name": "web", "id": "web-v1", "port": primary_port,
                                   "address": "127.0.0.1", "tags": ["v1"]})
    wait_for(lambda: len(a.call("GET", "/v1/services/web?passing")) == 2, 10, "web-v1 back on the caller")
    assert set(Counter(ask(listen) for _ in range(20))) == {"web-v1"}  # the primary takes it back


def test_service_defaults_apply_to_upstreams_that_do_not_set_a_field(cluster: Cluster, tmp_path: Any) -> None:
    a = cluster.start("d1", extra=["--data-dir", str(tmp_path / "d1")])
    b = cluster.start("d2", join=[a.addr])
    cluster.wait_converged(["d1", "d2"])
    plain, own = free_port(), free_port()
    a.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{plain}"})
    a.call("PUT", "/v1/upstreams", {"service": "api", "listen": f"127.0.0.1:{own}", "connect_timeout": "9s"})
    for service in ("web", "api"):
        write_everywhere(b, [a], {"kind": "service-defaults", "name": service, "protocol": "tcp",
                                  "lb": "round_robin", "connect_timeout": "2s", "idle_timeout": "1m"})
    ups = {u["service"]: u for u in a.call("GET", "/v1/upstreams")}
    assert (ups["web"]["lb"], ups["web"]["connect_timeout"], ups["web"]["idle_timeout"]) == ("round_robin", 2.0, 60.0)
    assert (ups["api"]["lb"], ups["api"]["connect_timeout"]) == ("round_robin", 9.0)  # its own field wins
    # A change of the entry reaches the open upstream; deleting it goes back to the built-in defaults.
    write_everywhere(b, [a], {"kind": "service-defaults", "name": "web", "lb": "least_connections"})
    ups = {u["service"]: u for u in a.call("GET", "/v1/upstreams")}
    assert (ups["web"]["lb"], ups["web"]["connect_timeout"]) == ("least_connections", 5.0)
    b.call("DELETE", "/v1/config/service-defaults/web")
    wait_for(lambda: {u["service"]: u for u in a.call("GET", "/v1/upstreams")}["web"]["lb"] == "p2c_peak_ewma",
             10, "the built-in default again")
    # What is saved is what the operator gave, not what the defaults made of it.
    stored = {u["service"]: u for u in json.loads((tmp_path / "d1" / "upstreams.json").read_text())}
    assert stored["api"].get("connect_timeout") == 9.0 and "lb" not in stored["api"] and "lb" not in stored["web"]
    a.signal(15)
    a.popen.wait(10)
    a = cluster.start("d1", api_port=a.api_port, extra=["--data-dir", str(tmp_path / "d1")])
    saved = {u["service"]: u for u in a.call("GET", "/v1/upstreams")}
    assert saved["api"]["connect_timeout"] == 9.0 and saved["api"]["lb"] == "round_robin"  # the entry still holds
