"""One datagram from a key holder cannot kill a healthy member for good (real agents, the real key)."""

from __future__ import annotations

import base64
import socket
import time

from agent.transport import Sealer
from gossip.keyring import Keyring
from gossip.wire import MAX_INCARNATION, Dead, Suspect, encode_message, pack_packet
from simulations.harness import Cluster


def test_a_forged_death_at_the_largest_incarnation_is_dropped_everywhere(cluster: Cluster, cluster_key: str) -> None:
    names = ["ia", "ib", "ic"]
    a = cluster.start("ia")
    for n in names[1:]:
        cluster.start(n, join=[a.addr])
    cluster.wait_converged(names)
    sealer = Sealer(Keyring(base64.b64decode(cluster_key)))
    packet = sealer.seal(pack_packet([encode_message(Dead("ic", MAX_INCARNATION, "ia")),
                                      encode_message(Suspect("ic", MAX_INCARNATION - 1, "ib"))]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for agent in cluster.agents.values():
            s.sendto(packet, ("127.0.0.1", agent.gossip_port))
    # The victim stays alive in every view, for longer than a suspicion would take to end in death.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        views = cluster.statuses()
        assert all(v.get("ic") == "alive" for v in views.values()), views
        time.sleep(0.2)
    for agent in cluster.agents.values():
        dropped = agent.info()["counters"]["dropped"]
        assert dropped.get("accusation_beyond_alive", 0) >= 1, (agent.name, dropped)
