"""The read-only view of membership and registry that the data plane gets.

dataplane/ never touches gossip state; it asks these few questions, answered
from this agent's current view, so routing follows membership and health as
they change.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.services import LocalServices
from dataplane.endpoint import Endpoint
from gossip.member import MEMBER_CHANGES, Status
from gossip.swim import Membership
from gossip.wire import Address


class MeshDirectory:
    def __init__(self, membership: Membership, services: LocalServices) -> None:
        self.membership = membership
        self.services = services
        #: The tunnel manager's route_to (set once it exists): relays on our session to a member.
        self.tunnel_route: Callable[[str], list[str] | None] | None = None
        #: passing_endpoints' answers, valid while the registry's index and the member records are
        #: unchanged: in http mode every request asks, and the answer changes far less often.
        self._passing: dict[str, list[Endpoint]] = {}
        self._passing_as_of: tuple[int, int, int] = (0, 0, 0)

    # -- for the proxy (dataplane.proxy.InstanceDirectory) ------------------------------------

    def passing_endpoints(self, service: str) -> list[Endpoint]:
        """Passing instances on members that are up.  A suspect member's are listed, marked: the
        balancer tries them only when no other is left (a suspicion is often false -- a slow or
        lossy peer -- and its instances beat none), and the tunnel's dial to it is RTT-bounded.

        The list is shared between callers until something changes: read it, never change it.
        """
        as_of = (self.services.registry.index, MEMBER_CHANGES.value, len(self.membership.members))
        if as_of != self._passing_as_of:
            self._passing.clear()
            self._passing_as_of = as_of
        known = self._passing.get(service)
        if known is not None:
            return known
        out = self._passing[service] = []
        for node, inst in self.services.registry.all_instances():
            if inst.service != service or inst.health != "passing":
                continue
            m = self.membership.members.get(node)
            if m is None or m.status not in (Status.ALIVE, Status.SUSPECT):
                continue
            out.append(Endpoint(node, inst.id, inst.address, inst.port, inst.service, inst.tags, inst.meta,
                                suspect=m.status is Status.SUSPECT))
        return out

    def protocol_of(self, service: str) -> str | None:
        """How the proxy carries ``service``: "http" (per request) or "tcp" (agent.services.effective_protocol);
        None while nothing says (no entry, no instance registered)."""
        return self.services.protocol_of(service)[0]

    def local_endpoint(self, instance_id: str) -> Endpoint | None:
        reg = self.services.registrations.get(instance_id)
        if reg is None:
            return None
        return Endpoint(self.membership.name, reg.id, reg.address, reg.port, reg.name)

    # -- for routing (dataplane.routing.PathView) -------------------------------------------

    def rtt_to(self, node: str) -> tuple[float, str] | None:
        membership = self.membership
        return membership.latency.rtt_estimate(membership.name, node)

    def path_to(self, node: str) -> list[str]:
        me = self.membership.name
        if node == me:
            return [me]
        via = self.tunnel_route(node) if self.tunnel_route is not None else None
        return [me, *(via or []), node]

    # -- for intentions (agent.intentions.Intentions) ----------------------------------------

    def has_instance(self, node: str, service: str) -> bool:
        """Whether ``node`` has an instance of ``service`` in the catalog we hold, whatever its health.

        Health does not matter here: a failing service is still who it is; what
        makes a claimed source unverified is a node that never registered it.
        """
        catalog = self.services.registry.held(node)
        return catalog is not None and any(i.service == service for i in catalog.instances.values())

    # -- for the tunnels (dataplane.tunnel.PeerDirectory) ------------------------------------

    # A tunnel key is trusted only once the signature over it has been checked: a member
    # seen moments ago may not have been yet (gossip.swim.VERIFY_DELAY).

    def member_for_key(self, static_public: bytes) -> str | None:
        for m in self.membership.members.values():
            if m.tunnel is not None and m.tunnel[1] == static_public and m.status.up and m.name != self.membership.name:
                return m.name if self.membership.checked(m.name) else None
        return None

    def tunnel_peer(self, name: str) -> tuple[Address, bytes] | None:
        m = self.membership.members.get(name)
        if m is None or m.tunnel is None or not m.status.up or name == self.membership.name:
            return None
        return m.tunnel if self.membership.checked(name) else None
