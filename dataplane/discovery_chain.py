"""Where a connection to a service goes: splits, subsets and failover, compiled from config entries.

Consul calls this the discovery chain: a ``service-splitter`` sends a share of
the connections to a subset or another service (a canary gets 10%), a
``service-resolver`` says which instances a subset is (by tags or meta) and
where to fail over when a target has no passing instance.  The chain is
compiled once per change of the entries and asked once per connection, and
the balancer then picks among the instances it names, so outlier detection
and latency-aware choice work inside a split exactly as without one.

A split is chosen per connection for ``tcp`` services (an ``http`` service is
split per request by the HTTP layer, which uses the same chain).  For ``http``
services a ``service-router`` comes first, as in Consul: the first route whose
match (path prefix, a header, methods) fits the request names the target, and
only a request no route matches is split.  Failover
goes to the first target in the resolver's list that has a passing instance,
so a primary that recovers takes its traffic back at the next connection.

Pure: entry bodies (as agent/entry_kinds.py checked them) and endpoints in,
choices out; the caller's random source makes it deterministic in tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


class Tagged(Protocol):
    """What a subset filter looks at in an instance (dataplane.proxy.Endpoint is one)."""

    @property
    def service(self) -> str: ...

    @property
    def tags(self) -> tuple[str, ...]: ...

    @property
    def meta(self) -> tuple[tuple[str, str], ...]: ...


@dataclass(frozen=True)
class Target:
    """One place connections can go: a service, or a named subset of it."""

    service: str
    subset: str | None = None

    def __str__(self) -> str:
        return self.service if self.subset is None else f"{self.service}/{self.subset}"


E = TypeVar("E", bound=Tagged)


@dataclass(frozen=True)
class Resolved(Generic[E]):
    """The instances a connection may use, and how they were chosen (for `routes` and the logs)."""

    endpoints: list[E]
    #: The split's target, and the one actually used (differs after a failover).
    chosen: Target
    used: Target

    @property
    def failed_over(self) -> bool:
        return self.used != self.chosen


class DiscoveryChain:
    def __init__(self, service: str, splitter: Mapping[str, Any] | None,
                 resolvers: Mapping[str, Mapping[str, Any]], router: Mapping[str, Any] | None = None) -> None:
        self.service = service
        self._resolvers = resolvers
        #: (match, target) in order: the service-router's routes (agent/entry_kinds.py checked them).
        self.routes: list[tuple[Mapping[str, Any], Target]] = []
        for r in (router or {}).get("routes", []):
            dest = r["destination"]
            dest_service = dest.get("service", service)
            default = (resolvers.get(dest_service) or {}).get("default_subset")
            self.routes.append((r["match"], Target(dest_service, dest.get("subset", default))))
        if splitter:
            splits = [(float(s["weight"]), Target(s.get("service", service), s.get("subset")))
                      for s in splitter["splits"] if s["weight"] > 0]
        else:
            splits = []
        if not splits:
            default = (resolvers.get(service) or {}).get("default_subset")
            splits = [(100.0, Target(service, default))]
        self.splits = splits
        self._total = sum(w for w, _ in splits)

    def choose(self, rng: random.Random) -> Target:
        """The split for one connection, by weight."""
        if len(self.splits) == 1:
            return self.splits[0][1]
        x = rng.random() * self._total
        for weight, target in self.splits:
            x -= weight
            if x < 0:
                return target
        return self.splits[-1][1]

    def route(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> Target | None:
        """The target of the first route whose match fits this request, or None (then it is split).

        ``headers`` as h11 gives them: lower-case names.  A path prefix is
        matched against the path alone (RFC 3986: before any '?').
        """
        if not self.routes:
            return None
        path = target.split(b"?", 1)[0].decode("latin-1")
        verb = method.decode("latin-1")
        for match, dest in self.routes:
            prefix = match.get("path_prefix")
            if prefix is not None and not path.startswith(prefix):
                continue
            methods = match.get("methods")
            if methods is not None and verb not in methods:
                continue
            header = match.get("header")
            if header is not None:
                name = header["name"].encode("latin-1")
                values = [v for n, v in headers if n == name]
                if not values:
                    continue
                exact = header.get("exact")
                if exact is not None and exact.encode("latin-1") not in values:
                    continue
            return dest
        return None

    def matches(self, target: Target, e: Tagged) -> bool:
        if e.service != target.service:
            return False
        if target.subset is None:
            return True
        flt = (self._resolvers.get(target.service) or {}).get("subsets", {}).get(target.subset)
        if flt is None:
            return False  # a subset its resolver no longer defines selects nothing
        tags = flt.get("tags")
        if tags and not set(tags) <= set(e.tags):
            return False
        meta = flt.get("meta")
        if meta:
            held = dict(e.meta)
            return all(held.get(k) == v for k, v in meta.items())
        return True

    def resolve(self, chosen: Target, passing: Callable[[str], list[E]]) -> Resolved[E]:
        """The passing instances of ``chosen``, or of the first failover target that has any.

        A target whose instances are all on members gossip suspects (``suspect`` on
        dataplane.proxy.Endpoint) is used only when no target has another: the balancer
        tries suspects last, and failing over is how a chain does that across targets.
        """
        fallback: Resolved[E] | None = None
        for target in [chosen, *self._failover(chosen)]:
            endpoints = [e for e in passing(target.service) if self.matches(target, e)]
            if any(not getattr(e, "suspect", False) for e in endpoints):
                return Resolved(endpoints, chosen, target)
            if endpoints and fallback is None:
                fallback = Resolved(endpoints, chosen, target)
        return fallback or Resolved([], chosen, chosen)

    def _failover(self, target: Target) -> list[Target]:
        resolver = self._resolvers.get(target.service) or {}
        out = []
        for t in resolver.get("failover", []):
            service = t.get("service", target.service)
            default = (self._resolvers.get(service) or {}).get("default_subset")
            out.append(Target(service, t.get("subset", default if service != target.service else None)))
        return out


class ChainSource(Protocol):
    """What the proxy asks of the mesh-wide config: the chain for a service, or None for the plain one."""

    def chain_for(self, service: str) -> DiscoveryChain | None: ...
