"""HTTP mode across releases: a caller of this code, an instance's agent of the release before it.

The far end of an http-mode stream only watches the bytes go by, and an
agent that predates it ignores the stream header's new field and splices,
so per-request balancing reaches its instances too; an older caller knows
nothing of http and carries the same service as bytes (L4), which still
works against a new agent's instance.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from test_http_mode import get, register, start_instance
from test_rolling_upgrade import OLD_RELEASE, release_venv

from simulations.harness import Cluster, Processes, free_port, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def old_python() -> Path:
    return release_venv(OLD_RELEASE)


def test_http_mode_reaches_an_older_agents_instance_and_an_older_caller_still_calls_as_bytes(
        cluster: Cluster, procs: Processes, old_python: Path, tmp_path: Path) -> None:
    import http.client

    new = cluster.start("u1")
    old = cluster.start("u2", join=[new.addr], root=tmp_path, python=old_python)
    cluster.wait_converged(["u1", "u2"])
    p_old, _ = start_instance(procs, "web-old")
    p_new, _ = start_instance(procs, "web-new")
    old.call("PUT", "/v1/services", {"name": "web", "id": "web-old", "port": p_old, "address": "127.0.0.1"})
    register(new, "web-new", p_new)
    # The old release cannot register a protocol; the mesh-wide entry (held by new agents) says http.
    new.call("PUT", "/v1/config", {"kind": "service-defaults", "name": "web", "protocol": "http"})
    wait_for(lambda: len(new.call("GET", "/v1/services/web?passing")) == 2, 15, "both instances on the new agent")
    row = new.call("GET", "/v1/services")[0]
    assert row["protocol"] == "http" and "instances are registered as http and tcp" in row["protocol_conflict"]

    listen = free_port()
    new.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{listen}", "lb": "round_robin"})
    c = http.client.HTTPConnection("127.0.0.1", listen, timeout=20)
    got = Counter(get(c, "/who")[2].decode() for _ in range(40))
    assert got == Counter({"web-old": 20, "web-new": 20}), got  # per request, through the old agent too
    view = new.call("GET", "/v1/upstreams")[0]
    assert view["connections"] == 1 and view["requests"] == 40 and view["retries"] == 0
    # The new agent saw its own instance's requests come in; the old one keeps no such figures.
    inbound = [r for r in new.call("GET", "/v1/stat")["inbound"] if r["service"] == "web"]
    assert inbound and inbound[0]["requests"] == 20

    old_listen = free_port()
    # Round robin: whether the older caller reaches both is the question, not which one its P2C of
    # the time preferred (under load it could give all 30 to one instance that looked faster).
    old.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"127.0.0.1:{old_listen}", "lb": "round_robin"})
    answers: Counter[str] = Counter()
    for _ in range(30):  # the older caller balances per connection, as it always did
        conn = http.client.HTTPConnection("127.0.0.1", old_listen, timeout=20)
        status, _, body = get(conn, "/who", {"connection": "close"})
        conn.close()
        assert status == 200
        answers[body.decode()] += 1
    assert set(answers) == {"web-old", "web-new"}, answers
