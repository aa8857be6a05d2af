"""One instance of a service as the data plane routes to it.

Apart from dataplane/proxy.py because the agent's directory hands these out
(agent/directory.py) whether or not this agent has loaded its data plane.
"""

from typing import NamedTuple

from gossip.frozen import same_class_equality


@same_class_equality
class Endpoint(NamedTuple):
    node: str
    instance_id: str
    host: str
    port: int
    service: str = ""
    #: What a resolver's subsets select on (dataplane.discovery_chain).
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    suspect: bool = False  # its node is suspected by gossip: the balancer tries it last (dataplane.balancer)
