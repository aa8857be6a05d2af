"""docker-compose.yml's mesh, run without Docker: each agent in a network namespace of its own.

The harness reads docker-compose.yml and runs its services as they are
written -- same commands, same environment, the seeds and services by name --
with each agent service in its own namespace on a shared bridge (a host of its
own, with its own address and an /etc/hosts naming the others, as compose's
DNS does) and each sidecar (``network_mode: service:X``) in its agent's
namespace, started once that agent's API answers.  The only differences: the
key is a fresh one instead of .env's, and MESH_DATA_DIR (the image's ENV)
points into the test's directory.  So these tests cannot drift from the
compose file; tests/test_compose.py checks it with ``docker-compose config``.

Needs root, ``ip`` and ``iptables`` (skipped otherwise, saying why).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import ComposeService, Lab, NsLocalAgent, in_netns, load_compose, sh, skip_reason

from cli.demo_service import call_once
from gossip.keyring import generate_key
from simulations.harness import ROOT, wait_for

pytestmark = pytest.mark.slow

COMPOSE = ROOT / "docker-compose.yml"
ANSWER = re.compile(r"^instance=(\S+)")


@dataclass
class Mesh:
    lab: Lab
    services: dict[str, ComposeService]
    agents: dict[str, NsLocalAgent]

    # -- what the compose file says ---------------------------------------------------------------

    def instances(self, service: str) -> dict[str, str]:
        """instance id -> the agent it runs next to, for the demo service ``service``."""
        out = {}
        for s in self.services.values():
            args = s.command
            if args[:1] == ["demo-service"] and args[args.index("--register") + 1] == service:
                out[args[args.index("--id") + 1]] = s.network_of
        return out

    @property
    def client(self) -> ComposeService:
        (client,) = [s for s in self.services.values() if s.command[:1] == ["demo-client"]]
        return client

    def upstream(self) -> tuple[str, int, str]:
        """(agent, port, service) of the client's upstream."""
        args = self.client.command
        url = args[args.index("--url") + 1]
        port = int(url.split("/")[2].rsplit(":", 1)[1])
        return self.client.network_of, port, args[args.index("--upstream") + 1]

    # -- what the running mesh says ---------------------------------------------------------------

    def views(self, observers: list[str] | None = None) -> dict[str, dict[str, str] | None]:
        out: dict[str, dict[str, str] | None] = {}
        for name in observers or list(self.agents):
            ms = self.agents[name].try_members()
            out[name] = None if ms is None else {n: m["status"] for n, m in ms.items()}
        return out

    def wait_statuses(self, expect: dict[str, dict[str, str]], timeout: float, what: str) -> None:
        """Wait until each observer sees each named member with the given status."""

        def ok() -> bool:
            views = self.views(list(expect))
            return all(v is not None and all(v.get(m) == st for m, st in expect[o].items())
                       for o, v in views.items())

        wait_for(ok, timeout, what, lambda: json.dumps(self.views(list(expect)), indent=1), interval=0.25)

    def wait_all_alive(self, timeout: float) -> None:
        names = list(self.agents)
        self.wait_statuses({o: dict.fromkeys(names, "alive") for o in names}, timeout,
                           f"all of {names} alive in every view")

    def call_upstream(self) -> tuple[dict[str, object] | None, str]:
        """One call through the client's upstream, from inside the client's namespace."""
        agent, port, _ = self.upstream()
        answer, _, error = in_netns(self.agents[agent].ns, lambda: call_once("127.0.0.1", port, "/", 10))
        return answer, error

    def client_answers(self) -> list[str]:
        """The instances the compose client has heard from, in order (its log, one line per call)."""
        text = (self.lab.workdir / f"{self.client.name}.log").read_text(errors="replace")
        return [m.group(1) for line in text.splitlines() if (m := ANSWER.match(line))]

    def routes(self) -> list[dict[str, object]]:
        agent, _, service = self.upstream()
        rows: list[dict[str, object]] = self.agents[agent].call("GET", f"/v1/routes?service={service}")
        return rows

    def log_tail(self, name: str) -> str:
        return (self.lab.workdir / f"{name}.log").read_text(errors="replace")[-3000:]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    key = generate_key()
    services = load_compose(COMPOSE, {"MESH_CLUSTER_KEY": key})
    lab = Lab(tmp_path, key)
    try:
        agents = lab.start_compose(services, lambda s: {"MESH_DATA_DIR": str(tmp_path / f"data-{s.network_of}")})
        m = Mesh(lab, services, agents)
        m.wait_all_alive(60)
        yield m
    finally:
        lab.close()


def wait_for_passing(m: Mesh, service: str, expected: set[str], timeout: float = 60) -> None:
    agent = m.agents[m.upstream()[0]]

    def ids() -> set[str]:
        return {i["id"] for i in agent.call("GET", f"/v1/services/{service}?passing")}

    wait_for(lambda: ids() == expected, timeout, f"{agent.name} sees exactly {sorted(expected)} passing",
             lambda: str(sorted(ids())))


def answers_since(m: Mesh, start: int, count: int, timeout: float = 60) -> list[str]:
    """The next ``count`` instances the compose client hears from after its ``start``-th answer."""
    wait_for(lambda: len(m.client_answers()) >= start + count, timeout, f"{count} more client answers",
             lambda: m.log_tail(m.client.name))
    return m.client_answers()[start:start + count]


def test_the_cluster_forms_through_the_seeds_and_registers_every_service(mesh: Mesh) -> None:
    seeds = mesh.services["agent3"].environment["MESH_JOIN"].split(",")
    assert seeds == ["agent1:7946", "agent2:7946"]
    for agent in mesh.agents.values():
        # A seed that started before the other may still be between join retries when all is converged.
        wait_for(lambda a=agent: a.info()["joined"], 30, f"{agent.name}'s join through its seeds succeeded",
                 lambda a=agent: str(a.info()["join_error"]))
        info = agent.info()
        assert "join_refused" not in agent.log(), agent.log()[-2000:]
        # It advertises its own host's address, found from its host name as in a container.
        assert info["address"] == f"{agent.ip}:7946"
    for service in ("web", "api"):
        expected = set(mesh.instances(service))
        for agent in mesh.agents.values():
            wait_for(lambda a=agent, s=service, e=expected: {
                i["id"] for i in a.call("GET", f"/v1/services/{s}?passing")} == e,
                60, f"{agent.name} sees {sorted(expected)} passing")
        shown = {i["id"]: i["node"] for i in mesh.agents["agent1"].call("GET", f"/v1/services/{service}")}
        assert shown == mesh.instances(service)


def test_the_client_reaches_the_demo_service_through_the_mesh(mesh: Mesh) -> None:
    web = mesh.instances("web")
    agent, _, service = mesh.upstream()
    assert agent not in web.values(), "the client's calls must cross the mesh"
    wait_for(lambda: len(mesh.client_answers()) >= 10, 90, "the compose client hears 10 answers",
             lambda: mesh.log_tail(mesh.client.name))
    assert set(mesh.client_answers()) <= set(web)
    answer, error = mesh.call_upstream()
    assert answer is not None, error
    assert answer["instance"] in web and answer["node"] == web[str(answer["instance"])]
    # Every instance is routable from the client's agent, each straight to its own agent (once its
    # agent has seen every instance pass: on a loaded machine one may still be on its way).
    expected = {iid: [agent, node] for iid, node in web.items()}
    wait_for(lambda: {str(r["instance"]): r["path"] for r in mesh.routes()} == expected, 30,
             "a direct route to every instance", lambda: str(mesh.routes()))


def routed(m: Mesh) -> set[str]:
    return {str(r["instance"]) for r in m.routes()}


def busiest(m: Mesh) -> str:
    """The instance the compose client hears from most (which one depends on the balancer's choices)."""
    wait_for(lambda: len(m.client_answers()) >= 10, 90, "10 client answers", lambda: m.log_tail(m.client.name))
    answers = m.client_answers()
    return max(set(answers), key=answers.count)


def test_a_host_whose_link_goes_down_is_declared_dead_routed_around_and_taken_back(mesh: Mesh) -> None:
    web = mesh.instances("web")
    wait_for_passing(mesh, "web", set(web))
    # Take away the instance the client is using, so its calls must move.
    victim_instance = busiest(mesh)
    victim = web[victim_instance]
    others = [n for n in mesh.agents if n != victim]
    assert mesh.upstream()[0] in others

    sh("ip", "-n", mesh.agents[victim].ns, "link", "set", "eth0", "down")
    mesh.wait_statuses({o: {victim: "dead"} for o in others}, 60, f"{others} see {victim} dead")
    wait_for_passing(mesh, "web", set(web) - {victim_instance})
    assert routed(mesh) == set(web) - {victim_instance}
    # From here on, every call lands on the remaining instances, and none fails.
    later = answers_since(mesh, len(mesh.client_answers()), 10)
    assert victim_instance not in later, later
    for _ in range(10):
        answer, error = mesh.call_upstream()
        assert answer is not None, error
        assert answer["instance"] != victim_instance

    sh("ip", "-n", mesh.agents[victim].ns, "link", "set", "eth0", "up")
    mesh.wait_all_alive(90)
    wait_for_passing(mesh, "web", set(web), 90)
    wait_for(lambda: routed(mesh) == set(web), 60, f"{victim_instance} routable again", lambda: str(mesh.routes()))
    start = len(mesh.client_answers())
    assert set(answers_since(mesh, start, 5)) <= set(web)


def test_a_partition_into_two_halves_heals_by_itself_once_lifted(mesh: Mesh) -> None:
    names = list(mesh.agents)
    client_agent = mesh.upstream()[0]
    # Each half keeps one seed; the client's half keeps one web instance.
    half_a = ["agent1", "agent3", "agent5"]
    half_b = ["agent2", "agent4"]
    assert sorted(half_a + half_b) == sorted(names) and client_agent in half_a
    web = mesh.instances("web")
    wait_for_passing(mesh, "web", set(web))
    for a in half_a:
        for b in half_b:
            mesh.lab.cut(a, b)
            mesh.lab.cut(b, a)
    expect = {o: {n: ("alive" if (n in half_a) == (o in half_a) else "dead") for n in names} for o in names}
    mesh.wait_statuses(expect, 90, "each half sees itself alive and the other dead")
    reachable = {iid for iid, node in web.items() if node in half_a}
    wait_for_passing(mesh, "web", reachable)
    for _ in range(5):
        answer, error = mesh.call_upstream()
        assert answer is not None, error
        assert answer["instance"] in reachable

    for n in names:
        mesh.lab.heal(n)
    # No join, no restart: the agents' periodic reconnect to members marked dead finds the other half.
    mesh.wait_all_alive(120)
    wait_for_passing(mesh, "web", set(web), 90)
    wait_for(lambda: routed(mesh) == set(web), 60, "every web instance routable again", lambda: str(mesh.routes()))
    for _ in range(5):
        answer, error = mesh.call_upstream()
        assert answer is not None, error
