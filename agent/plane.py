"""The agent's data plane: the proxy, the tunnel manager and the upstreams, built by the first need.

Most of dataplane/ is only needed by a node that carries service traffic: one
with a local service (peers' streams reach it), an upstream (its clients
connect through it), or a peer dialling its tunnel (a relay, or a caller
that saw a service here before we did).  An agent that only gossips never
builds this, and never imports what it would need; the agent's runner
(agent/runner.py) builds it on the first of those and keeps it for good.
Until then the runner answers every view from what it knows without it: no
sessions, no upstreams, the tunnel counters at zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.entry_kinds import SERVICE_DEFAULTS
from agent.upstreams import Upstreams
from dataplane import relay
from dataplane.proxy import PeerStream, Proxy
from dataplane.reactor import Reactor
from dataplane.tunnel import TunnelManager

if TYPE_CHECKING:
    from agent.runner import Agent


class DataPlane:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        cfg = agent.cfg
        self.proxy = Proxy(cfg.name, agent.directory, _LateTunnels(self), log=agent.log.warning,
                           authorizer=agent.intentions, info=agent.log.info, paths=agent.directory,
                           chains=agent.config_entries, protocols=agent.directory.protocol_of, sink=agent.traffic)
        self.tunnels = TunnelManager(
            cfg.name, agent.tunnel_private, agent.directory, on_stream=self.on_stream,
            stats=agent.dp_stats, log=agent.log, handshake_timeout=cfg.gossip.tcp_timeout,
            relays=agent.relays_for, rtt=self.proxy.rtt_to,
        )
        self.upstreams = Upstreams(self.proxy, cfg.data_dir, cfg.name,
                                   defaults=lambda service: agent.config_entries.lookup(SERVICE_DEFAULTS, service))

    async def on_stream(self, peer: str, header: bytes, stream: PeerStream) -> None:
        """A stream a peer opened on its session to us: one we relay on, or one for a local instance."""
        if header[:1] == bytes([relay.HEADER_KIND_RELAY]):
            ag = self.agent
            await relay.serve(peer, header, stream, ag.directory, ag.dp_stats,
                              connect_timeout=ag.cfg.gossip.tcp_timeout, log=ag.log.info)
            return
        await self.proxy.handle_stream(peer, header, stream)


class _LateTunnels:
    """Lets the proxy and the tunnel manager refer to each other at construction."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def open_stream(self, peer: str, header: bytes, *,
                          alternative: Callable[[], bool] | None = None) -> PeerStream:
        return await self.plane.tunnels.open_stream(peer, header, alternative=alternative)

    @property
    def reactor(self) -> Reactor:
        """Where the HTTP layer's callbacks run (dataplane.http_turns)."""
        return self.plane.tunnels.reactor
