"""Routing with real agents: latency-aware balancing, outlier ejection, slow start, the routes view;
and the router in process, with its own clock (refusals, failures before the first reply).

Three agents on loopback; instances are small servers in subprocesses that
answer each connection with their id.  Latency is injected by a delaying
relay (a TCP forwarder that holds every chunk) in front of one instance,
since tc netem is not available here.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from dataplane.outlier import OutlierConfig
from dataplane.proxy import Endpoint
from dataplane.routing import Router, RoutingOptions
from simulations.harness import ROOT, Cluster, Processes, free_port, wait_for, wait_port

pytestmark = pytest.mark.slow

ID_SERVER = r"""
import socket, sys, threading
ident = sys.argv[2].encode()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(128)
def serve(c):
    with c:
        buf = b""
        while not buf.endswith(b"\n"):
            d = c.recv(4096)
            if not d:
                break
            buf += d
        c.sendall(ident + b"\n")
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

DELAY_RELAY = r"""
import socket, sys, threading, time
listen, target, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", listen)); s.listen(128)
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                b.shutdown(socket.SHUT_WR); return
            time.sleep(delay)
            b.sendall(d)
    except OSError:
        pass
def serve(c):
    u = socket.create_connection(("127.0.0.1", target))
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    pump(u, c)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def id_server(procs: Processes, ident: str) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    p = procs.python(ID_SERVER, port, ident)
    wait_port(port, f"{ident} up")
    return port, p


def ask(port: int) -> str:
    """One connection through the upstream: which instance answered (raises if none did)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as c:
        c.sendall(b"who?\n")
        data = b""
        while not data.endswith(b"\n"):
            d = c.recv(4096)
            if not d:
                raise ConnectionError(f"connection ended after {data!r}")
            data += d
        return data.decode().strip()


def cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args, "--api", api], capture_output=True,
                          text=True, cwd=ROOT, timeout=30)


def register(agent: object, name: str, iid: str, port: int) -> None:
    agent.call("PUT", "/v1/services", {"name": name, "id": iid, "port": port, "address": "127.0.0.1"})  # type: ignore[attr-defined]


def test_a_slow_instance_gets_few_new_connections_and_routes_show_why(cluster: Cluster, procs: Processes) -> None:
    a = cluster.start("r1")
    b = cluster.start("r2", join=[a.addr])
    c = cluster.start("r3", join=[a.addr])
    cluster.wait_converged(["r1", "r2", "r3"])
    fast_b, _ = id_server(procs, "fast-b")
    fast_c, _ = id_server(procs, "fast-c")
    slow_backend, _ = id_server(procs, "slow-c")
    slow_port = free_port()
    procs.python(DELAY_RELAY, slow_port, slow_backend, 0.04)  # 40 ms each way per chunk
    wait_port(slow_port, "delay relay up")
    register(b, "who", "fast-b", fast_b)
    register(c, "who", "fast-c", fast_c)
    register(c, "who", "slow-c", slow_port)
    wait_for(lambda: len(a.call("GET", "/v1/services/who?passing")) == 3, 15, "3 instances on r1")
    listen = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "who", "listen": f"127.0.0.1:{listen}"})

    answers = Counter(ask(listen) for _ in range(80))
    assert sum(answers.values()) == 80
    fast_share = (answers["fast-b"] + answers["fast-c"]) / 80
    assert fast_share >= 0.80, answers

    p = cli(a.api, "routes", "who", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["instance"]: r for r in json.loads(p.stdout)}
    assert set(rows) == {"fast-b", "fast-c", "slow-c"}
    for r in rows.values():
        assert r["service"] == "who" and r["state"] == "active" and r["weight"] == 1.0
        assert r["path"] == ["r1", r["node"]]
        assert r["rtt_ms"] is not None and r["rtt_ms"] >= 0
        assert r["policy"] == "p2c_peak_ewma"
    assert rows["slow-c"]["latency_ms"] > 5 * max(rows["fast-b"]["latency_ms"], rows["fast-c"]["latency_ms"])
    table = cli(a.api, "routes")
    assert table.returncode == 0 and "slow-c" in table.stdout and "r1 > r3" in table.stdout

    # RTT: measured to a member we probe, coordinates between two others.
    wait_for(lambda: cli(a.api, "rtt", "r2", "--json").returncode == 0, 15, "rtt r1->r2 known")
    one = json.loads(cli(a.api, "rtt", "r2", "--json").stdout)
    assert one["from"] == "r1" and one["to"] == "r2" and one["source"] == "measured" and one["rtt_ms"] > 0
    wait_for(lambda: cli(a.api, "rtt", "r2", "r3", "--json").returncode == 0, 15, "rtt r2->r3 known")
    two = json.loads(cli(a.api, "rtt", "r2", "r3", "--json").stdout)
    assert two["source"] == "coordinates" and two["rtt_ms"] >= 0
    bad = cli(a.api, "rtt", "nobody")
    assert bad.returncode == 1 and "no member named" in bad.stderr and "Traceback" not in bad.stderr


def test_a_refusing_instance_is_ejected_without_failing_clients_and_returns_in_slow_start(
        cluster: Cluster, procs: Processes) -> None:
    a = cluster.start("s1")
    b = cluster.start("s2", join=[a.addr])
    c = cluster.start("s3", join=[a.addr])
    cluster.wait_converged(["s1", "s2", "s3"])
    good_b, _ = id_server(procs, "good-b")
    good_c, _ = id_server(procs, "good-c")
    flaky_port, flaky = id_server(procs, "flaky-c")
    register(b, "svc", "good-b", good_b)
    register(c, "svc", "good-c", good_c)
    register(c, "svc", "flaky-c", flaky_port)
    wait_for(lambda: len(a.call("GET", "/v1/services/svc?passing")) == 3, 15, "3 instances on s1")
    listen = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "svc", "listen": f"127.0.0.1:{listen}", "lb": "round_robin",
                                    "base_ejection_time": "3s", "slow_start_window": "20s"})
    assert Counter(ask(listen) for _ in range(9)) == {"good-b": 3, "good-c": 3, "flaky-c": 3}

    procs.stop(flaky)  # now it refuses every connection
    answers = Counter(ask(listen) for _ in range(40))  # each raises if the client saw a failure
    assert sum(answers.values()) == 40 and "flaky-c" not in answers

    def route(iid: str) -> dict[str, object]:
        rows = {r["instance"]: r for r in a.call("GET", "/v1/routes?service=svc")}
        return rows[iid]

    ups = a.call("GET", "/v1/upstreams")[0]
    assert ups["ejections"] >= 1 and ups["outlier"]["ejections"] >= 1
    # Five consecutive failures ejected it; the retries that saved those clients are counted.
    assert ups["retried"] >= 5
    first = route("flaky-c")
    assert first["state"] == "ejected" or first["half_open"], first

    # It comes back: after the ejection time one trial connection, then slow start.
    flaky = procs.python(ID_SERVER, flaky_port, "flaky-c")
    wait_port(flaky_port, "flaky back")

    def back_in_slow_start() -> bool:
        ask(listen)
        return route("flaky-c")["state"] == "slow-start"

    wait_for(back_in_slow_start, 30, "flaky-c back in slow start", lambda: json.dumps(route("flaky-c")))
    r = route("flaky-c")
    assert 0 < float(r["weight"]) < 1.0  # type: ignore[arg-type]
    table = cli(a.api, "routes")
    assert "slow-start" in table.stdout
    # During slow start it gets a smaller share than the others.
    answers = Counter(ask(listen) for _ in range(30))
    assert answers["flaky-c"] < min(answers["good-b"], answers["good-c"]), answers


def test_connection_limits_refuse_at_once_and_count(cluster: Cluster, procs: Processes) -> None:
    a = cluster.start("l1")
    port, _ = id_server(procs, "only")
    register(a, "lim", "only", port)
    wait_for(lambda: len(a.call("GET", "/v1/services/lim?passing")) == 1, 15, "instance visible")
    listen = free_port()
    a.call("PUT", "/v1/upstreams", {"service": "lim", "listen": f"127.0.0.1:{listen}", "max_connections": 2})
    held = [socket.create_connection(("127.0.0.1", listen), timeout=10) for _ in range(2)]
    try:
        wait_for(lambda: a.call("GET", "/v1/upstreams")[0]["open"] == 2, 10, "two open")
        t0 = time.monotonic()
        with pytest.raises((ConnectionError, OSError)):
            ask(listen)
        assert time.monotonic() - t0 < 10  # refused, not queued
        ups = a.call("GET", "/v1/upstreams")[0]
        assert ups["overflows"] >= 1
    finally:
        for s in held:
            s.close()
    wait_for(lambda: a.call("GET", "/v1/upstreams")[0]["open"] == 0, 10, "closed")
    assert ask(listen) == "only"


def test_bad_routing_options_get_clear_errors(cluster: Cluster) -> None:
    a = cluster.start("o1")
    for body, fragment in (
        ({"lb": "random"}, "lb must be one of"),
        ({"max_connections": 0}, "max_connections must be"),
        ({"max_ejection_percent": 150}, "max_ejection_percent"),
        ({"base_ejection_time": "soon"}, "base_ejection_time"),
    ):
        p = cli(a.api, "routes", "nothing")
        assert p.returncode == 1 and "no upstream" in p.stderr
        res = subprocess.run([sys.executable, "-c", "import sys,json,urllib.request as u;"
                              "r=u.Request(sys.argv[1],data=sys.argv[2].encode(),method='PUT',"
                              "headers={'content-type':'application/json'});"
                              "\ntry:\n  u.urlopen(r)\nexcept Exception as e:\n  print(e.code, e.read().decode())",
                              f"http://{a.api}/v1/upstreams",
                              json.dumps({"service": "x", "listen": f"127.0.0.1:{free_port()}", **body})],
                             capture_output=True, text=True, timeout=30)
        assert res.stdout.startswith("400") and fragment in res.stdout, res.stdout + res.stderr


# -- the router in process, with its own clock: refusals and failures before the first reply ----------

#: As routes shows them (last_failure).
RESET_BEFORE_REPLY, CLOSED_BEFORE_REPLY = "reset_before_reply", "closed_before_reply"
N2A, N2B, N3 = Endpoint("n2", "web-a", "h", 1), Endpoint("n2", "web-b", "h", 2), Endpoint("n3", "web-c", "h", 3)


def router(**outlier: float) -> Router:
    return Router("web", RoutingOptions(lb="round_robin", outlier=OutlierConfig(**outlier)),  # type: ignore[arg-type]
                  random.Random(7))


def rtt(node: str) -> float:
    return 0.001


def key(e: Endpoint) -> tuple[str, str]:
    return (e.node, e.instance_id)


def picks(r: Router, now: float, endpoints: list[Endpoint], n: int = 20, last_resort: bool = True) -> set[str]:
    """Instances chosen for ``n`` connections that are connected and closed at once."""
    out = set()
    for _ in range(n):
        e = r.pick(now, endpoints, frozenset(), rtt, last_resort)
        if e is None:
            out.add("none")
            continue
        assert isinstance(e, Endpoint)
        out.add(e.instance_id)
        a = r.attempt(now, key(e))
        r.connected(now, a)
        r.closed(now, a, clean=True)
    return out


def next_on_n2(r: Router, now: float, endpoints: list[Endpoint]) -> Endpoint:
    """Pick until round robin offers an instance on n2 (within a round); the others are served."""
    for _ in range(len(endpoints)):
        e = r.pick(now, endpoints, frozenset(), rtt)
        assert isinstance(e, Endpoint)
        if e.node == "n2":
            return e
        a = r.attempt(now, key(e))
        r.connected(now, a)
        r.closed(now, a, clean=True)
    raise AssertionError("n2 was not offered")


def test_a_refusal_marks_the_node_not_a_latency_and_is_asked_again_later() -> None:
    r = router(base_ejection_time=30.0)
    eps = [N2A, N2B, N3]
    assert picks(r, 0.0, eps, 6) == {"web-a", "web-b", "web-c"}
    a = r.attempt(1.0, key(N2A))
    r.denied(1.0, a)
    # Every instance on the refusing node is left alone; the refusal taught the balancer nothing.
    assert r.refuses("n2") and not r.refuses("n3")
    assert picks(r, 1.0, eps) == {"web-c"}
    rows = {row["instance"]: row for row in r.view(1.0, eps, _Paths(), "n1")}
    assert rows["web-a"]["refused"] and rows["web-b"]["refused"] and not rows["web-c"]["refused"]
    assert rows["web-a"]["state"] == "active" and rows["web-a"]["last_failure"] is None
    assert rows["web-a"]["latency_ms"] == 1.0, "the prior (the RTT), not a fast sample"
    assert r.pending == 0 and r.outlier.state(1.0, key(N2A)) == "active"
    # After the recheck interval, one connection (not two at once) asks the node again ...
    first = next_on_n2(r, 31.0, eps)
    assert picks(r, 31.0, eps) == {"web-c"}
    again = r.attempt(31.0, key(first))
    r.denied(31.0, again)  # ... still refused: left alone for another interval
    assert picks(r, 60.0, eps) == {"web-c"}
    due = next_on_n2(r, 61.0, eps)
    allowed = r.attempt(61.0, key(due))
    r.connected(61.0, allowed)  # the policy changed: the mark is gone
    assert not r.refuses("n2")
    assert picks(r, 61.0, eps) == {"web-a", "web-b", "web-c"}
    assert r.stats["refusals"] == 1 and r.stats["refusals_again"] == 1 and r.stats["refusals_lifted"] == 1


def test_refusing_nodes_are_the_last_resort_and_forgotten_when_they_leave() -> None:
    r = router()
    r.sync(0.0, [N2A, N3])
    for e in (N2A, N3):
        r.denied(0.0, r.attempt(0.0, key(e)))
    assert r.pick(1.0, [N2A, N3], frozenset(), rtt, last_resort=False) is None
    # Nothing else left: asking costs a round trip and no instance anything, and may find the policy changed.
    assert r.pick(1.0, [N2A, N3], frozenset(), rtt) in (N2A, N3)
    assert r.stats["refused_last_resort"] == 1 and r.stats["all_ejected"] == 0
    assert r.refuses("n2") and r.refuses("n3")
    r.sync(2.0, [N3])  # n2's instances left the catalog: so does what we knew of its policy
    assert not r.refuses("n2") and r.refuses("n3")


def test_a_reset_or_close_before_the_first_reply_is_a_failure_and_ejects() -> None:
    r = router(consecutive_failures=3, max_ejection_percent=50.0)
    eps = [N2A, N3]
    r.sync(0.0, eps)
    t = 0.0
    for reason in (RESET_BEFORE_REPLY, CLOSED_BEFORE_REPLY, RESET_BEFORE_REPLY):
        assert r.outlier.state(t, key(N2A)) == "active"
        a = r.attempt(t, key(N2A))
        r.connected(t + 0.001, a)  # connected is not a success ...
        r.closed(t + 0.002, a, reason)  # ... the instance's reset or close before replying is a failure
        t += 1.0
    assert r.outlier.state(t, key(N2A)) == "ejected"
    rows = {row["instance"]: row for row in r.view(t, eps, _Paths(), "n1")}
    assert rows["web-a"]["last_failure"] == RESET_BEFORE_REPLY and rows["web-a"]["last_failure_ago_s"] == 1.0
    assert rows["web-a"]["latency_ms"] > 500.0, "the failure penalty (1 s, decaying), never a fast answer"
    assert rows["web-c"]["last_failure"] is None
    assert r.open == 0 and r.pending == 0 and r.stats["failures_before_reply"] == 3


def test_a_reply_is_the_success_and_a_clean_end_without_one_is_no_failure() -> None:
    r = router(consecutive_failures=2, max_ejection_percent=50.0)
    eps = [N2A, N3]
    r.sync(0.0, eps)

    def failing(t: float) -> None:
        a = r.attempt(t, key(N2A))
        r.connected(t, a)
        r.closed(t, a, RESET_BEFORE_REPLY)

    failing(0.0)
    a = r.attempt(1.0, key(N2A))
    r.connected(1.0, a)
    r.first_reply(1.5, a)
    r.closed(2.0, a, RESET_BEFORE_REPLY)  # after a reply: the client's problem or the protocol's, not counted
    failing(3.0)
    failing_clean = r.attempt(4.0, key(N2A))
    r.connected(4.0, failing_clean)
    r.closed(4.0, failing_clean, clean=True)  # took the request, closed after the client: a sink, not failing
    failing(5.0)
    assert r.outlier.state(5.0, key(N2A)) == "active"
    # A client that resets before any reply says nothing about the instance, nor about its latency.
    assert r.pick(6.0, eps, frozenset({key(N2A)}), rtt) == N3
    c = r.attempt(6.0, key(N3))
    r.connected(6.0, c)
    r.closed(9.0, c)
    assert r.balancer.ewma(9.0, key(N3)) == 0.001, "still the prior (the RTT): nothing observed"
    failing(10.0)
    assert r.outlier.state(10.0, key(N2A)) == "ejected"
    rows = {row["instance"]: row for row in r.view(10.0, eps, _Paths(), "n1")}
    assert rows["web-a"]["state"] == "ejected"


class _Paths:
    def rtt_to(self, node: str) -> tuple[float, str] | None:
        return (0.001, "measured")

    def path_to(self, node: str) -> list[str]:
        return ["n1", node]
