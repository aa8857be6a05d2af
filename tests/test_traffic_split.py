"""Splits, subsets and failover from config entries, through real agents (tcp: one choice per connection)."""

from __future__ import annotations

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
