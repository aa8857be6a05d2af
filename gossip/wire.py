"""The gossip wire format: msgpack, versioned, validated field by field.

A packet is ``[PROTOCOL_VERSION, [message, ...]]``; several messages share one
datagram (memberlist's compound message) so piggy-backed updates cost no extra
packets.  Every message is a map with a short type tag ``t``.  Decoding never
trusts the sender: anything that is not exactly the expected shape raises
:class:`DecodeError` carrying a reason that the agent counts.

TCP streams (push-pull, state fetches) carry the same packet, deflated when
that saves bytes: a push-pull repeats the same host, the same status and
similar names once per member, and it is most of the bytes an idle cluster
sends (memberlist compresses it too, with LZW).  Datagrams stay plain: they
are small, and their size budget is checked before sealing.

One module past 700 lines because the format is one table of messages:
each encoder sits beside its decoder, so a field is never changed on one side only.
"""

import struct
import zlib
from typing import Any, NamedTuple

import msgpack

# Re-exported: the protocol's users import addresses from here too.
from gossip.address import Address as Address
from gossip.address import format_addr as format_addr
from gossip.address import parse_addr as parse_addr
from gossip.frozen import same_class_equality

PROTOCOL_VERSION = 1

#: Upper bounds on what a peer may make us allocate while decoding.
MAX_NAME_LEN = 128
MAX_TAGS = 64
MAX_TAG_LEN = 512
#: Tags ride in every alive message, which must fit a datagram with room to
#: spare (memberlist caps node meta at 512 bytes; we allow a little more).
MAX_TAGS_BYTES = 1024
MAX_STREAM_BYTES = 16 * 1024 * 1024
#: First byte of a deflated stream payload.  The msgpack spec reserves 0xc1 as
#: "never used", so no plain packet can start with it.
COMPRESSED_MARK = 0xC1
#: Payloads shorter than this are sent plain: deflate would not pay for itself.
COMPRESS_MIN = 256

#: A node's application state summary (registry version, digest) that rides on
#: its alive messages; the full state travels over TCP.
NodeState = tuple[int, bytes]
MAX_STATE_DIGEST = 64
#: Where a member's encrypted tunnels listen, and its static X25519 key, so any
#: agent can open a Noise IK session to it knowing nothing else.
Tunnel = tuple[Address, bytes]
#: The tags of a record built without any.  Shared, so never edited in place:
#: nothing in mesh-agent edits a tags dict, a change replaces the whole dict.
_NO_TAGS: dict[str, str] = {}
#: The coordinates of a push-pull built without any: shared the same way.
_NO_COORDS: dict[str, tuple[float, ...]] = {}
TUNNEL_KEY_SIZE = 32


class DecodeError(Exception):
    """A packet that is not a valid message; ``reason`` names the drop counter."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# -- messages -------------------------------------------------------------------


@same_class_equality
class Ping(NamedTuple):
    seq: int
    target: str  # the name we expect to answer, so a reused address cannot ack
    source: str


@same_class_equality
class PingReq(NamedTuple):
    """SWIM's ping-req: ask the receiver to probe ``target`` for us."""

    seq: int
    target: str
    target_addr: Address
    source: str
    want_nack: bool = True


#: A Vivaldi coordinate on the wire: its numbers as little-endian float32, in
#: one msgpack bin.  Serf sends float64 in a map; this is well under half of
#: that, on every ack, which keeps what an idle agent sends small (docs/membership.md,
#: "Wire sizes"), and float32's 24-bit mantissa is far finer than any latency we can measure.
MAX_COORD_FLOATS = 64
MAX_COORDS = 100_000


@same_class_equality
class Ack(NamedTuple):
    seq: int
    source: str
    #: The acking member's network coordinate (Serf piggy-backs it the same way).
    coord: tuple[float, ...] | None = None


@same_class_equality
class Nack(NamedTuple):
    """Lifeguard: a ping-req helper could not reach the target either."""

    seq: int
    source: str


@same_class_equality
class Alive(NamedTuple):
    name: str
    incarnation: int
    addr: Address
    tags: dict[str, str] = _NO_TAGS
    state: NodeState | None = None
    tunnel: Tunnel | None = None
    #: The member's Ed25519 public key and its signature over the fields
    #: above (gossip.signing): only the member itself can write its alive.
    identity: bytes | None = None
    sig: bytes | None = None


@same_class_equality
class Suspect(NamedTuple):
    name: str
    incarnation: int
    source: str


@same_class_equality
class Dead(NamedTuple):
    """``source == name`` means the member left gracefully."""

    name: str
    incarnation: int
    source: str


class MemberRecord(NamedTuple):
    """One member's full state, as exchanged by push-pull.

    A named tuple, not a frozen dataclass: a push-pull at 10,000 members
    decodes 10,000 of these, and a frozen dataclass sets each field through
    ``object.__setattr__``, which makes it several times slower to build
    (docs/membership.md, "Costs").
    """

    name: str
    addr: Address
    incarnation: int
    status: str
    tags: dict[str, str] = _NO_TAGS
    state: NodeState | None = None
    tunnel: Tunnel | None = None
    identity: bytes | None = None
    sig: bytes | None = None


@same_class_equality
class PushPull(NamedTuple):
    source: str
    join: bool
    members: list[MemberRecord]
    #: Set by a responder that refuses the initiator (e.g. a name conflict).
    refused: str = ""
    #: Opaque application state (the service registry), merged by the delegate.
    delegate: bytes = b""
    #: Network coordinates the sender holds, its own included, so a member can
    #: estimate its RTT to nodes it has never probed.
    coords: dict[str, tuple[float, ...]] = _NO_COORDS
    #: A periodic sync without the members' signatures (gossip.sync: lite
    #: push-pull); a receiver that finds something new in it asks for a full one.
    lite: bool = False
    #: Members whose alive the sender is still spreading; the receiver spreads
    #: them too (gossip.dissemination: Dissemination.fresh).
    fresh: tuple[str, ...] = ()
    #: With ``refused``: what the refusal is, as a code a program compares (gossip.swim.Refusal);
    #: ``refused`` is the sentence for people.  Absent from the wire when empty.
    refusal: str = ""
    #: The digest of the sender's config entries (gossip.config_sync, "Anti-entropy"); None from
    #: an agent that does not take config entries (older ones send no such key and ignore it).
    config: bytes | None = None


@same_class_equality
class ConfigPull(NamedTuple):
    """Ask a member (over TCP) for the config entries newer than ``summary`` (gossip.config_sync).

    Sent only to members whose push-pull carried a config digest, so never to an
    agent that would not know it.
    """

    source: str
    #: Rows [kind, name, version, writer, signature], checked by gossip.config_sync.
    summary: list[Any]
    #: The puller's entries are stale (agent.config_entries): send every key you hold too.
    stale: bool = False


@same_class_equality
class ConfigPush(NamedTuple):
    """The answer to a ConfigPull: entries in their wire form, checked and verified by the receiver."""

    entries: list[Any]
    #: Every key the sender holds, as [kind, name] (only when the puller was stale).
    keys: list[Any] | None = None
    #: More newer entries remain than one answer carries: pull again.
    more: bool = False
    #: The puller's summary showed the answering node news: it pulls back (gossip.config_sync).
    pulling_back: bool = False


@same_class_equality
class StateRequest(NamedTuple):
    """Ask a member (over TCP) for one node's full application state."""

    source: str
    node: str


@same_class_equality
class StateReply(NamedTuple):
    node: str
    data: bytes  # empty when the responder holds nothing for that node


@same_class_equality
class Query(NamedTuple):
    """Serf's internal query: spread to everyone by gossip, answered by each member directly.

    Cluster-wide operations (key rotation) ask every member to do something
    and report back; the origin counts who answered.
    """

    id: int
    origin: str
    origin_addr: Address
    name: str
    payload: bytes


@same_class_equality
class QueryResponse(NamedTuple):
    id: int
    source: str
    payload: bytes


#: Largest query or response payload: it must ride in one datagram.
MAX_QUERY_PAYLOAD = 1024

Message = (Ping | PingReq | Ack | Nack | Alive | Suspect | Dead | PushPull | StateRequest | StateReply
           | Query | QueryResponse | ConfigPull | ConfigPush)

STATUSES = ("alive", "suspect", "dead", "left")


# -- encoding -------------------------------------------------------------------


def coord_bytes(coord: tuple[float, ...]) -> bytes:
    return struct.pack(f"<{len(coord)}f", *coord)


def _coord_of(v: Any) -> tuple[float, ...]:
    # Shape only; the numbers' sense (finite, dimensions) is the coordinate
    # module's to judge, and a bad one is dropped there.
    if type(v) is not bytes or not v or len(v) % 4 or len(v) > 4 * MAX_COORD_FLOATS:
        raise DecodeError("malformed", "bad coordinate")
    return struct.unpack(f"<{len(v) // 4}f", v)


def _addr(a: Address) -> list[Any]:
    return [a[0], a[1]]


def _state(st: NodeState | None) -> list[Any] | None:
    return None if st is None else [st[0], st[1]]


def _tunnel(t: Tunnel | None) -> list[Any] | None:
    return None if t is None else [t[0][0], t[0][1], t[1]]


# The decoders below test ``type(v) is ...`` rather than isinstance: msgpack
# only ever returns the exact built-in types, ``type(v) is int`` already
# leaves out bools, and every datagram of a join burst carries many alive
# messages, each of them checked field by field.

_INT_LIMIT = 2**63
#: The largest incarnation the wire carries (msgpack's signed 64-bit range, as memberlist's uint32 is its).
MAX_INCARNATION = _INT_LIMIT - 1


def _tunnel_of(v: Any) -> Tunnel | None:
    if v is None:
        return None
    if type(v) is not list or len(v) != 3 or type(v[2]) is not bytes or len(v[2]) != TUNNEL_KEY_SIZE:
        raise DecodeError("malformed", "bad tunnel info")
    return (_addr_of(v[:2]), v[2])


def _full_tunnel(v: Any, gossip_host: str) -> Any:
    """An alive's tunnel may leave out its host when it is the gossip host."""
    if type(v) is list and len(v) == 2:
        return [gossip_host, *v]
    return v


def _state_of(v: Any) -> NodeState | None:
    if v is None:
        return None
    if type(v) is list and len(v) == 2:
        version, digest = v
        if type(version) is int and 0 <= version < _INT_LIMIT and type(digest) is bytes \
                and len(digest) <= MAX_STATE_DIGEST:
            return (version, digest)
    raise DecodeError("malformed", "bad node state")


def message_to_obj(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Ping):
        return {"t": "ping", "seq": msg.seq, "to": msg.target, "from": msg.source}
    if isinstance(msg, PingReq):
        return {
            "t": "ping-req",
            "seq": msg.seq,
            "to": msg.target,
            "addr": _addr(msg.target_addr),
            "from": msg.source,
            "nack": msg.want_nack,
        }
    if isinstance(msg, Ack):
        if msg.coord is None:
            return {"t": "ack", "seq": msg.seq, "from": msg.source}
        return {"t": "ack", "seq": msg.seq, "from": msg.source, "c": coord_bytes(msg.coord)}
    if isinstance(msg, Nack):
        return {"t": "nack", "seq": msg.seq, "from": msg.source}
    if isinstance(msg, Alive):
        # Alive is the message of a join burst, where how many fit in one
        # datagram sets how fast a cluster converges: one-letter keys, no
        # empty tags, and the tunnel's host only when it is not the gossip
        # host (docs/membership.md, "Wire sizes").
        obj: dict[str, Any] = {"t": "alive", "n": msg.name, "i": msg.incarnation, "a": _addr(msg.addr)}
        if msg.tags:
            obj["g"] = dict(msg.tags)
        if msg.state is not None:
            obj["s"] = [msg.state[0], msg.state[1]]
        if msg.tunnel is not None:
            (thost, tport), tkey = msg.tunnel
            obj["d"] = [tport, tkey] if thost == msg.addr[0] else [thost, tport, tkey]
        if msg.identity is not None and msg.sig is not None:
            obj["k"] = msg.identity
            obj["z"] = msg.sig
        return obj
    if isinstance(msg, Suspect):
        return {"t": "suspect", "name": msg.name, "inc": msg.incarnation, "from": msg.source}
    if isinstance(msg, Dead):
        return {"t": "dead", "name": msg.name, "inc": msg.incarnation, "from": msg.source}
    if isinstance(msg, PushPull):
        return {
            "t": "push-pull",
            "from": msg.source,
            "join": msg.join,
            "refused": msg.refused,
            "members": [
                [m.name, _addr(m.addr), m.incarnation, m.status, dict(m.tags), _state(m.state),
                 _tunnel(m.tunnel), *([m.identity, m.sig] if m.identity is not None and m.sig is not None else [])]
                for m in msg.members
            ],
            "x": msg.delegate,
            "c": {name: coord_bytes(c) for name, c in msg.coords.items()},
            **({"l": True} if msg.lite else {}),
            **({"f": list(msg.fresh)} if msg.fresh else {}),
            **({"rc": msg.refusal} if msg.refusal else {}),
            **({"e": msg.config} if msg.config is not None else {}),
        }
    if isinstance(msg, StateRequest):
        return {"t": "state-req", "from": msg.source, "node": msg.node}
    if isinstance(msg, Query):
        return {"t": "query", "id": msg.id, "o": msg.origin, "a": _addr(msg.origin_addr), "n": msg.name,
                "p": msg.payload}
    if isinstance(msg, QueryResponse):
        return {"t": "query-resp", "id": msg.id, "from": msg.source, "p": msg.payload}
    if isinstance(msg, StateReply):
        return {"t": "state", "node": msg.node, "data": msg.data}
    if isinstance(msg, ConfigPull):
        return {"t": "cfg-pull", "from": msg.source, "s": msg.summary, **({"stale": True} if msg.stale else {})}
    if isinstance(msg, ConfigPush):
        return {"t": "cfg", "e": msg.entries, **({"k": msg.keys} if msg.keys is not None else {}),
                **({"more": True} if msg.more else {}), **({"back": True} if msg.pulling_back else {})}
    raise TypeError(f"not a message: {msg!r}")


def encode_message(msg: Message) -> bytes:
    """One message, msgpack-encoded, ready to be packed with others."""
    out: bytes = msgpack.packb(message_to_obj(msg), use_bin_type=True)
    return out


def _array_header(n: int) -> bytes:
    # msgpack spec: fixarray up to 15 elements, then array16, then array32.
    if n <= 15:
        return bytes([0x90 | n])
    if n <= 0xFFFF:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


#: Bytes a packet adds around its messages, at most (2-array + version + array16).
PACKET_OVERHEAD = 1 + 1 + 3


def pack_packet(encoded_messages: list[bytes]) -> bytes:
    """Join pre-encoded messages into one versioned packet without re-encoding."""
    return (
        b"\x92"
        + bytes([PROTOCOL_VERSION])  # a positive fixint is its own encoding
        + _array_header(len(encoded_messages))
        + b"".join(encoded_messages)
    )


def encode_packet(messages: list[Message]) -> bytes:
    return pack_packet([encode_message(m) for m in messages])


# -- decoding -------------------------------------------------------------------


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
        )
    except msgpack.ExtraData as exc:
        raise DecodeError("malformed", "trailing bytes") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        text = str(exc)
        # A header that claims more elements than the buffer holds bytes is a
        # cut-off packet too; msgpack words that as "exceeds max_*_len".
        if "incomplete" in text or "exceeds max" in text or isinstance(exc, msgpack.OutOfData):
            raise DecodeError("truncated", text) from exc
        raise DecodeError("malformed", text) from exc
    except Exception as exc:  # msgpack may raise TypeError etc. on hostile input
        raise DecodeError("malformed", type(exc).__name__) from exc


def _str(obj: dict[str, Any], key: str, max_len: int = MAX_NAME_LEN) -> str:
    v = obj.get(key)
    if type(v) is not str or len(v) > max_len:
        raise DecodeError("malformed", f"field {key!r} must be a string")
    return v


def _int(obj: dict[str, Any], key: str) -> int:
    v = obj.get(key)
    if type(v) is not int or v < 0 or v >= _INT_LIMIT:
        raise DecodeError("malformed", f"field {key!r} must be a non-negative integer")
    return v


def _bool(obj: dict[str, Any], key: str) -> bool:
    v = obj.get(key, False)
    if type(v) is not bool:
        raise DecodeError("malformed", f"field {key!r} must be a boolean")
    return v


def _signed_by(identity: Any, sig: Any) -> tuple[bytes | None, bytes | None]:
    if identity is None and sig is None:
        return None, None
    if type(identity) is not bytes or len(identity) != 32 or type(sig) is not bytes or len(sig) != 64:
        raise DecodeError("malformed", "bad identity or signature")
    return identity, sig


def _payload(obj: dict[str, Any]) -> bytes:
    v = obj.get("p")
    if type(v) is not bytes or len(v) > MAX_QUERY_PAYLOAD:
        raise DecodeError("malformed", "bad query payload")
    return v


def _addr_of(v: Any) -> Address:
    if type(v) is list and len(v) == 2:
        host, port = v
        if type(host) is str and 0 < len(host) <= 255 and type(port) is int and 0 < port < 65536:
            return (host, port)
    raise DecodeError("malformed", "bad address")


def _tags_of(v: Any) -> dict[str, str]:
    if type(v) is not dict or len(v) > MAX_TAGS:
        raise DecodeError("malformed", "bad tags")
    for k, val in v.items():
        if type(k) is not str or type(val) is not str:
            raise DecodeError("malformed", "tags must map strings to strings")
        if len(k) > MAX_TAG_LEN or len(val) > MAX_TAG_LEN:
            raise DecodeError("malformed", "tag too long")
    return v  # msgpack built this dict for us alone: no copy needed


def _message_from_obj(obj: Any) -> Message:
    if type(obj) is not dict:
        raise DecodeError("malformed", "message is not a map")
    t = obj.get("t")
    if t == "alive":
        # The message of a join burst (and many per datagram): tested first.
        addr = _addr_of(obj.get("a"))
        identity, sig = _signed_by(obj.get("k"), obj.get("z"))
        return Alive(
            _str(obj, "n"),
            _int(obj, "i"),
            addr,
            _tags_of(obj["g"]) if "g" in obj else {},
            _state_of(obj.get("s")),
            _tunnel_of(_full_tunnel(obj.get("d"), addr[0])),
            identity,
            sig,
        )
    if t == "ping":
        return Ping(_int(obj, "seq"), _str(obj, "to"), _str(obj, "from"))
    if t == "ping-req":
        return PingReq(
            _int(obj, "seq"),
            _str(obj, "to"),
            _addr_of(obj.get("addr")),
            _str(obj, "from"),
            _bool(obj, "nack"),
        )
    if t == "ack":
        return Ack(_int(obj, "seq"), _str(obj, "from"), _coord_of(obj["c"]) if "c" in obj else None)
    if t == "nack":
        return Nack(_int(obj, "seq"), _str(obj, "from"))
    if t == "suspect":
        return Suspect(_str(obj, "name"), _int(obj, "inc"), _str(obj, "from"))
    if t == "dead":
        return Dead(_str(obj, "name"), _int(obj, "inc"), _str(obj, "from"))
    if t == "push-pull":
        raw_members = obj.get("members")
        if not isinstance(raw_members, list):
            raise DecodeError("malformed", "push-pull members must be a list")
        members = []
        for rec in raw_members:
            if not isinstance(rec, list) or not 5 <= len(rec) <= 9 or len(rec) == 8:
                raise DecodeError("malformed", "bad member record")
            name, addr, inc, status, tags = rec[:5]
            state = _state_of(rec[5]) if len(rec) >= 6 else None
            tunnel = _tunnel_of(rec[6]) if len(rec) >= 7 else None
            identity, sig = _signed_by(rec[7], rec[8]) if len(rec) == 9 else (None, None)
            if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
                raise DecodeError("malformed", "bad member name")
            if not isinstance(inc, int) or isinstance(inc, bool) or not 0 <= inc < 2**63:
                raise DecodeError("malformed", "bad incarnation")
            if status not in STATUSES:
                raise DecodeError("malformed", "bad member status")
            members.append(MemberRecord(name, _addr_of(addr), inc, status, _tags_of(tags), state, tunnel,
                                        identity, sig))
        refused = obj.get("refused", "")
        if not isinstance(refused, str) or len(refused) > 1024:
            raise DecodeError("malformed", "bad refusal")
        delegate = obj.get("x", b"")
        if not isinstance(delegate, bytes):
            raise DecodeError("malformed", "bad delegate state")
        raw_coords = obj.get("c", {})
        if type(raw_coords) is not dict or len(raw_coords) > MAX_COORDS:
            raise DecodeError("malformed", "bad coordinates")
        coords: dict[str, tuple[float, ...]] = {}
        for name, c in raw_coords.items():
            if type(name) is not str or not name or len(name) > MAX_NAME_LEN:
                raise DecodeError("malformed", "bad coordinate name")
            coords[name] = _coord_of(c)
        raw_fresh = obj.get("f", [])
        if type(raw_fresh) is not list or len(raw_fresh) > len(members) or any(
                type(f) is not str or len(f) > MAX_NAME_LEN for f in raw_fresh):
            raise DecodeError("malformed", "bad fresh list")
        refusal = obj.get("rc", "")
        if type(refusal) is not str or len(refusal) > 32:
            raise DecodeError("malformed", "bad refusal code")
        config = obj.get("e")
        if config is not None and (type(config) is not bytes or len(config) > MAX_STATE_DIGEST):
            raise DecodeError("malformed", "bad config digest")
        return PushPull(_str(obj, "from"), _bool(obj, "join"), members, refused, delegate, coords, _bool(obj, "l"),
                        tuple(raw_fresh), refusal, config)
    if t == "state-req":
        return StateRequest(_str(obj, "from"), _str(obj, "node"))
    if t == "query":
        return Query(_int(obj, "id"), _str(obj, "o"), _addr_of(obj.get("a")), _str(obj, "n"), _payload(obj))
    if t == "query-resp":
        return QueryResponse(_int(obj, "id"), _str(obj, "from"), _payload(obj))
    if t == "cfg-pull":
        summary = obj.get("s")
        if type(summary) is not list:
            raise DecodeError("malformed", "config summary must be a list")
        return ConfigPull(_str(obj, "from"), summary, _bool(obj, "stale"))
    if t == "cfg":
        entries, keys = obj.get("e"), obj.get("k")
        if type(entries) is not list or (keys is not None and type(keys) is not list):
            raise DecodeError("malformed", "config entries and keys must be lists")
        return ConfigPush(entries, keys, _bool(obj, "more"), _bool(obj, "back"))
    if t == "state":
        data = obj.get("data")
        if not isinstance(data, bytes):
            raise DecodeError("malformed", "state data must be bytes")
        return StateReply(_str(obj, "node"), data)
    raise DecodeError("unknown_type", t[:40] if isinstance(t, str) else type(t).__name__)


def decode_packet(data: bytes) -> list[Message]:
    """Decode a whole packet; all-or-nothing so a bad packet changes no state."""
    if not data:
        raise DecodeError("truncated", "empty packet")
    try:
        obj = _unpack(data)
    except RecursionError:
        raise DecodeError("malformed", "nesting too deep") from None
    if not isinstance(obj, list) or len(obj) != 2:
        raise DecodeError("malformed", "packet is not [version, messages]")
    version, body = obj
    if not isinstance(version, int) or isinstance(version, bool):
        raise DecodeError("malformed", "version is not an integer")
    if version != PROTOCOL_VERSION:
        raise DecodeError("version", f"protocol version {version}")
    if not isinstance(body, list):
        raise DecodeError("malformed", "messages is not a list")
    try:
        return [_message_from_obj(m) for m in body]
    except RecursionError:  # absurdly nested values inside a message
        raise DecodeError("malformed", "nesting too deep") from None


def pack_record(name: str, addr: Address, incarnation: int, status: str, tags: dict[str, str],
                state: NodeState | None, tunnel: Tunnel | None, identity: bytes | None = None,
                sig: bytes | None = None) -> bytes:
    """One push-pull member record, msgpack-encoded (exactly as inside encode_message(PushPull))."""
    rec: list[Any] = [name, _addr(addr), incarnation, status, dict(tags), _state(state), _tunnel(tunnel)]
    if identity is not None and sig is not None:
        rec += [identity, sig]
    out: bytes = msgpack.packb(rec, use_bin_type=True)
    return out


def encode_push_pull_stream(msg: PushPull, packed_records: list[bytes]) -> bytes:
    """``encode_stream([msg])`` for a push-pull whose member records come pre-encoded.

    A push-pull carries every member; encoding each record anew on every
    exchange would be most of its cost at thousands of members, while a record
    changes only when its member does.  ``msg.members`` is ignored.
    """
    head = message_to_obj(msg._replace(members=[]))
    del head["members"]
    packed_head: bytes = msgpack.packb(head, use_bin_type=True)
    n = len(head) + 1
    if n > 15:  # pragma: no cover - a push-pull has 7 to 11 keys
        raise ValueError("push-pull head too large for a fixmap")
    body = (bytes([0x80 | n]) + packed_head[1:] + msgpack.packb("members")
            + _array_header(len(packed_records)) + b"".join(packed_records))
    return _deflated(pack_packet([body]))


def encode_stream(messages: list[Message]) -> bytes:
    """A packet for a TCP stream: deflated when that makes it smaller."""
    return _deflated(encode_packet(messages))


def _deflated(plain: bytes) -> bytes:
    if len(plain) < COMPRESS_MIN:
        return plain
    packed = zlib.compress(plain, 6)
    if len(packed) + 1 >= len(plain):
        return plain
    return bytes([COMPRESSED_MARK]) + packed


def decode_stream(data: bytes) -> list[Message]:
    """Decode a TCP stream payload, plain or deflated.

    Inflation is capped at MAX_STREAM_BYTES, so a small hostile payload cannot
    make us allocate without bound (a "zip bomb" is just another bad packet).
    """
    if data[:1] == bytes([COMPRESSED_MARK]):
        inflater = zlib.decompressobj()
        try:
            plain = inflater.decompress(data[1:], MAX_STREAM_BYTES)
        except zlib.error as exc:
            raise DecodeError("malformed", f"bad deflate stream: {exc}") from None
        if inflater.unconsumed_tail:
            raise DecodeError("oversized", f"inflates past {MAX_STREAM_BYTES} bytes")
        if not inflater.eof:
            raise DecodeError("truncated", "deflate stream cut short")
        if inflater.unused_data:
            raise DecodeError("malformed", "trailing bytes after the deflate stream")
        data = plain
    return decode_packet(data)
