"""The mesh's names as DNS answers, kept in wire format between registry changes.

Parsing, building and rendering a message with dnspython costs far more
than a query is worth once the answer is known, and most queries repeat: a
resolver asks for the same few names again and again.  So the bytes of a query
after its ID are the key of an entry that holds its answer already rendered,
record by record (dnspython renders each record's data; the owner of every
answer record is a pointer to the question name).  A query seen before costs a
dict lookup, a cheap shuffle of the records among those this agent finds about
equally near, and a join.  Entries live until the catalog or the member view
changes, or a few seconds pass (RTT estimates move): then they are built again
from the registry as it is.

Nothing here does I/O; agent/dns.py owns the sockets.
"""

from __future__ import annotations

import ipaddress
import random
import struct
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.SRV

from agent.dns_codes import BADVERS, COUNTED_TYPES, FORMERR, NOERROR, NOTIMP, NXDOMAIN, RCODE_NAMES, REFUSED
from agent.dns_settings import DnsSettings
from gossip.registry import Instance

# -- what the answers are built from ----------------------------------------------------------------


class Catalog(Protocol):
    """The agent's view, read when an entry is built (agent.dns.AgentCatalog is the real one)."""

    def version(self) -> Hashable:
        """Changes whenever anything below may have changed."""

    def instances(self) -> Iterable[tuple[str, Instance]]:
        """Every instance whose node is up (alive or suspect), as `mesh-agent services show` lists them."""

    def node_address(self, node: str) -> str | None:
        """An up member's address (None for a member that is not up, or unknown)."""

    def node_tags(self, node: str) -> dict[str, str]:
        ...

    def node_names(self) -> Iterable[str]:
        """Every up member's name."""

    def rtt(self, node: str) -> float | None:
        """This agent's RTT estimate to ``node`` in seconds (0 for itself), None when unknown."""


class VirtualNames(Protocol):
    """Where ``NAME.virtual.<domain>`` points (agent.virtual.VirtualUpstreams is the real one)."""

    def address_for(self, service: str) -> str:
        ...


#: Records closer than this (relative, then absolute) to the nearest of their tier are shuffled together.
TIER_RATIO = 1.25
TIER_SLACK = 0.0005
#: Entries are rebuilt at least this often, so the order follows RTT estimates as they move.
REORDER_EVERY = 5.0
#: Orders rendered ahead per answer whose records are shuffled.
VARIANTS = 16
#: Entries kept per transport before the cache starts again.
MAX_ENTRIES = 4096
#: What a UDP answer may reach (the client's EDNS size, capped here, as BIND's max-udp-size caps it).
MAX_UDP = 4096
#: The EDNS buffer size this agent advertises (the DNS flag day's value).
OUR_EDNS_PAYLOAD = 1232
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400

_POINTER_TO_QNAME = b"\xc0\x0c"
_CLASS_IN = dns.rdataclass.IN
_FLAG_QR, _FLAG_AA, _FLAG_TC, _FLAG_RD = 0x8000, 0x0400, 0x0200, 0x0100
_HEADER = struct.Struct("!HHHHH")
_RR_FIXED = struct.Struct("!HHIH")
A, AAAA, SRV, TXT, SOA, ANY, OPT = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.SRV, dns.rdatatype.TXT,
                                    dns.rdatatype.SOA, dns.rdatatype.ANY, dns.rdatatype.OPT)


class Malformed(Exception):
    """Not a DNS query this agent answers: dropped and counted under ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One answer record in wire format, and the additional records that go with it."""

    wire: bytes
    extra: tuple[bytes, ...] = ()


@dataclass
class Answer:
    rcode: int
    #: Answer records, nearest tier first; records within a tier are shuffled.
    tiers: list[list[Record]] = field(default_factory=list)
    authority: list[bytes] = field(default_factory=list)
    #: The service whose virtual upstream this answer points at.
    virtual: str | None = None


class Prepared:
    """A query's answer, rendered but for its ID and the order of its records."""

    __slots__ = ("_head", "_question", "_tiers", "_tail", "_tail_count", "_opt", "_limit", "_max", "_variants",
                 "_next", "qtype", "rcode", "virtual")

    def __init__(self, flags: int, question: bytes, answer: Answer, opt: bytes, limit: int, max_size: int,
                 qtype: str) -> None:
        self._head = flags
        self._question = question
        self._tiers = answer.tiers
        self._tail = b"".join(answer.authority)
        self._tail_count = len(answer.authority)
        self._opt = opt
        self._limit = limit
        self._max = max_size
        self.qtype = qtype
        self.rcode = RCODE_NAMES.get(answer.rcode, str(answer.rcode))
        self.virtual = answer.virtual
        # The shuffling is done ahead: a few orders, rendered whole, handed out in turn.
        fixed = all(len(t) <= 1 for t in self._tiers)
        self._variants = [self._render() for _ in range(1 if fixed else VARIANTS)]
        self._next = 0

    def render(self, qid: bytes) -> bytes:
        self._next = (self._next + 1) % len(self._variants)
        return qid + self._variants[self._next]

    def _render(self) -> bytes:
        picked: list[Record] = []
        for tier in self._tiers:
            if len(tier) > 1:
                tier = tier[:]
                random.shuffle(tier)
            picked += tier
        if self._limit and len(picked) > self._limit:
            del picked[self._limit:]
        size = 12 + len(self._question) + len(self._tail) + len(self._opt)
        answers: list[bytes] = []
        truncated = False
        for rec in picked:
            if size + len(rec.wire) > self._max:
                truncated = True
                break
            answers.append(rec.wire)
            size += len(rec.wire)
        extras: list[bytes] = []
        seen: set[bytes] = set()
        for rec in picked[:len(answers)]:
            for x in rec.extra:
                # Additional records are a courtesy: left out when they do not fit (RFC 2181 9).
                if x not in seen and size + len(x) <= self._max:
                    seen.add(x)
                    extras.append(x)
                    size += len(x)
        flags = self._head | (_FLAG_TC if truncated else 0)
        arcount = len(extras) + (1 if self._opt else 0)
        header = _HEADER.pack(flags, 1 if self._question else 0, len(answers), self._tail_count, arcount)
        return b"".join((header, self._question, *answers, self._tail, *extras, self._opt))


def _wire(thing: dns.rdata.Rdata | dns.name.Name) -> bytes:
    """dnspython's rendering, uncompressed (to_wire returns None only when given a file)."""
    wire = thing.to_wire()
    assert wire is not None
    return wire


def _rr(owner: bytes, rdtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + _RR_FIXED.pack(rdtype, _CLASS_IN, ttl, len(rdata)) + rdata


def _ip_wire(address: str) -> tuple[int, bytes] | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return (A if ip.version == 4 else AAAA), ip.packed


def _txt(strings: list[str]) -> bytes:
    parts = [s.encode()[:255] for s in strings] or [b""]
    return _wire(dns.rdtypes.ANY.TXT.TXT(_CLASS_IN, TXT, parts))


def instance_txt(node: str, inst: Instance) -> list[str]:
    """An instance's TXT strings (RFC 1464 key=value): what `services show` says of it."""
    out = [f"id={inst.id}", f"node={node}", f"port={inst.port}", f"health={inst.health}"]
    out += [f"tag={t}" for t in inst.tags]
    out += [f"meta.{k}={v}" for k, v in inst.meta]
    return out


def _tiered(items: list[tuple[float | None, Record]]) -> list[list[Record]]:
    """Nearest first; records about as near as the nearest of a tier share it (and are shuffled)."""
    known = sorted((r for r in items if r[0] is not None), key=lambda r: r[0] or 0.0)
    tiers: list[list[Record]] = []
    start = -1.0
    for rtt, rec in known:
        assert rtt is not None
        if not tiers or rtt > start * TIER_RATIO + TIER_SLACK:
            tiers.append([])
            start = rtt
        tiers[-1].append(rec)
    unknown = [rec for rtt, rec in items if rtt is None]
    if unknown:
        tiers.append(unknown)
    return tiers


class Answers:
    """Builds, keeps and renders the answers of one agent's DNS server."""

    def __init__(self, settings: DnsSettings, catalog: Catalog, virtual: VirtualNames | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.catalog = catalog
        self.virtual = virtual
        self.clock = clock
        self.domain = dns.name.from_text(settings.domain)
        self._domain_wire = _wire(self.domain)
        self._udp: dict[bytes, Prepared] = {}
        self._tcp: dict[bytes, Prepared] = {}
        self._version: Hashable = None
        self._built_at = -REORDER_EVERY
        #: service (lower case) -> its instances on up nodes, built once per version.
        self._by_service: dict[str, list[tuple[str, Instance]]] | None = None
        #: Entries built (cache misses), for the benchmark and tests.
        self.built = 0

    # -- the hot path ---------------------------------------------------------------------------

    def respond(self, data: bytes, tcp: bool) -> Prepared:
        """The prepared answer to ``data``; Malformed for input that gets no answer at all."""
        now = self.clock()
        version = self.catalog.version()
        if version != self._version or now - self._built_at >= REORDER_EVERY:
            self.invalidate()
            self._version = version
            self._built_at = now
        cache = self._tcp if tcp else self._udp
        key = data[2:]
        entry = cache.get(key)
        if entry is None:
            entry = self._prepare(data, tcp)
            if len(cache) >= MAX_ENTRIES:
                cache.clear()
            cache[key] = entry
        return entry

    def invalidate(self) -> None:
        self._udp.clear()
        self._tcp.clear()
        self._by_service = None

    # -- building an entry ------------------------------------------------------------------------

    def _prepare(self, data: bytes, tcp: bool) -> Prepared:
        self.built += 1
        if len(data) < 12:
            raise Malformed("truncated")
        if data[2] & 0x80:
            raise Malformed("not_a_query")  # a response: answering it could make us a reflector
        try:
            query = dns.message.from_wire(data, ignore_trailing=False)
        except dns.message.ShortHeader:
            raise Malformed("truncated") from None
        except dns.message.BadEDNS:
            raise Malformed("bad_edns") from None
        except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
            # dnspython refuses compression loops, forward pointers, bad lengths and trailing junk.
            raise Malformed("malformed") from None
        flags = _FLAG_QR | _FLAG_AA | (int(query.flags) & _FLAG_RD) | (query.opcode() << 11)
        opt = b""
        max_size = 65535 if tcp else 512
        rcode_ext = 0
        if query.edns >= 0:
            if not tcp:
                max_size = max(512, min(query.payload, MAX_UDP))
            if query.edns > 0:
                rcode_ext = BADVERS
        if len(query.question) != 1:
            answer = Answer(FORMERR)
            question = b""
            qtype_name = "other"
        else:
            q = query.question[0]
            question = _wire(q.name) + struct.pack("!HH", q.rdtype, q.rdclass)
            qtype_name = dns.rdatatype.to_text(q.rdtype)
            if qtype_name not in COUNTED_TYPES:
                qtype_name = "other"
            if rcode_ext:
                answer = Answer(BADVERS)
            elif query.opcode() != dns.opcode.QUERY:
                answer = Answer(NOTIMP)
            elif q.rdclass != _CLASS_IN:
                answer = Answer(REFUSED)
            else:
                answer = self.lookup(q.name, q.rdtype)
        if query.edns >= 0:
            opt = b"\x00" + _RR_FIXED.pack(OPT, OUR_EDNS_PAYLOAD, (answer.rcode >> 4) << 24, 0)
        flags |= answer.rcode & 0xF
        limit = self.settings.answer_limit
        return Prepared(flags, question, answer, opt, limit, max_size, qtype_name)

    def lookup(self, qname: dns.name.Name, qtype: int) -> Answer:
        """The answer to one question, records unordered within tiers."""
        if not qname.is_subdomain(self.domain):
            return Answer(REFUSED)  # no open resolver: names outside the domain are not ours to chase
        labels = [label.lower() for label in qname.relativize(self.domain).labels]
        if labels == [b"@"] or not labels:
            return self._apex(qtype)
        kind, rest = labels[-1], labels[:-1]
        try:
            text = [r.decode("ascii") for r in rest]
        except UnicodeDecodeError:
            return self._negative(NXDOMAIN)
        if not text:
            # service.mesh, node.mesh ... exist (they hold names) but have no records.
            return self._negative(NOERROR if kind in (b"service", b"node", b"virtual", b"addr") else NXDOMAIN)
        if kind == b"service":
            return self._service(text, qtype)
        if kind == b"node":
            return self._node(".".join(text), qtype)
        if kind == b"virtual" and len(text) == 1:
            return self._virtual(text[0], qtype)
        if kind == b"addr" and len(text) == 1:
            return self._addr(text[0], qtype)
        return self._negative(NXDOMAIN)

    def _apex(self, qtype: int) -> Answer:
        if qtype in (SOA, ANY):
            return Answer(NOERROR, [[Record(self._soa(_POINTER_TO_QNAME))]])
        return self._negative(NOERROR)

    def _soa(self, owner: bytes) -> bytes:
        serial = hash(self._version) & 0xFFFFFFFF
        rdata = _wire(dns.rdtypes.ANY.SOA.SOA(  # type: ignore[no-untyped-call]
            _CLASS_IN, SOA, dns.name.Name(("ns", *self.domain.labels)),
            dns.name.Name(("hostmaster", *self.domain.labels)), serial, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, 0))
        return _rr(owner, SOA, 0, rdata)

    def _negative(self, rcode: int) -> Answer:
        """NXDOMAIN or NODATA, with the zone's SOA in the authority section (RFC 2308)."""
        return Answer(rcode, [], [self._soa(self._domain_wire)])

    def _services(self) -> dict[str, list[tuple[str, Instance]]]:
        if self._by_service is None:
            by: dict[str, list[tuple[str, Instance]]] = {}
            for node, inst in self.catalog.instances():
                by.setdefault(inst.service.lower(), []).append((node, inst))
            self._by_service = by
        return self._by_service

    def service_instances(self, name: str, tag: str | None) -> list[tuple[str, Instance]] | None:
        """The instances a service name answers with; None when the name does not exist."""
        known = self._services().get(name)
        if not known:
            return None
        if tag is not None:
            known = [(n, i) for n, i in known if any(t.lower() == tag for t in i.tags)]
            if not known:
                return None
        allowed = ("passing",) if self.settings.only_passing else ("passing", "warning")
        return [(n, i) for n, i in known if i.health in allowed]

    def _service(self, parts: list[str], qtype: int) -> Answer:
        tag: str | None = None
        if len(parts) == 1:
            name = parts[0]
        elif len(parts) == 2 and parts[0].startswith("_") and parts[1].startswith("_"):
            # RFC 2782: _name._tcp (any instance) or _name._tag (Consul's form).
            name, proto = parts[0][1:], parts[1][1:]
            tag = None if proto in ("tcp", "udp") else proto
        elif len(parts) == 2:
            tag, name = parts
        else:
            return self._negative(NXDOMAIN)
        instances = self.service_instances(name, tag)
        if instances is None:
            return self._negative(NXDOMAIN)
        ttl = self.settings.service_ttl
        items: list[tuple[float | None, Record]] = []
        if qtype in (A, AAAA, ANY):
            nearest: dict[str, float | None] = {}
            for node, inst in instances:
                rtt = self.catalog.rtt(node)
                if inst.address in nearest:
                    old = nearest[inst.address]
                    nearest[inst.address] = rtt if old is None else old if rtt is None else min(old, rtt)
                else:
                    nearest[inst.address] = rtt
            for address, rtt in nearest.items():
                ip = _ip_wire(address)
                if ip is not None and (qtype == ANY or ip[0] == qtype):
                    items.append((rtt, Record(_rr(_POINTER_TO_QNAME, ip[0], ttl, ip[1]))))
        elif qtype == SRV:
            seen: set[bytes] = set()
            for node, inst in instances:
                target, extra = self._target(node, inst.address, ttl)
                rdata = _wire(dns.rdtypes.IN.SRV.SRV(_CLASS_IN, SRV, 1, 1, inst.port,  # type: ignore[no-untyped-call]
                                                     target))
                if rdata in seen:
                    continue  # two instances at one address and port: an RRset holds no duplicates (RFC 2181 5)
                seen.add(rdata)
                items.append((self.catalog.rtt(node), Record(_rr(_POINTER_TO_QNAME, SRV, ttl, rdata), extra)))
        elif qtype == TXT:
            for node, inst in instances:
                items.append((self.catalog.rtt(node),
                              Record(_rr(_POINTER_TO_QNAME, TXT, ttl, _txt(instance_txt(node, inst))))))
        if not items:
            return self._negative(NOERROR)
        return Answer(NOERROR, _tiered(items))

    def _target(self, node: str, address: str, ttl: int) -> tuple[dns.name.Name, tuple[bytes, ...]]:
        """An SRV target and its address record: the node's name when the instance is at the node's address."""
        ip = _ip_wire(address)
        if ip is None:  # a host name: the target is that name, resolved elsewhere
            try:
                return dns.name.from_text(address), ()
            except dns.exception.DNSException:
                return dns.name.root, ()
        if self.catalog.node_address(node) == address:
            try:
                target = dns.name.Name((*node.split("."), "node", *self.domain.labels))
            except dns.exception.DNSException:  # a node name no DNS label can hold
                target = self._addr_name(ip[1])
        else:
            target = self._addr_name(ip[1])
        return target, (_rr(_wire(target), ip[0], ttl, ip[1]),)

    def _addr_name(self, packed: bytes) -> dns.name.Name:
        return dns.name.Name((packed.hex(), "addr", *self.domain.labels))

    def _node(self, node_lower: str, qtype: int) -> Answer:
        node = self._node_named(node_lower)
        address = None if node is None else self.catalog.node_address(node)
        if node is None or address is None:
            return self._negative(NXDOMAIN)
        ttl = self.settings.node_ttl
        ip = _ip_wire(address)
        if qtype in (A, AAAA, ANY) and ip is not None and (qtype == ANY or ip[0] == qtype):
            return Answer(NOERROR, [[Record(_rr(_POINTER_TO_QNAME, ip[0], ttl, ip[1]))]])
        if qtype == TXT:
            tags = [f"{k}={v}" for k, v in sorted(self.catalog.node_tags(node).items())]
            return Answer(NOERROR, [[Record(_rr(_POINTER_TO_QNAME, TXT, ttl, _txt(tags)))]])
        return self._negative(NOERROR)

    def _node_named(self, lower: str) -> str | None:
        for node in self.catalog.node_names():
            if node.lower() == lower:
                return node
        return None

    def _virtual(self, name: str, qtype: int) -> Answer:
        if self.virtual is None or not self._services().get(name):
            return self._negative(NXDOMAIN)
        service = self._services()[name][0][1].service
        if qtype not in (A, ANY):
            return Answer(NOERROR, [], [self._soa(self._domain_wire)], virtual=None)
        address = self.virtual.address_for(service)
        ip = _ip_wire(address)
        assert ip is not None
        record = Record(_rr(_POINTER_TO_QNAME, ip[0], self.settings.virtual_ttl, ip[1]))
        return Answer(NOERROR, [[record]], virtual=service)

    def _addr(self, label: str, qtype: int) -> Answer:
        try:
            packed = bytes.fromhex(label)
        except ValueError:
            return self._negative(NXDOMAIN)
        if len(packed) not in (4, 16):
            return self._negative(NXDOMAIN)
        rdtype = A if len(packed) == 4 else AAAA
        if qtype not in (rdtype, ANY):
            return self._negative(NOERROR)
        return Answer(NOERROR, [[Record(_rr(_POINTER_TO_QNAME, rdtype, self.settings.service_ttl, packed))]])
