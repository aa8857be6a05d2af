"""The agent's DNS server: the mesh's names over UDP and TCP, so unmodified programs can find services.

Most programs never call a discovery API, they resolve a name; Consul's DNS
interface is how most of its users find services, and this is its counterpart
(agent/dns_answers.py holds the names and the rendered answers).  The server
is two trio tasks in the agent's nursery: a UDP loop that drains a burst of
datagrams per wake-up and answers each without awaiting (a known query is a
dict lookup and a join), and a TCP acceptor for what does not fit a datagram.

Bad input never gets far: a query that dnspython will not parse, a response
posing as a query, an oversized message or one from a source past its share is
dropped and counted, never answered (no reflection, no amplification).  The
per-source limit keeps one busy client, or a flood, from starving the rest, and
the UDP loop yields after every burst so gossip keeps its turn.
"""

from __future__ import annotations

import errno
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from agent.dns_settings import DEFAULT_DNS, DnsSettings
from agent.peercred import is_loopback
from agent.transport import open_tcp_listeners
from gossip.registry import Instance
from gossip.wire import Address, format_addr

if TYPE_CHECKING:
    from agent.dns_answers import Answers, Prepared
    from agent.runner import Agent
    from agent.virtual import VirtualUpstreams
    from gossip.registry import Registry
    from gossip.swim import Membership

__all__ = ["DEFAULT_DNS", "AgentCatalog", "DnsBindError", "DnsServer", "SourceLimiter"]
#: Datagrams answered per wake-up before the loop yields to the rest of the agent.
UDP_BURST = 64
#: Largest query read (a query is a question and perhaps an OPT record: tens of bytes).
MAX_QUERY = 4096
#: TCP clients served at once, queries per connection, and how long a quiet one is kept.
MAX_TCP_CLIENTS = 256
MAX_TCP_QUERIES = 1000
TCP_IDLE = 10.0
#: UDP answers waiting for a virtual upstream to open.
MAX_VIRTUAL_WAITING = 256
#: Sources remembered by the per-source limit before idle ones are forgotten.
MAX_SOURCES = 65536


class DnsBindError(Exception):
    """An explicit --dns address cannot be bound (the agent then does not start)."""


class AgentCatalog:
    """The agent's membership and registry as the answers read them."""

    def __init__(self, membership: Membership, registry: Registry) -> None:
        self.membership = membership
        self.registry = registry

    def version(self) -> tuple[int, tuple[int, int]]:
        return self.registry.index, self.membership.view_version()

    def instances(self) -> Iterable[tuple[str, Instance]]:
        members = self.membership.members
        for node, inst in self.registry.all_instances():
            m = members.get(node)
            if m is not None and m.status.up:
                yield node, inst

    def node_address(self, node: str) -> str | None:
        m = self.membership.members.get(node)
        return m.addr[0] if m is not None and m.status.up else None

    def node_tags(self, node: str) -> dict[str, str]:
        m = self.membership.members.get(node)
        return dict(m.tags) if m is not None else {}

    def node_names(self) -> Iterable[str]:
        return [m.name for m in self.membership.members.values() if m.status.up]

    def rtt(self, node: str) -> float | None:
        me = self.membership.name
        if node == me:
            return 0.0
        est = self.membership.rtt_estimate(me, node)
        return None if est is None else est[0]

    def port_for(self, service: str) -> int | None:
        """The port a virtual upstream of ``service`` listens on: the one most of its instances use."""
        ports: Counter[int] = Counter(i.port for _, i in self.instances() if i.service == service)
        if not ports:
            return None
        return min(ports, key=lambda p: (-ports[p], p))


class SourceLimiter:
    """A token bucket per source address: ``rate`` queries a second, bursts of as many."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.buckets: dict[str, list[float]] = {}

    def allow(self, host: str, now: float) -> bool:
        if not self.rate:
            return True
        b = self.buckets.get(host)
        if b is None:
            if len(self.buckets) >= MAX_SOURCES:
                self._forget_idle(now)
            b = self.buckets[host] = [self.rate, now]
        tokens = min(self.rate, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            return False
        b[0] = tokens - 1.0
        return True

    def _forget_idle(self, now: float) -> None:
        """Sources whose bucket has refilled are as good as new: forget them (all, if none has)."""
        full = [h for h, (tokens, last) in self.buckets.items() if tokens + (now - last) * self.rate >= self.rate]
        for h in full or list(self.buckets):
            del self.buckets[h]


class DnsServer:
    def __init__(self, addr: Address, explicit: bool, settings: DnsSettings, catalog: Any,
                 virtual: Callable[[], VirtualUpstreams] | None, logger: Any) -> None:
        self.addr = addr
        self.explicit = explicit
        self.settings = settings
        self.catalog = catalog
        #: Makes the virtual upstreams (agent.virtual), built with the answers at the first query:
        #: until then no virtual name was looked up, so none is open and none needs reaping.
        self._make_virtual = virtual
        self.virtual: VirtualUpstreams | None = None
        #: Built at the first query: dnspython is loaded then, not at every agent's start.
        self._answers: Answers | None = None
        self._malformed: type[Exception] = Exception
        self.log = logger
        self.limiter = SourceLimiter(settings.source_qps)
        #: (query type, response code) -> answers sent.
        self.queries: Counter[tuple[str, str]] = Counter()
        #: reason -> queries dropped unanswered.
        self.drops: Counter[str] = Counter()
        self.truncated = 0
        self.bound: Address | None = None
        self._udp: socket.socket | None = None
        self._tcp: list[trio.SocketListener] = []
        self._tcp_clients = 0
        self._virtual_waiting = 0
        self._nursery: trio.Nursery | None = None

    @classmethod
    def for_agent(cls, agent: Agent) -> DnsServer | None:
        cfg = agent.cfg
        if cfg.dns is None:
            return None
        catalog = AgentCatalog(agent.membership, agent.registry)
        logger = agent.log.bind(part="dns")

        def virtual() -> VirtualUpstreams:
            from agent.virtual import VirtualUpstreams

            return VirtualUpstreams(agent.upstream_listeners, agent.load_upstreams, catalog.port_for,
                                    cfg.dns_settings.virtual_idle, logger)

        return cls(cfg.dns, cfg.dns_explicit, cfg.dns_settings, catalog, virtual, logger)

    @property
    def answers(self) -> Answers:
        if self._answers is None:
            from agent import dns_answers

            if self._make_virtual is not None:
                self.virtual = self._make_virtual()
                if self._nursery is not None:
                    self._nursery.start_soon(self.virtual.reap_loop)
            self._answers = dns_answers.Answers(self.settings, self.catalog, self.virtual)
            self._malformed = dns_answers.Malformed
        return self._answers

    # -- binding --------------------------------------------------------------------------------

    async def bind(self) -> bool:
        """Bind UDP and TCP.  False (logged) when the default address is taken; DnsBindError for --dns."""
        host, port = self.addr
        udp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.setblocking(False)
            udp.bind((host, port))
            port = udp.getsockname()[1]
            self._tcp = await open_tcp_listeners(host, port)
        except OSError as exc:
            udp.close()
            why = ("port already in use" if exc.errno == errno.EADDRINUSE
                   else "address not available on this host" if exc.errno == errno.EADDRNOTAVAIL
                   else exc.strerror or str(exc))
            message = f"cannot bind DNS on {format_addr(self.addr)}: {why}"
            if self.explicit:
                raise DnsBindError(message) from None
            self.log.warning("dns_off", detail=message + "; running without DNS (--dns HOST:PORT picks another)")
            return False
        self._udp = udp
        self.bound = (host, port)
        if not is_loopback(host):
            self.log.warning("dns_public", address=format_addr(self.bound),
                             detail="anyone who reaches this address can read the catalog's names, addresses, "
                                    "tags and meta; keep it behind a firewall")
        return True

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()

    # -- serving --------------------------------------------------------------------------------

    async def serve(self) -> None:
        assert self._udp is not None and self.bound is not None
        self.log.info("dns_started", address=format_addr(self.bound), domain=self.settings.domain)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._udp_loop, self._udp)
                nursery.start_soon(trio.serve_listeners, self._tcp_client, self._tcp)
                if self.virtual is not None:  # the answers were built before the server ran
                    nursery.start_soon(self.virtual.reap_loop)
        finally:
            self.close()

    def answer(self, data: bytes, host: str, tcp: bool) -> Prepared | None:
        """The answer to one query, or None when it is dropped (and counted)."""
        if not self.limiter.allow(host, time.monotonic()):
            self.drops["rate_limited"] += 1
            return None
        if len(data) > MAX_QUERY:
            self.drops["oversized"] += 1
            return None
        answers = self._answers or self.answers
        try:
            entry = answers.respond(data, tcp)
        except self._malformed as exc:
            self.drops[getattr(exc, "reason", "malformed")] += 1
            return None
        self.queries[(entry.qtype, entry.rcode)] += 1
        return entry

    def _render(self, entry: Prepared, data: bytes) -> bytes:
        reply = entry.render(data[:2])
        if reply[2] & 0x02:
            self.truncated += 1
        return reply

    async def _udp_loop(self, sock: socket.socket) -> None:
        recv, send = sock.recvfrom, sock.sendto
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(UDP_BURST):
                try:
                    data, src = recv(MAX_QUERY + 1)
                except BlockingIOError:
                    break
                except OSError:
                    self.drops["recv_error"] += 1
                    continue
                entry = self.answer(data, src[0], tcp=False)
                if entry is None:
                    continue
                if entry.virtual is not None and self.virtual is not None \
                        and not self.virtual.ready(entry.virtual):
                    self._answer_when_open(entry, data, src)
                    continue
                try:
                    send(self._render(entry, data), src)
                except OSError:  # the socket buffer is full, or the client went away
                    self.drops["send_error"] += 1
            # wait_readable above is a checkpoint too; this one lets gossip run between bursts of a flood.
            await trio.lowlevel.checkpoint()

    def _answer_when_open(self, entry: Prepared, data: bytes, src: Any) -> None:
        if self._virtual_waiting >= MAX_VIRTUAL_WAITING or self._nursery is None:
            self.drops["virtual_busy"] += 1
            return
        self._virtual_waiting += 1

        async def later() -> None:
            try:
                reply = await self._virtual_reply(entry, data)
                assert self._udp is not None
                try:
                    self._udp.sendto(reply, src)
                except OSError:
                    self.drops["send_error"] += 1
            finally:
                self._virtual_waiting -= 1

        self._nursery.start_soon(later)

    async def _virtual_reply(self, entry: Prepared, data: bytes) -> bytes:
        assert self.virtual is not None and entry.virtual is not None
        if await self.virtual.ensure(entry.virtual):
            return self._render(entry, data)
        # No listener could be opened: say so (SERVFAIL) rather than hand out an address that refuses.
        self.queries[(entry.qtype, entry.rcode)] -= 1
        self.queries[(entry.qtype, "SERVFAIL")] += 1
        import dns.message
        import dns.rcode

        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.set_rcode(dns.rcode.SERVFAIL)
        return response.to_wire()

    async def _tcp_client(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self._tcp_clients >= MAX_TCP_CLIENTS:
                self.drops["tcp_busy"] += 1
                return
            self._tcp_clients += 1
            try:
                await self._tcp_queries(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._tcp_clients -= 1

    async def _tcp_queries(self, stream: trio.SocketStream) -> None:
        host = str(stream.socket.getpeername()[0])
        buf = bytearray()
        for _ in range(MAX_TCP_QUERIES):
            size = -1
            with trio.move_on_after(TCP_IDLE):
                while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
                    if len(buf) >= 2 and int.from_bytes(buf[:2], "big") > MAX_QUERY:
                        self.drops["oversized"] += 1
                        return
                    chunk = await stream.receive_some(MAX_QUERY + 2)
                    if not chunk:
                        if buf:
                            self.drops["truncated"] += 1
                        return
                    buf += chunk
                size = int.from_bytes(buf[:2], "big")
            if size < 0:
                return  # idle: RFC 7766 lets the server close
            data = bytes(buf[2:2 + size])
            del buf[:2 + size]
            entry = self.answer(data, host, tcp=True)
            if entry is None:
                return
            if entry.virtual is not None and self.virtual is not None and not self.virtual.ready(entry.virtual):
                reply = await self._virtual_reply(entry, data)
            else:
                reply = self._render(entry, data)
            await stream.send_all(len(reply).to_bytes(2, "big") + reply)

    @property
    def built(self) -> int:
        """Answers built from the registry so far (the rest were reused)."""
        return 0 if self._answers is None else self._answers.built

    # -- views ----------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        return {
            "address": None if self.bound is None else format_addr(self.bound),
            "domain": self.settings.domain,
            "queries": sum(self.queries.values()),
            "truncated": self.truncated,
            "dropped": dict(sorted(self.drops.items())),
            "virtual": [] if self.virtual is None else self.virtual.view(),
        }
