"""Real networks, one agent per network namespace (tests/netns.py): partitions that heal, UDP blocked."""

from __future__ import annotations

import time

import pytest
from netns import Lab, sh

from gossip.config import LOCAL
from simulations.harness import wait_for

pytestmark = pytest.mark.slow


def views(lab: Lab) -> dict[str, dict[str, str]]:
    out = {}
    for name, agent in lab.agents.items():
        ms = agent.try_members()
        if ms is not None:
            out[name] = {n: m["status"] for n, m in ms.items()}
    return out


def test_halves_of_a_partition_find_each_other_again_with_nobody_s_help(lab: Lab) -> None:
    names = [f"p{i}" for i in range(1, 7)]
    seed = lab.start_agent(names[0])
    for n in names[1:]:
        lab.start_agent(n, join=[seed.addr])

    def all_alive() -> bool:
        v = views(lab)
        return len(v) == 6 and all(all(s.get(n) == "alive" for n in names) for s in v.values())

    wait_for(all_alive, 30, "6 alive everywhere", lambda: str(views(lab)))
    left, right = names[:3], names[3:]
    for a in left:
        for b in right:
            lab.cut(a, b)
            lab.cut(b, a)

    def split() -> bool:
        v = views(lab)
        return len(v) == 6 and all(
            all(v[x][y] == "dead" for y in (right if x in left else left)) for x in names)

    wait_for(split, 60, "each half sees the other dead", lambda: str(views(lab)))
    # Longer than gossip_to_the_dead: from here on only the reconnect loop crosses the gap.
    time.sleep(LOCAL.gossip_to_the_dead + 1.0)
    assert split()
    for n in names:
        lab.heal(n)
    healed_at = time.monotonic()
    # Within two reconnect intervals (plus one poll), with no command issued.
    wait_for(all_alive, 2 * LOCAL.reconnect_interval + 1.0, "all 6 alive again", lambda: str(views(lab)))
    print(f"healed in {time.monotonic() - healed_at:.1f} s")


def test_a_member_whose_udp_is_dropped_stays_alive_everywhere(lab: Lab) -> None:
    names = ["u1", "u2", "u3", "u4"]
    seed = lab.start_agent("u1")
    for n in names[1:]:
        lab.start_agent(n, join=[seed.addr])
    wait_for(lambda: len(views(lab)) == 4 and all(all(s.get(n) == "alive" for n in names)
                                                  for s in views(lab).values()), 30, "converged")
    ns = lab.hosts["u4"].ns
    sh("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-p", "udp", "-j", "DROP")
    sh("ip", "netns", "exec", ns, "iptables", "-A", "OUTPUT", "-p", "udp", "-j", "DROP")
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        v = views(lab)
        for observer, seen in v.items():
            bad = {n: s for n, s in seen.items() if s != "alive"}
            assert not bad, f"{observer} sees {bad} while only UDP is blocked"
        time.sleep(1.0)
    # ... and the others say why it only answers over TCP.
    for n in ("u1", "u2", "u3"):
        assert "u4" in lab.agents[n].info()["udp_blocked"]
        assert lab.agents[n].members()["u4"]["udp_blocked"] is True
