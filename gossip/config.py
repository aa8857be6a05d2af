"""Protocol timings, with named profiles.

``lan`` copies hashicorp/memberlist's DefaultLANConfig so that every figure we
measure can be compared side by side with Serf, which runs on memberlist.
``local`` is for loopback tests, where round trips are microseconds and we want
answers in seconds; ``wan`` follows DefaultWANConfig.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GossipConfig:
    #: Period of the SWIM failure detector: one member probed per period.
    probe_interval: float = 1.0
    #: How long to wait for a direct ack before asking others (ping-req).
    probe_timeout: float = 0.5
    #: k in SWIM: how many members are asked to probe indirectly.
    indirect_checks: int = 3
    #: How often piggy-backed updates are pushed to random members.
    gossip_interval: float = 0.2
    #: How many members each gossip round goes to.
    gossip_nodes: int = 3
    #: A fresh update does not wait for the next gossip tick: an extra round
    #: goes out this long after the previous one at the earliest.  (memberlist
    #: always waits for the tick; set this to gossip_interval to do the same.)
    eager_gossip_gap: float = 0.05
    #: (Holding rounds back to the tick during a burst was tried: in the
    #: simulator a 50-node join then took 0.60 s instead of 0.30 s and sent
    #: more packets, not fewer, because the burst lasts longer.)
    #: Dead members keep receiving gossip this long, so they can refute.
    gossip_to_the_dead: float = 30.0
    #: Lifeguard: suspicion timeout min = suspicion_mult * log10(N) * probe_interval.
    suspicion_mult: int = 4
    #: Lifeguard: suspicion timeout max = suspicion_max_timeout_mult * min.
    suspicion_max_timeout_mult: int = 6
    #: Each update is retransmitted retransmit_mult * ceil(log10(N+1)) times.
    retransmit_mult: int = 4
    #: Lifeguard local health: probe interval/timeout stretch up to this factor.
    awareness_max_multiplier: int = 8
    #: Full-state anti-entropy exchange with one random member this often.
    push_pull_interval: float = 30.0
    #: Deadline for a whole TCP push-pull exchange.
    tcp_timeout: float = 10.0
    #: Every reconnect_interval, push-pull with one member marked dead, so the
    #: halves of a healed partition find each other with nobody's help ...
    reconnect_interval: float = 30.0
    #: ... for this long after it was marked dead.
    reconnect_timeout: float = 72 * 3600.0
    #: Dead and left members are forgotten after this long.
    dead_reap_after: float = 72 * 3600.0
    #: Join retries back off from this ...
    join_retry_min: float = 1.0
    #: ... up to this.
    join_retry_max: float = 30.0
    #: How long a graceful leave waits for its broadcast to spread.
    leave_propagate_timeout: float = 5.0
    #: Largest UDP datagram we send or accept, sealed (memberlist's UDPBufferSize).
    udp_packet_size: int = 1400
    #: When a direct probe gets no ack, also ping over TCP (memberlist's
    #: fallback ping, on by default there too): a member behind a firewall that
    #: drops UDP stays alive, and is reported as UDP-blocked.
    tcp_fallback: bool = True
    #: Lifeguard's three refinements: the local health multiplier (and the
    #: nacks that feed it), the dynamic suspicion timeout and the buddy system.
    #: False gives plain SWIM, for measuring what Lifeguard buys (the
    #: simulator's false-positive scenario): probes never stretch, nacks are
    #: neither asked for nor counted, every suspicion lasts suspicion_min(N)
    #: whatever the confirmations, and a probe does not tell a suspect member
    #: that it is suspected.
    lifeguard: bool = True

    def with_overrides(self, overrides: dict[str, Any]) -> GossipConfig:
        """Return a copy with some fields replaced; unknown names are errors."""
        names = {f.name: f for f in dataclasses.fields(self)}
        clean: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in names:
                raise ValueError(f"unknown timing setting {key!r}")
            current = getattr(self, key)
            if isinstance(current, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"timing setting {key!r} must be a number")
            clean[key] = type(current)(value)
            if clean[key] <= 0:
                raise ValueError(f"timing setting {key!r} must be positive")
        return dataclasses.replace(self, **clean)

    # -- derived quantities (memberlist util.go) --------------------------------

    def retransmit_limit(self, n_members: int) -> int:
        """retransmit_mult * ceil(log10(N + 1)), memberlist's retransmitLimit."""
        scale = math.ceil(math.log10(n_members + 1))
        return self.retransmit_mult * max(1, scale)

    def settle_quiet(self) -> float:
        """After a join, how long without news of a new member before the settling push-pull
        (gossip.sync): half a gossip round.  While a burst of joins spreads, news comes every
        eager gossip gap (a quarter of a round on lan); a settle that still finds news is
        followed by another, so a lull taken for the end costs a push-pull, not a member.
        Why half a round and not a whole one: docs/membership.md, "Settling after a join"."""
        return 0.5 * self.gossip_interval

    def suspicion_min(self, n_members: int) -> float:
        """Lifeguard's minimum suspicion timeout (memberlist suspicionTimeout)."""
        node_scale = max(1.0, math.log10(max(1.0, float(n_members))))
        return self.suspicion_mult * node_scale * self.probe_interval

    def suspicion_max(self, n_members: int) -> float:
        return self.suspicion_max_timeout_mult * self.suspicion_min(n_members)

    def push_pull_scaled(self, n_members: int) -> float:
        """Back off push-pull in large clusters (memberlist pushPullScale)."""
        threshold = 32
        if n_members <= threshold:
            return self.push_pull_interval
        multiplier = math.ceil(math.log2(n_members) - math.log2(threshold)) + 1.0
        return self.push_pull_interval * multiplier


LAN = GossipConfig()

LOCAL = GossipConfig(
    probe_interval=0.5,
    probe_timeout=0.2,
    indirect_checks=2,
    gossip_interval=0.1,
    gossip_nodes=3,
    eager_gossip_gap=0.025,
    gossip_to_the_dead=10.0,
    suspicion_mult=3,
    suspicion_max_timeout_mult=4,
    retransmit_mult=3,
    push_pull_interval=10.0,
    tcp_timeout=2.0,
    reconnect_interval=5.0,
    reconnect_timeout=600.0,
    dead_reap_after=600.0,
    join_retry_min=0.25,
    join_retry_max=5.0,
    leave_propagate_timeout=2.0,
)

WAN = GossipConfig(
    probe_interval=5.0,
    probe_timeout=3.0,
    gossip_interval=0.5,
    gossip_nodes=4,
    eager_gossip_gap=0.125,
    gossip_to_the_dead=60.0,
    suspicion_mult=6,
    push_pull_interval=60.0,
    tcp_timeout=30.0,
    join_retry_max=60.0,
    leave_propagate_timeout=10.0,
)

PROFILES: dict[str, GossipConfig] = {"lan": LAN, "local": LOCAL, "wan": WAN}
