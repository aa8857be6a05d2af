"""gossip.wire: round trips, the drop reasons of decode_packet, addresses."""

from __future__ import annotations

import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.wire import (
    COMPRESSED_MARK,
    MAX_NAME_LEN,
    MAX_STREAM_BYTES,
    MAX_TAG_LEN,
    MAX_TAGS,
    PACKET_OVERHEAD,
    PROTOCOL_VERSION,
    Ack,
    Alive,
    ConfigPull,
    ConfigPush,
    Dead,
    DecodeError,
    MemberRecord,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    decode_packet,
    decode_stream,
    encode_message,
    encode_packet,
    encode_stream,
    format_addr,
    message_to_obj,
    pack_packet,
    parse_addr,
)

# Deterministic: the same examples on every run, nothing read from .hypothesis/.
SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=150,
                    suppress_health_check=[HealthCheck.too_slow])

# -- strategies --------------------------------------------------------------------

_chars = st.characters(blacklist_categories=("Cs",))  # msgpack cannot encode lone surrogates
names = st.text(_chars, max_size=MAX_NAME_LEN)
nonempty_names = st.text(_chars, min_size=1, max_size=MAX_NAME_LEN)
u63 = st.integers(min_value=0, max_value=2**63 - 1)
hosts = st.text(_chars, min_size=1, max_size=255)
addrs = st.tuples(hosts, st.integers(min_value=1, max_value=65535))
tag_text = st.text(_chars, max_size=MAX_TAG_LEN)
tags = st.dictionaries(tag_text, tag_text, max_size=MAX_TAGS)
small_tags = st.dictionaries(st.text(_chars, max_size=20), st.text(_chars, max_size=40), max_size=6)
statuses = st.sampled_from(["alive", "suspect", "dead", "left"])

# The optional fields are named: for a NamedTuple (the messages are named tuples too,
# gossip.frozen), builds() would otherwise draw them from their type hints, unbounded
# (a node state the wire rightly refuses).
records = st.builds(MemberRecord, nonempty_names, addrs, u63, statuses, small_tags,
                    state=st.none(), tunnel=st.none(), identity=st.none(), sig=st.none())

messages = st.one_of(
    st.builds(Ping, u63, names, names),
    st.builds(PingReq, u63, names, addrs, names, st.booleans()),
    st.builds(Ack, u63, names, coord=st.none()),
    st.builds(Nack, u63, names),
    st.builds(Alive, names, u63, addrs, tags, state=st.none(), tunnel=st.none(), identity=st.none(),
              sig=st.none()),
    st.builds(Suspect, names, u63, names),
    st.builds(Dead, names, u63, names),
    st.builds(PushPull, names, st.booleans(), st.lists(records, max_size=8),
              st.text(_chars, max_size=1024), delegate=st.just(b""), coords=st.just({}), lite=st.just(False),
              fresh=st.just(()), refusal=st.just(""), config=st.none()),
)


def reason_of(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode_packet(data)
    return info.value.reason


def raw_packet(*messages: object, version: object = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb([version, list(messages)], use_bin_type=True)


# -- round trips ---------------------------------------------------------------------


def test_a_push_pull_without_a_config_digest_is_one_from_an_agent_that_takes_no_config() -> None:
    obj = message_to_obj(PushPull("old", False, []))
    assert "e" not in obj  # what an agent of the release before config entries sends
    assert decode_packet(raw_packet(obj)) == [PushPull("old", False, [])]
    assert decode_packet(raw_packet({**obj, "e": b"d" * 32}))[0].config == b"d" * 32  # type: ignore[union-attr]
    for bad in ("text", b"x" * 65, 5):
        assert reason_of(raw_packet({**obj, "e": bad})) == "malformed"
    for bad_msg in ({"t": "cfg-pull", "from": "a", "s": "x"}, {"t": "cfg", "e": {}},
                    {"t": "cfg", "e": [], "k": "x"}, {"t": "cfg-pull", "from": "a", "s": [], "stale": 1}):
        assert reason_of(raw_packet(bad_msg)) == "malformed"


@SETTINGS
@given(st.lists(messages, max_size=5))
def test_any_messages_round_trip(msgs: list[object]) -> None:
    assert decode_packet(encode_packet(msgs)) == msgs  # type: ignore[arg-type]


@pytest.mark.parametrize("msg", [
    Ping(1, "b", "a"),
    PingReq(2, "c", ("10.0.0.3", 7946), "a", True),
    PingReq(2, "c", ("::1", 1), "a", False),
    Ack(3, "b"),
    Nack(4, "b"),
    Alive("a", 5, ("10.0.0.1", 65535), {"role": "db", "": ""}),
    Alive("a", 0, ("host.example", 1)),
    Suspect("b", 6, "a"),
    Dead("b", 2**63 - 1, "a"),
    Dead("b", 0, "b"),
    PushPull("a", True, [MemberRecord("a", ("10.0.0.1", 7946), 1, "alive", {"k": "v"}),
                         MemberRecord("b", ("10.0.0.2", 7946), 0, "left")], ""),
    PushPull("a", False, [], "name taken"),
    PushPull("a", False, [], "", b"", {}, False, (), "", b"\x01" * 32),
    ConfigPull("a", [["intention", "web/db", 7, "w", b"s" * 64]]),
    ConfigPull("a", [], stale=True),
    ConfigPush([["intention", "web/db", {"action": "deny"}, 7, "w", b"k" * 32, b"s" * 64]]),
    ConfigPush([], [["intention", "web/db"]], more=True),
    ConfigPush([], None, pulling_back=True),
])
def test_each_message_type_round_trips(msg: object) -> None:
    assert decode_packet(encode_packet([msg])) == [msg]  # type: ignore[list-item]


def test_every_message_type_has_its_own_tag() -> None:
    samples = [Ping(1, "", ""), PingReq(1, "", ("h", 1), ""), Ack(1, ""), Nack(1, ""),
               Alive("", 1, ("h", 1)), Suspect("", 1, ""), Dead("", 1, ""), PushPull("", False, []),
               ConfigPull("", []), ConfigPush([])]
    assert len({message_to_obj(m)["t"] for m in samples}) == len(samples)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        message_to_obj("not a message")  # type: ignore[arg-type]


@SETTINGS
@given(st.lists(st.builds(Ack, u63, names, coord=st.none()), min_size=0, max_size=40))
def test_pack_packet_equals_encode_packet_at_every_array_size(msgs: list[Ack]) -> None:
    # 0..15 messages use a fixarray header, 16 and more an array16 one.
    packed = pack_packet([encode_message(m) for m in msgs])
    assert packed == encode_packet(msgs)  # type: ignore[arg-type]
    assert packed == msgpack.packb([PROTOCOL_VERSION, [message_to_obj(m) for m in msgs]])
    assert decode_packet(packed) == msgs
    assert len(packed) <= PACKET_OVERHEAD + sum(len(encode_message(m)) for m in msgs)


def test_empty_message_list_is_a_valid_packet() -> None:
    assert decode_packet(encode_packet([])) == []


# -- decode errors ---------------------------------------------------------------------


def test_empty_packet_is_truncated() -> None:
    assert reason_of(b"") == "truncated"


@SETTINGS
@given(st.lists(messages, min_size=1, max_size=3))
def test_packet_missing_its_last_byte_is_truncated(msgs: list[object]) -> None:
    assert reason_of(encode_packet(msgs)[:-1]) == "truncated"  # type: ignore[arg-type]


def test_every_proper_prefix_of_a_packet_is_truncated() -> None:
    # Regression: short prefixes whose array/map header claims more elements than the
    # buffer has bytes ("exceeds max_array_len" in msgpack) were counted as malformed.
    packet = encode_packet([Ping(1, "a", "b"), Alive("x", 3, ("h", 1), {"k": "v"})])
    reasons = {i: reason_of(packet[:i]) for i in range(1, len(packet))}
    assert {i: r for i, r in reasons.items() if r != "truncated"} == {}


@pytest.mark.parametrize("data", [
    b"\xc1",  # the one byte msgpack never uses
    b"\xc1\x00\x00",
    msgpack.packb({"a": 1}),  # not a list
    msgpack.packb([1]),  # one element
    msgpack.packb([1, [], 3]),  # three elements
    msgpack.packb([1, "messages"]),  # body not a list
    msgpack.packb([1, {"t": "ping"}]),
    msgpack.packb(["1", []]),  # version not an integer
    msgpack.packb([True, []]),  # bool is not a version
    msgpack.packb([1.0, []]),
    msgpack.packb([1, []]) + b"\x00",  # trailing bytes
    msgpack.packb([1, [{1: 2}]]),  # non-string map key
    raw_packet(5),  # a message that is not a map
    raw_packet([1, 2]),
    raw_packet({"t": "ping", "seq": -1, "to": "a", "from": "b"}),
    raw_packet({"t": "ping", "seq": True, "to": "a", "from": "b"}),
    raw_packet({"t": "ping", "seq": 2**63, "to": "a", "from": "b"}),
    raw_packet({"t": "ping", "seq": 1.5, "to": "a", "from": "b"}),
    raw_packet({"t": "ping", "seq": 1, "to": 7, "from": "b"}),
    raw_packet({"t": "ping", "seq": 1, "to": b"a", "from": "b"}),
    raw_packet({"t": "ping", "seq": 1, "to": "a"}),  # missing field
    raw_packet({"t": "ack", "seq": 1, "from": "x" * (MAX_NAME_LEN + 1)}),
    raw_packet({"t": "ping-req", "seq": 1, "to": "a", "addr": ["h", 0], "from": "b", "nack": True}),
    raw_packet({"t": "ping-req", "seq": 1, "to": "a", "addr": ["h", 65536], "from": "b"}),
    raw_packet({"t": "ping-req", "seq": 1, "to": "a", "addr": ["h", True], "from": "b"}),
    raw_packet({"t": "ping-req", "seq": 1, "to": "a", "addr": ["", 1], "from": "b"}),
    raw_packet({"t": "ping-req", "seq": 1, "to": "a", "addr": ["h" * 256, 1], "from": "b"}),
    raw_packet({"t": "ping-req", "seq": 1, "to": "a", "addr": ["h", 1, 2], "from": "b"}),
    raw_packet({"t": "ping-req", "seq": 1, "to": "a", "addr": "h:1", "from": "b"}),
    raw_packet({"t": "ping-req", "seq": 1, "to": "a", "addr": ["h", 1], "from": "b", "nack": 1}),
    raw_packet({"t": "alive", "name": "a", "inc": 1, "addr": ["h", 1], "tags": {"k": 1}}),
    raw_packet({"t": "alive", "name": "a", "inc": 1, "addr": ["h", 1], "tags": ["k"]}),
    raw_packet({"t": "alive", "name": "a", "inc": 1, "addr": ["h", 1], "tags": {"k": "v" * 513}}),
    raw_packet({"t": "alive", "name": "a", "inc": 1, "addr": ["h", 1],
                "tags": {str(i): "" for i in range(MAX_TAGS + 1)}}),
    raw_packet({"t": "suspect", "name": "a", "inc": -2, "from": "b"}),
    raw_packet({"t": "dead", "name": None, "inc": 1, "from": "b"}),
    raw_packet({"t": "push-pull", "from": "a", "join": True, "members": {}}),
    raw_packet({"t": "push-pull", "from": "a", "join": "yes", "members": []}),
    raw_packet({"t": "push-pull", "from": "a", "members": [["b", ["h", 1], 0, "alive"]]}),
    raw_packet({"t": "push-pull", "from": "a", "members": [["", ["h", 1], 0, "alive", {}]]}),
    raw_packet({"t": "push-pull", "from": "a", "members": [["b", ["h", 1], -1, "alive", {}]]}),
    raw_packet({"t": "push-pull", "from": "a", "members": [["b", ["h", 1], False, "alive", {}]]}),
    raw_packet({"t": "push-pull", "from": "a", "members": [["b", ["h", 1], 0, "zombie", {}]]}),
    raw_packet({"t": "push-pull", "from": "a", "members": [["b", ["h", 0], 0, "alive", {}]]}),
    raw_packet({"t": "push-pull", "from": "a", "members": [], "refused": 3}),
    raw_packet({"t": "push-pull", "from": "a", "members": [], "refused": "x" * 1025}),
    raw_packet({"t": "push-pull", "from": "a", "members": [], "f": "b"}),
    raw_packet({"t": "push-pull", "from": "a", "members": [], "f": ["b"]}),  # more fresh names than members
    raw_packet({"t": "push-pull", "from": "a", "members": [["b", ["h", 1], 0, "alive", {}]], "f": [1]}),
    # A valid message first does not rescue the packet: decoding is all or nothing.
    raw_packet({"t": "ack", "seq": 1, "from": "b"}, {"t": "ack", "seq": -1, "from": "b"}),
])
def test_wrong_shapes_are_malformed(data: bytes) -> None:
    assert reason_of(data) == "malformed"


@pytest.mark.parametrize("version", [0, 2, 255, 2**40])
def test_other_protocol_version(version: int) -> None:
    assert reason_of(raw_packet({"t": "ack", "seq": 1, "from": "b"}, version=version)) == "version"
    # The version is checked before the body is looked at.
    assert reason_of(msgpack.packb([version, "not even a list"])) == "version"


@pytest.mark.parametrize("t", ["bogus", "", "PING", None, 7, ["ping"]])
def test_unknown_message_type(t: object) -> None:
    msg = {"seq": 1, "from": "b"} if t is None else {"t": t, "seq": 1, "from": "b"}
    assert reason_of(raw_packet(msg)) == "unknown_type"


def test_deeply_nested_type_tag_is_a_decode_error() -> None:
    # Regression: repr() of a ~1000-deep unknown type tag raised RecursionError.  How
    # deep repr() can go depends on the caller's stack, so try every depth msgpack
    # itself accepts (it refuses beyond ~1020 levels).
    for depth in range(800, 1030, 2):
        data = b"\x92\x01\x91\x81\xa1t" + b"\x91" * depth + b"\x01"  # [1, [{"t": [[...1...]]}]]
        assert reason_of(data) in ("unknown_type", "malformed"), depth


@settings(SETTINGS, max_examples=1000)
@given(st.binary(max_size=200))
def test_random_bytes_raise_nothing_but_decode_error(data: bytes) -> None:
    try:
        decode_packet(data)
    except DecodeError as exc:
        assert exc.reason in ("truncated", "malformed", "version", "unknown_type")


# Any msgpack document, in the packet envelope or not, decodes or raises DecodeError.
_leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                    st.floats(allow_nan=False), st.text(_chars, max_size=10), st.binary(max_size=10),
                    st.sampled_from(["ping", "ping-req", "ack", "nack", "alive", "suspect", "dead",
                                     "push-pull", "t", "seq", "from", "to", "addr", "members"]))
_docs = st.recursive(_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.sampled_from(["t", "seq", "to", "from", "addr", "nack", "name", "inc", "tags",
                                     "join", "members", "refused"]) | st.text(max_size=3),
                    inner, max_size=6),
), max_leaves=20)


@SETTINGS
@given(_docs, st.booleans())
def test_random_msgpack_documents_raise_nothing_but_decode_error(doc: object, wrap: bool) -> None:
    data = msgpack.packb([PROTOCOL_VERSION, [doc]] if wrap else doc, use_bin_type=True)
    try:
        decode_packet(data)
    except DecodeError as exc:
        assert exc.reason in ("truncated", "malformed", "version", "unknown_type")


def test_decode_error_carries_reason_and_detail() -> None:
    exc = DecodeError("malformed", "bad address")
    assert exc.reason == "malformed" and exc.detail == "bad address"
    assert str(exc) == "malformed: bad address"
    assert str(DecodeError("truncated")) == "truncated"


# -- addresses -------------------------------------------------------------------------


@pytest.mark.parametrize("addr, text", [
    (("10.0.0.1", 7946), "10.0.0.1:7946"),
    (("node-1.example", 1), "node-1.example:1"),
    (("::1", 7946), "[::1]:7946"),
    (("fe80::1%eth0", 65535), "[fe80::1%eth0]:65535"),
])
def test_format_and_parse_addr(addr: tuple[str, int], text: str) -> None:
    assert format_addr(addr) == text
    assert parse_addr(text) == addr
    assert parse_addr(f"  {text}\n") == addr


@pytest.mark.parametrize("text, default, expected", [
    ("seed.example", 7946, ("seed.example", 7946)),
    ("[::1]", 7946, ("::1", 7946)),
    ("seed.example:8000", 7946, ("seed.example", 8000)),
    ("[2001:db8::2]:8000", 7946, ("2001:db8::2", 8000)),
])
def test_parse_addr_default_port(text: str, default: int, expected: tuple[str, int]) -> None:
    assert parse_addr(text, default_port=default) == expected


@pytest.mark.parametrize("text, default", [
    ("", None),
    ("   ", 7946),
    ("seed.example", None),  # no port and no default
    ("[::1]", None),
    ("::1", 7946),  # bare IPv6 is ambiguous: brackets are required
    ("2001:db8::2:80", None),
    ("[::1", 7946),  # missing ']'
    ("[::1]x", None),
    ("[::1]:", None),
    ("[]:80", None),
    (":80", None),
    ("host:", None),
    ("host:http", None),
    ("host:65536", None),
    ("host:-1", None),
])
def test_parse_addr_errors(text: str, default: int | None) -> None:
    with pytest.raises(ValueError):
        parse_addr(text, default_port=default)


_plain_hosts = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters=".-_"),
                       min_size=1, max_size=60)
_v6_hosts = st.ip_addresses(v=6).map(str)


@SETTINGS
@given(st.one_of(_plain_hosts, _v6_hosts), st.integers(min_value=1, max_value=65535))
def test_format_then_parse_is_identity(host: str, port: int) -> None:
    assert parse_addr(format_addr((host, port))) == (host, port)


# -- TCP streams: deflated when that saves bytes ---------------------------------------


def _big_push_pull(n: int) -> PushPull:
    return PushPull("node00", False, [
        MemberRecord(f"node{i:02d}", ("10.0.0.1", 7000 + i), 1, "alive", {"role": "web"}) for i in range(n)], "")


@SETTINGS
@given(st.lists(messages, max_size=5))
def test_any_stream_round_trips(msgs: list[object]) -> None:
    assert decode_stream(encode_stream(msgs)) == msgs  # type: ignore[arg-type]


def test_a_push_pull_is_deflated_and_much_smaller() -> None:
    msg = _big_push_pull(50)
    plain = encode_packet([msg])
    wire = encode_stream([msg])
    assert wire[0] == COMPRESSED_MARK
    assert len(wire) < len(plain) / 3
    assert decode_stream(wire) == [msg]


def test_a_small_stream_payload_stays_plain() -> None:
    wire = encode_stream([Ack(1, "a")])
    assert wire == encode_packet([Ack(1, "a")])
    assert decode_stream(wire) == [Ack(1, "a")]


def test_plain_packets_are_still_accepted_on_streams() -> None:
    msg = _big_push_pull(50)
    assert decode_stream(encode_packet([msg])) == [msg]


def test_datagrams_do_not_accept_the_deflated_form() -> None:
    wire = encode_stream([_big_push_pull(50)])
    with pytest.raises(DecodeError):
        decode_packet(wire)


def _stream_reason(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode_stream(data)
    return info.value.reason


def test_bad_deflate_streams_are_decode_errors() -> None:
    mark = bytes([COMPRESSED_MARK])
    good = encode_stream([_big_push_pull(50)])
    assert _stream_reason(mark) == "truncated"
    assert _stream_reason(mark + b"not deflate at all") == "malformed"
    assert _stream_reason(good[:-5]) == "truncated"
    assert _stream_reason(good + b"junk") == "malformed"
    # Deflated fine, but what it inflates to is not a packet.
    assert _stream_reason(mark + zlib.compress(b"\xc1garbage")) == "malformed"


def test_a_deflate_bomb_is_refused_without_inflating_it() -> None:
    bomb = bytes([COMPRESSED_MARK]) + zlib.compress(b"\0" * (MAX_STREAM_BYTES + 1024), 9)
    assert len(bomb) < 64 * 1024
    assert _stream_reason(bomb) == "oversized"


def test_alive_tunnel_host_is_left_out_only_when_it_is_the_gossip_host() -> None:
    key = bytes(range(32))
    same = Alive("a", 3, ("10.0.0.1", 7946), {}, (2, b"d" * 8), (("10.0.0.1", 7948), key))
    other = Alive("a", 3, ("10.0.0.1", 7946), {"r": "x"}, None, (("10.9.9.9", 7948), key))
    assert message_to_obj(same)["d"] == [7948, key]
    assert message_to_obj(other)["d"] == ["10.9.9.9", 7948, key]
    assert "g" not in message_to_obj(same)  # no tags, no key
    for msg in (same, other):
        assert decode_packet(encode_packet([msg])) == [msg]
    # A join burst needs many alives per datagram.
    assert len(encode_message(same)) <= 95


@pytest.mark.parametrize("d", [[7948], [7948, b"short"], ["h", 7948, b"k" * 31], [0, b"k" * 32], "x"])
def test_bad_alive_tunnel_is_malformed(d: object) -> None:
    obj = {"t": "alive", "n": "a", "i": 1, "a": ["10.0.0.1", 7946], "d": d}
    assert reason_of(raw_packet(obj)) == "malformed"


def test_a_push_pull_with_pre_encoded_records_decodes_as_the_plain_encoding() -> None:
    from gossip.wire import PushPull, encode_push_pull_stream, pack_record

    recs = [MemberRecord(f"n{i}", ("10.0.0.1", 7000 + i), i, "alive", {"k": "v" * i}, (i, b"d" * 8),
                         (("10.0.0.1", 8000 + i), b"t" * 32), b"i" * 32 if i % 2 else None,
                         b"s" * 64 if i % 2 else None) for i in range(40)]
    msg = PushPull("me", True, recs, "", b"delegate", {"me": (0.1,) * 11}, lite=False, fresh=("n3", "n7"))
    fast = encode_push_pull_stream(msg, [pack_record(r.name, r.addr, r.incarnation, r.status, r.tags, r.state,
                                                     r.tunnel, r.identity, r.sig) for r in recs])
    [a] = decode_stream(fast)
    [b] = decode_stream(encode_stream([msg]))
    assert a == b and isinstance(a, PushPull) and len(a.members) == 40 and a.members[3].sig == b"s" * 64
    assert a.fresh == ("n3", "n7")
