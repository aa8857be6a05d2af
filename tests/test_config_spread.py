"""Config entries spread between real agents: written on one node, the same on all."""

from __future__ import annotations

import json
import threading
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
