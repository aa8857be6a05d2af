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
import random
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from netns import Lab, sh

from cli.demo_service import call_once
from dataplane.balancer import POLICIES, Balancer, Candidate
from dataplane.discovery_chain import DiscoveryChain, Target
from dataplane.noise import generate_keypair
from dataplane.proxy import Endpoint
from dataplane.routing import Router
from dataplane.tunnel import DIAL_RTT_FACTOR, DIAL_RTT_FLOOR, TunnelError, TunnelManager, dial_bound
from simulations.harness import wait_for

# -- the bound ------------------------------------------------------------------------------------


def test_the_dial_bound_is_a_few_rtts_with_a_floor_and_never_past_the_timeout() -> None:
    assert dial_bound(None, 2.0) == 2.0  # nothing known: the configured timeout alone
    assert dial_bound(0.0002, 2.0) == DIAL_RTT_FLOOR  # a LAN: the floor
    assert dial_bound(0.040, 2.0) == pytest.approx(DIAL_RTT_FACTOR * 0.040)
    assert dial_bound(1.5, 2.0) == 2.0  # a far peer: still within the timeout
    for nonsense in (float("nan"), float("inf"), -1.0):
        assert dial_bound(nonsense, 2.0) == 2.0
    assert dial_bound(0.1, 5.0, floor=0.01, factor=2.0) == pytest.approx(0.2)


class _Silent:
    """Membership's answers for one peer whose host never answers a SYN (gone, no RST)."""

    def __init__(self) -> None:
        self.public = generate_keypair()[1]
        self.dials = 0

    def member_for_key(self, static_public: bytes) -> str | None:
        return "gone" if static_public == self.public else None

    def tunnel_peer(self, name: str) -> tuple[tuple[str, int], bytes] | None:
        return (("192.0.2.1", 7948), self.public) if name == "gone" else None

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        self.dials += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def _dial_time(manager: TunnelManager) -> tuple[float, str]:
    start = trio.current_time()
    with pytest.raises(TunnelError) as err:
        await manager.open_stream("gone", b"x")
    return trio.current_time() - start, str(err.value)


async def _with_manager(rtt: Callable[[str], float | None] | None,
                        body: Callable[[TunnelManager, _Silent], Awaitable[None]]) -> None:
    silent = _Silent()
    manager = TunnelManager("me", generate_keypair()[0], silent, connect=silent.connect, handshake_timeout=2.0,
                            direct_retry_after=30.0, rtt=rtt, use_reactor=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.serve)
        await body(manager, silent)
        await manager.aclose()


async def test_a_first_dial_to_a_silent_host_gives_up_at_its_rtt_bound(
        autojump_clock: trio.testing.MockClock) -> None:
    async def body(manager: TunnelManager, silent: _Silent) -> None:
        waited, error = await _dial_time(manager)
        # On the mock clock: exactly the bound (3 x 2 ms is below the floor), not the 2 s timeout.
        assert waited == pytest.approx(DIAL_RTT_FLOOR) and "RTT bound" in error, error
        assert manager.stats["dials_rtt_bounded"] == 1
        # Each miss doubles the peer's next bound (an estimate that is wrong, or a lost SYN, is outgrown
        # in a few dials), up to the timeout; the misses are forgotten direct_retry_after later.
        for expected in (0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0):
            waited, error = await _dial_time(manager)
            assert waited == pytest.approx(expected), (expected, error)
        assert "in 2s" in error and manager.stats["dials_rtt_bounded"] == 6
        await trio.sleep(30)
        waited, _ = await _dial_time(manager)
        assert waited == pytest.approx(DIAL_RTT_FLOOR)
        assert manager.stats["dials_rtt_bounded"] == 7 and silent.dials == 9

    await _with_manager(lambda peer: 0.002, body)


async def test_a_far_peer_gets_a_multiple_of_its_rtt_and_an_unknown_one_the_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    async def far(manager: TunnelManager, silent: _Silent) -> None:
        waited, _ = await _dial_time(manager)
        assert waited == pytest.approx(DIAL_RTT_FACTOR * 0.2)

    async def unknown(manager: TunnelManager, silent: _Silent) -> None:
        waited, error = await _dial_time(manager)
        assert waited == pytest.approx(2.0) and "in 2s" in error
        assert manager.stats["dials_rtt_bounded"] == 0

    await _with_manager(lambda peer: 0.2, far)
    await _with_manager(lambda peer: None, unknown)
    await _with_manager(None, unknown)


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


@pytest.mark.slow
def test_a_call_through_the_mesh_does_not_wait_for_a_vanished_host(lab: Lab) -> None:
    a = lab.start_agent("a")
    b = lab.start_agent("b", join=[a.addr])
    c = lab.start_agent("c", join=[a.addr])
    agents = [a, b, c]
    wait_for(lambda: all((v := x.try_members()) is not None and all(v.get(n, {}).get("status") == "alive"
                                                                      for n in "abc") for x in agents),
             30, "a, b, c alive everywhere")
    for node, agent in (("b", b), ("c", c)):
        lab.run_in(lab.hosts[node], [sys.executable, "-m", "cli.main", "demo-service", "--port", "8080",
                                     "--host", "127.0.0.1", "--id", f"web-{node}"], f"web-{node}.log")
        log = lab.workdir / f"web-{node}.log"
        wait_for(lambda log=log: "listening" in log.read_text(errors="replace"), 30, f"web-{node} listening",
                 lambda log=log: log.read_text(errors="replace"))
        agent.call("PUT", "/v1/services", {"name": "web", "id": f"web-{node}", "port": 8080, "address": "127.0.0.1"})
    # Round robin: the calls after the vanishing alternate, so the vanished host's instance is picked.
    a.call("PUT", "/v1/upstreams", {"service": "web", "listen": f"{a.ip}:9000", "public": True, "lb": "round_robin"})

    def routes() -> dict[str, tuple[object, object]]:
        return {r["instance"]: (r["rtt_ms"], r["weight"]) for r in a.call("GET", "/v1/routes?service=web")}

    # Both instances routable in full (past slow start), and a has measured its RTT to both hosts; no call
    # made yet, so no tunnel.
    wait_for(lambda: (r := routes()).keys() == {"web-b", "web-c"} and all(
        rtt is not None and weight == 1.0 for rtt, weight in r.values()), 60,
        "web-b and web-c routable from a in full, with an RTT estimate", lambda: json.dumps(routes()))
    assert not a.call("GET", "/v1/tunnels")

    # c vanishes: everything to and from its network interface dropped, so nothing answers, not even a RST.
    ns = lab.hosts["c"].ns
    sh("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", "eth0", "-j", "DROP")
    sh("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-o", "eth0", "-j", "DROP")
    answers = []
    for _ in range(4):
        started = time.monotonic()
        answer, ms, error = call_once(a.ip, 9000, "/", 10)
        assert answer is not None, f"a call failed: {error}\n{a.log()[-3000:]}"
        answers.append((answer["instance"], round((time.monotonic() - started) * 1000, 1)))
    print(f"\ncalls after c vanished (instance, ms): {answers}")
    assert {i for i, _ in answers} == {"web-b"}, answers
    # The dial to c was given up at its RTT bound, directly and through b; no dial waited a timeout.
    assert _info(a)["dataplane.dials_rtt_bounded"] >= 1, a.log()[-3000:]
    bounded = [json.loads(line) for line in a.log().splitlines() if "tunnel_dial_rtt_bound" in line]
    assert bounded and all(e["peer"] == "c" and e["bound_ms"] < 1000 for e in bounded), bounded
    failed = [json.loads(line) for line in a.log().splitlines() if "tunnel_dial_failed" in line]
    assert failed and all("RTT bound" in e["error"] and " in 2s" not in e["error"] for e in failed), failed


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
