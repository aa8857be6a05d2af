"""A vanished host costs a client an RTT-derived wait, not a connect timeout (issue 31).

A host that is killed or unplugged sends no RST: a dial to it hears nothing
until the dialler gives up.  The tunnel's first dial to a peer gives up after
a few of the RTTs the mesh has measured to it (dataplane.tunnel.dial_bound),
and the balancer tries a member gossip already suspects only when nothing
else is left (dataplane.balancer).  Unit tests of both on a mock clock; then
real agents in network namespaces, one host's traffic dropped by iptables.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from netns import TUNNEL_PORT, Lab, sh
from test_relay import Directory, echo

from cli.demo_service import call_once
from dataplane import relay
from dataplane.balancer import POLICIES, Balancer, Candidate
from dataplane.discovery_chain import DiscoveryChain, Target
from dataplane.noise import generate_keypair
from dataplane.proxy import Endpoint, Proxy, UpstreamListener
from dataplane.routing import Router
from dataplane.tunnel import (
    DIAL_PATIENCE_FLOOR,
    DIAL_RTT_FACTOR,
    DIAL_RTT_FLOOR,
    DialAbandoned,
    TunnelError,
    TunnelManager,
    TunnelStream,
    dial_bound,
)
from simulations.harness import ROOT, wait_for

# -- the bound ------------------------------------------------------------------------------------


def test_the_dial_bound_is_a_few_rtts_with_a_floor_and_never_past_the_timeout() -> None:
    assert dial_bound(None, 2.0) == 2.0  # nothing known: the configured timeout alone
    assert dial_bound(0.0002, 2.0) == DIAL_RTT_FLOOR  # a LAN: the floor
    assert dial_bound(0.040, 2.0) == pytest.approx(DIAL_RTT_FACTOR * 0.040)
    assert dial_bound(1.5, 2.0) == 2.0  # a far peer: still within the timeout
    for nonsense in (float("nan"), float("inf"), -1.0):
        assert dial_bound(nonsense, 2.0) == 2.0
    assert dial_bound(0.1, 5.0, floor=0.01, factor=2.0) == pytest.approx(0.2)


def test_a_callers_patience_is_a_few_rtts_with_its_own_floor_and_none_without_an_estimate() -> None:
    manager = TunnelManager("me", generate_keypair()[0], _Silent(), rtt=lambda peer: {"near": 0.0002,
                                                                                        "far": 0.080}.get(peer))
    assert DIAL_PATIENCE_FLOOR < DIAL_RTT_FLOOR
    assert manager.patience("near") == DIAL_PATIENCE_FLOOR
    assert manager.patience("far") == pytest.approx(DIAL_RTT_FACTOR * 0.080)
    assert manager.patience("unknown") is None  # nothing known: wait for the dial
    assert TunnelManager("me", generate_keypair()[0], _Silent()).patience("near") is None


class _Silent:
    """Membership's answers for "me", for "gone" (whose host never answers a SYN, nor sends a RST) and for
    "slow", a live responder a test may add (``slow``: its connect, or with ``slow_agent`` its handshake
    after an immediate connect, completes that many seconds late)."""

    def __init__(self) -> None:
        self.me_public = b""
        self.public = generate_keypair()[1]
        self.dials = 0
        self.slow: tuple[bytes, float, TunnelManager] | None = None
        self.slow_agent = False
        self.nursery: trio.Nursery | None = None

    def member_for_key(self, static_public: bytes) -> str | None:
        known = {self.public: "gone", self.me_public: "me"}
        if self.slow is not None:
            known[self.slow[0]] = "slow"
        return known.get(static_public)

    def tunnel_peer(self, name: str) -> tuple[tuple[str, int], bytes] | None:
        if name == "gone":
            return ("192.0.2.1", 7948), self.public
        if name == "slow" and self.slow is not None:
            return ("192.0.2.2", 7948), self.slow[0]
        return None

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        self.dials += 1
        if host == "192.0.2.1" or self.slow is None:
            await trio.sleep_forever()
        assert self.slow is not None and self.nursery is not None
        _, delay, responder = self.slow

        async def respond_late(far: trio.abc.Stream) -> None:
            await trio.sleep(delay)  # the host's kernel answered at once; its agent is busy
            await responder.handle_connection(far)

        if not self.slow_agent:
            await trio.sleep(delay)
        near, far = trio.testing.memory_stream_pair()
        self.nursery.start_soon(respond_late if self.slow_agent else responder.handle_connection, far)
        return near


async def _dial_time(manager: TunnelManager, peer: str = "gone", alternative: bool = False) -> tuple[float, str]:
    start = trio.current_time()
    with pytest.raises(TunnelError) as err:
        await manager.open_stream(peer, b"x", alternative=lambda: alternative)
    return trio.current_time() - start, str(err.value)


async def _with_manager(rtt: Callable[[str], float | None] | None,
                        body: Callable[[TunnelManager, _Silent], Awaitable[None]], slow_peer: float = 0.0,
                        slow_agent: bool = False) -> None:
    silent = _Silent()
    silent.slow_agent = slow_agent
    private, silent.me_public = generate_keypair()
    manager = TunnelManager("me", private, silent, connect=silent.connect, handshake_timeout=2.0,
                            direct_retry_after=30.0, rtt=rtt, use_reactor=False)
    async with trio.open_nursery() as nursery:
        silent.nursery = nursery
        if slow_peer:
            priv, pub = generate_keypair()
            responder = TunnelManager("slow", priv, silent, on_stream=_echo, use_reactor=False)
            silent.slow = (pub, slow_peer, responder)
            await nursery.start(responder.serve)
        await nursery.start(manager.serve)
        await body(manager, silent)
        await manager.aclose()
        nursery.cancel_scope.cancel()


async def _echo(peer: str, header: bytes, stream: TunnelStream) -> None:
    await stream.send_all(header)
    await stream.send_eof()
    while await stream.receive_some():
        pass


async def test_a_caller_with_another_instance_leaves_a_silent_dial_at_its_rtt_bound_and_the_dial_goes_on(
        autojump_clock: trio.testing.MockClock) -> None:
    async def body(manager: TunnelManager, silent: _Silent) -> None:
        waited, error = await _dial_time(manager, alternative=True)
        # On the mock clock: exactly the bound (3 x 2 ms is below the floor), not the 2 s timeout.
        assert waited == pytest.approx(DIAL_PATIENCE_FLOOR) and "RTT bound" in error, error
        with pytest.raises(DialAbandoned):  # what the proxy does not count against the instance
            await manager.open_stream("gone", b"x", alternative=lambda: True)
        assert manager.stats["dials_rtt_bounded"] == 2 and manager.stats["dials_failed"] == 0
        # The dial goes on; a caller arriving later counts from its start, so it does not wait at all.
        await trio.sleep(0.5)
        waited, error = await _dial_time(manager, alternative=True)
        assert waited == 0 and "RTT bound" in error
        assert manager.stats["dials_rtt_bounded"] == 3 and silent.dials == 1
        # A caller with nowhere else to go waits for the dial, which its own timeout ends (no relay here).
        waited, error = await _dial_time(manager)
        assert waited == pytest.approx(2.0 - 0.5 - DIAL_PATIENCE_FLOOR) and "in 2s" in error, error
        assert manager.stats["dials_failed"] == 1 and manager.stats["dials_rtt_bounded"] == 3

    await _with_manager(lambda peer: 0.002, body)


async def test_without_an_rtt_estimate_every_caller_waits_for_the_dial(
        autojump_clock: trio.testing.MockClock) -> None:
    async def unknown(manager: TunnelManager, silent: _Silent) -> None:
        waited, error = await _dial_time(manager, alternative=True)
        assert waited == pytest.approx(2.0) and "in 2s" in error
        assert manager.stats["dials_rtt_bounded"] == 0

    await _with_manager(lambda peer: None, unknown)
    await _with_manager(None, unknown)


async def test_a_slow_live_peer_is_reached_by_a_caller_with_nowhere_else_to_go(
        autojump_clock: trio.testing.MockClock) -> None:
    async def body(manager: TunnelManager, silent: _Silent) -> None:
        start = trio.current_time()
        stream = await manager.open_stream("slow", b"hello")  # 300 ms to connect: 15 times its bound
        assert await stream.receive_some() == b"hello"
        assert trio.current_time() - start >= 0.3
        assert manager.stats["dials_rtt_bounded"] == 0 and manager.stats["handshakes_ok"] == 1

    await _with_manager(lambda peer: 0.002, body, slow_peer=0.3)


async def test_a_caller_with_another_instance_waits_for_a_busy_agent_whose_host_answered(
        autojump_clock: trio.testing.MockClock) -> None:
    async def body(manager: TunnelManager, silent: _Silent) -> None:
        start = trio.current_time()
        stream = await manager.open_stream("slow", b"hello", alternative=lambda: True)
        assert await stream.receive_some() == b"hello"
        assert trio.current_time() - start >= 0.3  # the handshake's answer took 15 times the RTT bound
        assert manager.stats["dials_rtt_bounded"] == 0

    await _with_manager(lambda peer: 0.002, body, slow_peer=0.3, slow_agent=True)


async def test_a_dial_given_up_by_its_caller_still_brings_the_session_up_for_the_next_call(
        autojump_clock: trio.testing.MockClock) -> None:
    async def body(manager: TunnelManager, silent: _Silent) -> None:
        waited, error = await _dial_time(manager, "slow", alternative=True)
        assert waited == pytest.approx(DIAL_PATIENCE_FLOOR) and "the dial goes on" in error
        await trio.sleep(0.5)
        assert manager.stats["dials_late"] == 1 and manager.active_peers() == ["slow"]
        asked = []
        stream = await manager.open_stream("slow", b"again", alternative=lambda: asked.append(1) or True)
        assert not asked  # a session is up: nothing to wait for, so the caller's alternatives are not asked
        assert await stream.receive_some() == b"again"
        assert silent.dials == 1 and manager.stats["dials_rtt_bounded"] == 1

    await _with_manager(lambda peer: 0.002, body, slow_peer=0.3)


async def test_a_relay_joins_the_race_once_the_direct_dial_is_silent_past_its_bound() -> None:
    """A peer only a relay reaches (its SYNs dropped, no RST): the relay is tried alongside the direct
    dial once that has been silent past its RTT bound, not after the direct connect timeout."""
    directory = Directory()
    stats_b: Counter[str] = Counter()
    silent: set[int] = set()

    async def connect_a(host: str, port: int) -> trio.abc.Stream:
        if port in silent:
            await trio.sleep_forever()
        return await trio.open_tcp_stream(host, port)

    async def relay_b(peer: str, header: bytes, stream: TunnelStream) -> None:
        await relay.serve(peer, header, stream, directory, stats_b)

    with trio.fail_after(20):  # the direct connect timeout is 30 s: only the race can pass in time
        async with trio.open_nursery() as nursery:
            keys = {n: generate_keypair() for n in "abc"}
            listeners = {n: await trio.open_tcp_listeners(0, host="127.0.0.1") for n in "abc"}
            for n in "abc":
                directory.members[n] = (("127.0.0.1", listeners[n][0].socket.getsockname()[1]), keys[n][1])
            silent.add(directory.members["c"][0][1])
            a = TunnelManager("a", keys["a"][0], directory, connect=connect_a, relays=lambda p: ["b"],
                              direct_connect_timeout=30.0, rtt=lambda peer: 0.001)
            b = TunnelManager("b", keys["b"][0], directory, on_stream=relay_b)
            c = TunnelManager("c", keys["c"][0], directory, on_stream=echo)
            for name, mgr in (("a", a), ("b", b), ("c", c)):
                await nursery.start(mgr.serve, listeners[name])
            stream = await a.open_stream("c", b"hello")
            await stream.send_all(b"through b")
            await stream.send_eof()
            assert await stream.receive_some() == b"through b"
            assert a.route_to("c") == ["b"] and stats_b["relayed_streams"] == 1
            assert a.stats["relays_raced"] == 1 and a.stats["relayed_dials"] == 1
            # The direct attempt lost the race and was dropped, not waited out or counted as failed.
            assert a.stats["direct_dials_failed"] == 0 and not a.relayed("c")
            for mgr in (a, b, c):
                await mgr.aclose()
            nursery.cancel_scope.cancel()


async def test_an_attempt_has_an_alternative_only_on_another_node_not_tried_refusing_or_ejected() -> None:
    web = [Endpoint("n1", "web-1", "127.0.0.1", 1, "web"), Endpoint("n1", "web-1b", "127.0.0.1", 2, "web"),
           Endpoint("n2", "web-2", "127.0.0.1", 1, "web"), Endpoint("n3", "web-3", "127.0.0.1", 1, "web")]

    class Catalog:
        def passing_endpoints(self, service: str) -> list[Endpoint]:
            return list(web)

        def local_endpoint(self, instance_id: str) -> Endpoint | None:
            return None

    proxy = Proxy("me", Catalog(), None)  # type: ignore[arg-type]
    up = UpstreamListener("web", ("127.0.0.1", 0), [], router=Router("web"))
    first = web[0]
    assert proxy.has_alternative(up, first, {("n1", "web-1")}, set(), None)
    # Another instance on the same node is no alternative: its tunnel is the one that does not answer.
    assert not proxy.has_alternative(up, first, {("n1", "web-1"), ("n2", "web-2"), ("n3", "web-3")}, set(), None)
    assert not proxy.has_alternative(up, first, {("n1", "web-1")}, {"n2", "n3"}, None)  # both refuse the caller
    assert proxy.has_alternative(up, first, {("n1", "web-1"), ("n2", "web-2")}, set(), None)
    now = trio.current_time()
    up.router.pick(now, web, frozenset(), lambda node: 0.001)  # the router learns the catalog
    for _ in range(5):  # web-3 fails until outlier detection ejects it
        up.router.failed(now, up.router.attempt(now, ("n3", "web-3")))
    assert not up.router.outlier.available(trio.current_time(), ("n3", "web-3"))
    assert not proxy.has_alternative(up, first, {("n1", "web-1"), ("n2", "web-2")}, set(), None)


# -- suspects last --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_a_suspect_is_chosen_only_when_nothing_else_is_left(policy: str) -> None:
    b: Balancer[str] = Balancer(policy, random.Random(7))
    # The suspect looks best on every other count: nearest, unloaded.
    mixed = [Candidate("suspect", rtt=0.0001, suspect=True), Candidate("a", rtt=0.02), Candidate("b", rtt=0.02)]
    picks = {b.pick(float(i), mixed) for i in range(200)}
    assert picks == {"a", "b"}
    assert b.stats["suspect_passed_over"] == 200
    only = [Candidate("s1", suspect=True), Candidate("s2", suspect=True)]
    assert {b.pick(float(i), only) for i in range(50)} == {"s1", "s2"}
    assert b.stats["suspect_only"] == 50


def test_the_proxys_retries_reach_a_suspect_after_the_others() -> None:
    router = Router("web")
    eps = [Endpoint("n1", "web-1", "127.0.0.1", 1, "web", suspect=True), Endpoint("n2", "web-2", "127.0.0.1", 1, "web"),
           Endpoint("n3", "web-3", "127.0.0.1", 1, "web")]
    tried: set[tuple[str, str]] = set()
    order = []
    for _ in range(3):  # what dataplane.proxy does: each failed instance is excluded from the next pick
        chosen = router.pick(0.0, eps, frozenset(tried), lambda node: 0.001)
        assert chosen is not None
        order.append(chosen.instance_id)
        tried.add((chosen.node, chosen.instance_id))
    assert order[-1] == "web-1" and sorted(order[:2]) == ["web-2", "web-3"]

    class Paths:
        def rtt_to(self, node: str) -> tuple[float, str] | None:
            return (0.001, "measured")

        def path_to(self, node: str) -> list[str]:
            return ["me", node]

    rows = {r["instance"]: r["suspect"] for r in router.view(0.0, eps, Paths(), "me")}
    assert rows == {"web-1": True, "web-2": False, "web-3": False}


# -- real agents: one host vanishes ---------------------------------------------------------------


def _info(agent: object) -> dict[str, int]:
    counters: dict[str, int] = agent.info()["counters"]  # type: ignore[attr-defined]
    return counters


def _events(agent: object, event: str) -> list[dict[str, Any]]:
    log: str = agent.log()  # type: ignore[attr-defined]
    return [e for line in log.splitlines() if event in line and (e := json.loads(line)).get("event") == event]


def _mesh(lab: Lab, names: str) -> list[Any]:
    first = lab.start_agent(names[0])
    agents = [first] + [lab.start_agent(n, join=[first.addr]) for n in names[1:]]
    wait_for(lambda: all((v := x.try_members()) is not None and all(v.get(n, {}).get("status") == "alive"
                                                                      for n in names) for x in agents),
             30, f"{', '.join(names)} alive everywhere")
    return agents


def _serve(lab: Lab, agent: Any, service: str, instance: str, port: int, protocol: str) -> None:
    """A demo service on ``agent``'s host (it answers with its id), registered there."""
    node = agent.name
    lab.run_in(lab.hosts[node], [sys.executable, "-m", "cli.main", "demo-service", "--port", str(port),
                                 "--host", "127.0.0.1", "--id", instance], f"{instance}.log")
    log = lab.workdir / f"{instance}.log"
    wait_for(lambda: "listening" in log.read_text(errors="replace"), 30, f"{instance} listening",
             lambda: log.read_text(errors="replace"))
    agent.call("PUT", "/v1/services", {"name": service, "id": instance, "port": port, "address": "127.0.0.1",
                                       "protocol": protocol})


def _routable(a: Any, service: str, instances: set[str]) -> None:
    """Every instance routable from ``a`` in full (past slow start), with an RTT estimate to its host."""
    def routes() -> dict[str, tuple[object, object]]:
        return {r["instance"]: (r["rtt_ms"], r["weight"]) for r in a.call("GET", f"/v1/routes?service={service}")}

    wait_for(lambda: (r := routes()).keys() == instances and all(
        rtt is not None and weight == 1.0 for rtt, weight in r.values()), 60,
        f"{sorted(instances)} routable from {a.name} in full, with an RTT estimate", lambda: json.dumps(routes()))


def _call(a: Any, port: int) -> str:
    answer, ms, error = call_once(a.ip, port, "/", 10)
    assert answer is not None, f"a call failed: {error}\n{a.log()[-3000:]}"
    instance: str = answer["instance"]
    return instance


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["tcp", "http"])
def test_a_call_through_the_mesh_does_not_wait_for_a_vanished_host(lab: Lab, protocol: str) -> None:
    a, b, c = _mesh(lab, "abc")
    for agent in (b, c):
        _serve(lab, agent, "web", f"web-{agent.name}", 8080, protocol)
    # Round robin: the calls after the vanishing alternate, so the vanished host's instance is picked.
    a.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"{a.ip}:9000", "public": True, "lb": "round_robin"})
    _routable(a, "web", {"web-b", "web-c"})
    assert not a.call("GET", "/v1/tunnels")  # no call made yet: the first to c will dial it

    # c vanishes: everything to and from its network interface dropped, so nothing answers, not even a RST.
    ns = lab.hosts["c"].ns
    sh("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", "eth0", "-j", "DROP")
    sh("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-o", "eth0", "-j", "DROP")
    answers = [_call(a, 9000) for _ in range(4)]
    assert set(answers) == {"web-b"}, answers
    # The calls that tried c left its dial at the RTT bound (b had web-b for them); the dial went on alone.
    assert _info(a)["dataplane.dials_rtt_bounded"] >= 1, a.log()[-3000:]
    bounded = _events(a, "tunnel_dial_rtt_bound")
    assert bounded and all(e["peer"] == "c" and e["bound_ms"] < 1000 for e in bounded), bounded
    tried_c = [e for e in _events(a, "proxy_connect_failed") if e["node"] == "c"]
    assert tried_c and all("RTT bound" in e["error"] for e in tried_c), tried_c
    # The dial itself ends at its own timeouts, not a caller's: abandoned by every caller that met it.
    wait_for(lambda: bool(_events(a, "tunnel_dial_failed")), 30, "the dial to c over", lambda: a.log()[-3000:])
    assert all(e["peer"] == "c" and e["abandoned_by"] >= 1 for e in _events(a, "tunnel_dial_failed"))


#: A TCP forwarder that holds every chunk ``delay`` seconds before passing it on: a peer whose agent is
#: slow to answer (its kernel accepts at once, its process answers the handshake late).  It dials out
#: with SO_MARK 1, which the REDIRECT rule that sends it the traffic leaves alone.
SLOW_PATH = r"""
import socket, sys, threading, time
listen, host, port, delay = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", listen)); s.listen(128)
def pump(a, b):
    try:
        while d := a.recv(65536):
            time.sleep(delay)
            b.sendall(d)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def one(c):
    u = socket.socket(); u.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1); u.connect((host, port))
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    pump(u, c)
print("listening", flush=True)
while True:
    c, _ = s.accept(); threading.Thread(target=one, args=(c,), daemon=True).start()
"""


def _slow_path(lab: Lab, src: str, dst: Any, listen: int, delay: float) -> None:
    """Everything ``src`` sends to ``dst``'s tunnel port goes through a SLOW_PATH forwarder on ``src``."""
    lab.run_in(lab.hosts[src], [sys.executable, "-c", SLOW_PATH, str(listen), dst.ip, str(TUNNEL_PORT), str(delay)],
               f"slow-{dst.name}.log")
    log = lab.workdir / f"slow-{dst.name}.log"
    wait_for(lambda: "listening" in log.read_text(errors="replace"), 30, "slow path up")
    sh("ip", "netns", "exec", lab.hosts[src].ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", dst.ip,
       "--dport", str(TUNNEL_PORT), "-m", "mark", "!", "--mark", "1", "-j", "REDIRECT", "--to-ports", str(listen))


@pytest.mark.slow
def test_a_live_but_slow_peer_on_a_busy_host_is_still_reached(lab: Lab) -> None:
    """The RTT bound never fails a call that waiting would have served.  b and c answer a's handshake
    300 ms late (a forwarder holds each chunk 150 ms: 15 times the RTT bound), as a busy agent would;
    d's host drops a's first SYNs, as a host that is briefly unreachable would; CPU burners keep the
    machine's cores busy throughout."""
    a, b, c, d = _mesh(lab, "abcd")
    _serve(lab, b, "solo", "solo-b", 8081, "http")
    for agent in (b, c, d):
        _serve(lab, agent, "web", f"web-{agent.name}", 8080, "http")
    a.call("PUT", "/v1/upstreams", {"service": "solo", "listen": f"{a.ip}:9001", "public": True})
    a.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"{a.ip}:9000", "public": True, "lb": "round_robin"})
    _routable(a, "solo", {"solo-b"})
    _routable(a, "web", {"web-b", "web-c", "web-d"})
    assert not a.call("GET", "/v1/tunnels")
    _slow_path(lab, "a", b, 17001, 0.15)
    _slow_path(lab, "a", c, 17002, 0.15)
    no_syn = ["-p", "tcp", "--syn", "-d", d.ip, "--dport", str(TUNNEL_PORT), "-j", "DROP"]
    sh("ip", "netns", "exec", lab.hosts["a"].ns, "iptables", "-A", "OUTPUT", *no_syn)
    burners = [lab.procs.start([sys.executable, "-c", "while True: pass"], lab.workdir / f"burner{i}.log",
                               dict(os.environ), ROOT) for i in range(3)]
    try:
        # solo has one instance: its call waits for b's slow handshake, and gets its answer.
        assert _call(a, 9001) == "solo-b"
        # web's calls that meet c's slow handshake wait for it too, though web-b is there: c's host answered.
        answers = [_call(a, 9000) for _ in range(2)]
        while "web-c" not in answers and len(answers) < 12:
            answers.append(_call(a, 9000))
        assert "web-c" in answers, answers
        assert {e["peer"] for e in _events(a, "tunnel_dial_rtt_bound")} <= {"d"}, a.log()[-3000:]
        # A call that meets d's silence leaves at its RTT bound for another instance (maybe already done) ...
        while _info(a)["dataplane.dials_rtt_bounded"] == 0 and len(answers) < 24:
            answers.append(_call(a, 9000))
        assert _info(a)["dataplane.dials_rtt_bounded"] >= 1, (answers, a.log()[-3000:])
        rows = {r["instance"]: r for r in a.call("GET", "/v1/routes?service=web")}
        assert rows["web-d"]["last_failure"] is None, rows["web-d"]  # leaving was the caller's choice
        # ... and once d answers, the dial it left comes up and serves the calls after it.
        sh("ip", "netns", "exec", lab.hosts["a"].ns, "iptables", "-D", "OUTPUT", *no_syn)
        wait_for(lambda: _info(a)["dataplane.dials_late"] >= 1, 30, "the late session to d", lambda: a.log()[-3000:])
        assert "d" in {t["peer"] for t in a.call("GET", "/v1/tunnels")}
        later = [_call(a, 9000) for _ in range(6)]
        assert "web-d" in later, later
        assert all(e["peer"] == "d" for e in _events(a, "tunnel_dial_rtt_bound"))
    finally:
        for p in burners:
            os.killpg(p.pid, signal.SIGKILL)


def test_a_discovery_chain_fails_over_past_a_target_whose_instances_are_all_suspect() -> None:
    chain = DiscoveryChain("web", None, {"web": {"failover": [{"service": "web-backup"}]}})
    suspect = Endpoint("n1", "web-1", "127.0.0.1", 1, "web", suspect=True)
    backup = Endpoint("n2", "backup-1", "127.0.0.1", 1, "web-backup")
    catalog = {"web": [suspect], "web-backup": [backup]}
    r = chain.resolve(Target("web"), lambda s: list(catalog.get(s, [])))
    assert r.endpoints == [backup] and r.failed_over
    catalog["web-backup"] = [Endpoint("n2", "backup-1", "127.0.0.1", 1, "web-backup", suspect=True)]
    r = chain.resolve(Target("web"), lambda s: list(catalog.get(s, [])))
    assert r.endpoints == [suspect] and not r.failed_over  # all suspect: the chosen target's, tried anyway
