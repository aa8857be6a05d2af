"""What the HTTP layer tells the rest of the agent about each request it carried.

The data plane sees every request twice: the calling agent (outbound, per
upstream) and the agent next to the instance (inbound, per source service).
Each side hands one :class:`RequestRecord` per finished request to a
:class:`RequestSink`; the agent's sink (agent/traffic.py) turns them into the
golden metrics (request counts by status class, success rate, latency
histograms), the ``stat`` view and the ``tap`` stream.  The data plane only
produces records, so it never needs to know how they are kept, and a record
costs the proxy one call and one small object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

OUTBOUND: Final = "outbound"
INBOUND: Final = "inbound"


@dataclass(slots=True)  # not frozen: one is made per request, and a frozen one's __init__ costs 6x; never changed
class RequestRecord:
    #: OUTBOUND (this agent called a service for a local client) or INBOUND
    #: (a peer's or a local caller's request reached a local instance).
    direction: str
    #: The destination service.
    service: str
    #: The instance that answered (or was last tried); "" when none was reached.
    instance: str
    #: The node hosting that instance ("" when none was reached).
    node: str
    #: The calling service, when the caller named one (an upstream's ``source``).
    source: str | None
    method: str
    #: The request target as the client sent it (path and query).
    path: str
    #: The status the client saw, including the mesh's own 502/503/504 answers;
    #: 0 when no response reached the client (it went away, or the stream broke
    #: after the response had started).
    status: int
    #: Seconds from the request's head arriving to the response's end.
    latency: float
    #: Wall-clock time (time.time()) the request's head arrived, for tap.
    started: float
    #: Why the mesh answered itself (the ``x-mesh-error`` value), or None when
    #: the status came from an instance.
    mesh_error: str | None = None
    #: Attempts beyond the first (retries) this request took.
    retries: int = 0


class RequestSink(Protocol):
    """Where finished requests go; it must be cheap, as it runs once per request."""

    def record(self, rec: RequestRecord) -> None: ...


class NoSink:
    """Keeps nothing: a proxy built without an agent (tests, benchmarks)."""

    def record(self, rec: RequestRecord) -> None:
        pass
