"""Config entries across a real partition: hosts in network namespaces, the link cut with iptables."""

from __future__ import annotations

import json
from typing import Any

import pytest
from netns import Lab, NsAgent

from simulations.harness import wait_for

pytestmark = pytest.mark.slow


def entries(a: NsAgent) -> dict[tuple[str, str], Any]:
    return {(e["kind"], e["name"]): (e.get("action"), e["version"]) for e in a.call("GET", "/v1/config")}


def deny(source: str) -> dict[str, Any]:
    return {"kind": "intention", "source": source, "destination": "db", "action": "deny"}


def test_a_delete_during_a_partition_does_not_come_back_after_it_heals(lab: Lab) -> None:
    a = lab.start_agent("a")
    b = lab.start_agent("b", join=[a.addr])
    c = lab.start_agent("c", join=[a.addr])
    agents = [a, b, c]
    wait_for(lambda: all((v := x.try_members()) is not None and len(v) == 3 and
                         all(m["status"] == "alive" for m in v.values()) for x in agents), 30, "a, b, c alive")
    a.call("PUT", "/v1/config", [deny("web"), deny("cron")])
    wait_for(lambda: all(len(entries(x)) == 2 for x in agents), 15, "both entries everywhere")

    # c is cut off from a and b, both ways, long enough to be declared dead.
    for other in ("a", "b"):
        lab.cut("c", other)
        lab.cut(other, "c")
    a.call("DELETE", "/v1/config/intention/web/db")  # c cannot hear it
    c.call("PUT", "/v1/config", {**deny("cron"), "action": "allow"})  # nor can a and b hear this
    b.call("PUT", "/v1/config", deny("batch"))
    # Long enough for every announcement to have run out of retransmits: only anti-entropy
    # (push-pull digests, pulls, news moving on) can carry them across after the heal.
    wait_for(lambda: a.members()["c"]["status"] == "dead" and c.members()["a"]["status"] == "dead", 60,
             "a and c declare each other dead")
    assert ("intention", "web/db") in entries(c) and ("intention", "web/db") not in entries(b)

    lab.heal("c")
    lab.heal("a")
    lab.heal("b")
    wait_for(lambda: len({json.dumps(sorted(entries(x).items())) for x in agents}) == 1, 90,
             "the same entries on every node after the heal",
             lambda: json.dumps({x.name: sorted(map(str, entries(x))) for x in agents}))
    final = entries(c)
    assert ("intention", "web/db") not in final  # the delete won on c too: it did not come back
    assert final[("intention", "cron/db")][0] == "allow"  # c's write during the cut reached a and b
    assert ("intention", "batch/db") in final
    assert c.call("GET", "/v1/agent/self")["config_entries"]["tombstones"] == 1
