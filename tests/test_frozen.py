"""Immutable records (gossip.frozen): named tuples that compare and refuse changes as frozen dataclasses do."""

from __future__ import annotations

import pytest

from agent.access import Caller
from agent.dns_settings import DnsSettings
from agent.intentions import Intention, Verdict
from dataplane.endpoint import Endpoint
from gossip.config_store import Entry
from gossip.config_sync import Announced
from gossip.coordinate import Coordinate
from gossip.effects import Event, EventKind, FetchState, Purpose, SendPacket, StartPushPull, TcpProbe
from gossip.registry import Instance
from gossip.wire import (
    Ack,
    Alive,
    ConfigPull,
    ConfigPush,
    Dead,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Query,
    QueryResponse,
    StateReply,
    StateRequest,
    Suspect,
    decode_packet,
    encode_packet,
)

A = ("127.0.0.1", 7946)
RECORDS = [
    Ping(1, "b", "a"), PingReq(2, "c", A, "a"), Ack(3, "a", (0.5, 0.25)), Nack(4, "a"),
    Alive("a", 5, A, {"role": "web"}), Suspect("a", 6, "b"), Dead("a", 6, "b"),
    PushPull("a", True, []), StateRequest("a", "b"), StateReply("b", b"x"), Query(7, "a", A, "q", b"p"),
    QueryResponse(7, "b", b"r"), ConfigPull("a", []), ConfigPush([]),
    SendPacket(A, b"x"), StartPushPull(A, Purpose.JOIN), FetchState("b", A), TcpProbe(A, 8, b"x", 1.0),
    Event(EventKind.MEMBER, {"name": "a"}),
    Entry("service-defaults", "web", None, 1, "a", b"k", b"s"), Announced("service-defaults", "web", (1, "a", b"s")),
    Coordinate((0.0, 0.5), 1.5, 0.0, 1e-5), Instance("web-1", "web", "10.0.0.1", 80, ("v1",)),
    Caller(0, False), DnsSettings(), Intention("web", "db", "allow"), Verdict(True, "default allow"),
    Endpoint("n1", "web-1", "127.0.0.1", 80, "web", ("v1",)),
]
UNHASHABLE = (Alive, PushPull, ConfigPull, ConfigPush, Event)  # they hold lists or dicts


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_equal_only_within_a_class(record: tuple[object, ...]) -> None:
    same = type(record)(*record)
    assert record == same and not record != same
    if type(record) not in UNHASHABLE:
        assert hash(record) == hash(same)
    as_tuple = tuple(record)
    assert record != as_tuple and not record == as_tuple
    assert as_tuple != record and not as_tuple == record


def test_records_of_different_classes_with_the_same_items_differ() -> None:
    assert Suspect("a", 6, "b") != Dead("a", 6, "b")
    assert not Suspect("a", 6, "b") == Dead("a", 6, "b")
    assert len({Suspect("a", 6, "b"), Dead("a", 6, "b"), Ping(6, "a", "b")}) == 3
    assert Ack(1, "a") != Nack(1, "a")
    assert Suspect("a", 6, "b") != Suspect("a", 7, "b")


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_immutable(record: tuple[object, ...]) -> None:
    first = type(record)._fields[0]  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        setattr(record, first, None)


def test_field_order_is_the_decoders() -> None:
    # The decoders build every message positionally: a field moved is a field swapped.
    assert Alive._fields == ("name", "incarnation", "addr", "tags", "state", "tunnel", "identity", "sig")
    assert PushPull._fields == ("source", "join", "members", "refused", "delegate", "coords", "lite", "fresh",
                                "refusal", "config")
    assert PingReq._fields == ("seq", "target", "target_addr", "source", "want_nack")
    assert ConfigPush._fields == ("entries", "keys", "more", "pulling_back")
    messages = [r for r in RECORDS if type(r).__module__ == "gossip.wire"]
    assert decode_packet(encode_packet(messages)) == messages  # type: ignore[arg-type]


def test_defaults_are_shared_and_left_alone() -> None:
    # The default tags and coordinates are one dict each, read and never written (gossip.wire).
    a, b = Alive("a", 1, A), Alive("b", 1, A)
    assert a.tags == {} and a.tags is b.tags
    assert PushPull("a", False, []).coords == {}
