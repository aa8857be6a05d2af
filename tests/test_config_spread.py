"""Config entries spread between real agents: written on one node, the same on all."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from simulations.harness import AgentProc, Cluster, wait_for


def entries(a: AgentProc) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["kind"], e["name"]): e for e in a.call("GET", "/v1/config")}


def same_everywhere(agents: list[AgentProc]) -> bool:
    views = [entries(a) for a in agents]
    return all(v == views[0] for v in views)


def trio_of_agents(cluster: Cluster, prefix: str) -> list[AgentProc]:
    a = cluster.start(f"{prefix}1")
    b = cluster.start(f"{prefix}2", join=[a.addr])
    c = cluster.start(f"{prefix}3", join=[a.addr])
    cluster.wait_converged([f"{prefix}1", f"{prefix}2", f"{prefix}3"])
    return [a, b, c]


def test_a_write_on_one_node_reaches_every_node_and_so_does_its_delete(cluster: Cluster) -> None:
    a, b, c = trio_of_agents(cluster, "s")
    wrote = b.call("PUT", "/v1/config", {"kind": "intention", "source": "web", "destination": "db",
                                         "action": "deny"})
    wait_for(lambda: all(("intention", "web/db") in entries(x) for x in (a, c)), 10, "the entry everywhere",
             lambda: json.dumps([list(entries(x)) for x in (a, b, c)]))
    assert entries(a)[("intention", "web/db")] == wrote
    # Enforced from the spread entry on every node, not only the writer.
    assert [r["action"] for r in c.call("GET", "/v1/intentions")] == ["deny"]
    c.call("DELETE", "/v1/config/intention/web/db")
    wait_for(lambda: all(entries(x) == {} for x in (a, b, c)), 10, "the delete everywhere")
    assert a.call("GET", "/v1/intentions") == []


def test_concurrent_conflicting_writes_converge_to_one_entry(cluster: Cluster) -> None:
    agents = trio_of_agents(cluster, "w")
    bodies = [{"kind": "service-defaults", "name": "web", "protocol": p, "lb": lb}
              for p, lb in (("tcp", "round_robin"), ("http", "least_connections"), ("http", "p2c_peak_ewma"))]
    start = threading.Barrier(3)

    def write(a: AgentProc, body: dict[str, Any]) -> None:
        start.wait()
        for _ in range(5):
            a.call("PUT", "/v1/config", body)

    threads = [threading.Thread(target=write, args=(a, body)) for a, body in zip(agents, bodies, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: same_everywhere(agents), 15, "one entry on every node",
             lambda: json.dumps([entries(a).get(("service-defaults", "web")) for a in agents], indent=1))
    winner = entries(agents[0])[("service-defaults", "web")]
    assert {k: winner[k] for k in ("protocol", "lb")} in [{k: b[k] for k in ("protocol", "lb")} for b in bodies]


def test_a_late_joiner_gets_every_entry_by_anti_entropy(cluster: Cluster) -> None:
    a = cluster.start("j1")
    a.call("PUT", "/v1/config", [{"kind": "intention", "source": f"s{i}", "destination": "db", "action": "deny"}
                                 for i in range(20)])
    a.call("DELETE", "/v1/config/intention/s0/db")
    late = cluster.start("j2", join=[a.addr])  # heard none of the announcements
    wait_for(lambda: entries(late) == entries(a), 15, "the late joiner holds a's entries",
             lambda: f"{len(entries(late))} of {len(entries(a))}")
    assert len(entries(late)) == 19
    assert late.info()["config_entries"]["tombstones"] == 1  # the delete came too
    assert a.info()["counters"].get("config_pulls_in", 0) >= 1  # answered the joiner's pull


def test_an_entry_too_large_for_a_datagram_is_announced_by_key_and_fetched(cluster: Cluster) -> None:
    a, b, c = trio_of_agents(cluster, "g")
    a.call("PUT", "/v1/config", {"kind": "service-defaults", "name": "web", "protocol": "http"})
    routes = [{"match": {"path_prefix": f"/api/v{i}/resource"}, "destination": {"service": f"backend-{i}"}}
              for i in range(40)]
    a.call("PUT", "/v1/config", {"kind": "service-router", "name": "web", "routes": routes})
    wait_for(lambda: all(("service-router", "web") in entries(x) for x in (b, c)), 10, "the router everywhere")
    assert entries(b)[("service-router", "web")]["routes"] == entries(a)[("service-router", "web")]["routes"]


def test_a_node_restarted_from_an_old_data_dir_does_not_bring_a_delete_back(cluster: Cluster,
                                                                            tmp_path: Path) -> None:
    a = cluster.start("r1")
    b = cluster.start("r2", join=[a.addr], extra=["--data-dir", str(tmp_path / "r2")])
    cluster.wait_converged(["r1", "r2"])
    a.call("PUT", "/v1/config", {"kind": "intention", "source": "web", "destination": "db", "action": "deny"})
    wait_for(lambda: ("intention", "web/db") in entries(b), 10, "the entry on r2")
    b.signal(15)
    b.popen.wait(10)
    a.call("DELETE", "/v1/config/intention/web/db")  # while r2 is away
    b = cluster.start("r2", join=[a.addr], gossip_port=b.gossip_port, api_port=b.api_port,
                      extra=["--data-dir", str(tmp_path / "r2")])
    # r2 serves its saved entry until it meets a; then the tombstone wins there too.
    wait_for(lambda: ("intention", "web/db") not in entries(b), 15, "the delete reaches the restarted node")
    assert entries(a) == entries(b) == {}
    assert b.call("GET", "/v1/intentions") == []


def test_agents_that_agree_exchange_digests_and_pull_nothing(cluster: Cluster) -> None:
    agents = trio_of_agents(cluster, "q")
    agents[0].call("PUT", "/v1/config", [{"kind": "intention", "source": f"s{i}", "destination": "db",
                                          "action": "deny"} for i in range(60)])
    wait_for(lambda: same_everywhere(agents) and len(entries(agents[2])) == 60, 15, "the entries everywhere")

    def counted(key: str) -> int:
        return sum(int(a.info()["counters"].get(key, 0)) for a in agents)

    # One more round of push-pulls first: whatever pulls the writes set off are over by then.
    first = counted("push_pull_in")
    wait_for(lambda: counted("push_pull_in") >= first + 1, 40, "a push-pull")
    pulls, push_pulls = counted("config_pulls_in"), counted("push_pull_in")
    wait_for(lambda: counted("push_pull_in") >= push_pulls + 3, 60, "three more push-pulls",
             lambda: f"push-pulls {counted('push_pull_in')} (from {push_pulls})")
    # Every one carried a digest equal to the receiver's: no summary of the 60 entries went anywhere.
    assert counted("config_pulls_in") == pulls
    assert len({a.info()["config_entries"]["digest"] for a in agents}) == 1
