"""dataplane.mux: stream lifecycles, flow control, fairness, packing and every protocol violation.

Two Sessions are wired back to back through records, exactly as the transport
will do after decryption; no sockets, no clock.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.mux import (
    DEFAULT_MAX_RECORD,
    HEADER_SIZE,
    MAX_OPEN_HEADER,
    MAX_WINDOW,
    MIN_RECORD,
    Data,
    Event,
    FlowControlError,
    FrameType,
    GoAway,
    GoAwayCode,
    MuxError,
    Ping,
    Pong,
    ProtocolError,
    ResetCode,
    Session,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    TooManyStreamsError,
    WindowOpened,
    decode_record,
    encode_frame,
)

# Deterministic: the same examples on every run, nothing read from .hypothesis/.
SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- harness ----------------------------------------------------------------------


@dataclass
class End:
    """One Session plus what its application has seen, with a reader that may lag."""

    session: Session
    auto_consume: bool = True
    events: list[Event] = field(default_factory=list)
    received: dict[int, bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    opened: dict[int, bytes] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)
    resets: dict[int, int] = field(default_factory=dict)
    unconsumed: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def feed(self, record: bytes) -> list[Event]:
        events = self.session.receive(record)
        self.events.extend(events)
        for ev in events:
            if isinstance(ev, StreamOpened):
                self.opened[ev.stream_id] = ev.header
            elif isinstance(ev, Data):
                self.received[ev.stream_id] += ev.data
                if self.auto_consume:
                    self.session.consumed(ev.stream_id, len(ev.data))
                else:
                    self.unconsumed[ev.stream_id] += len(ev.data)
            elif isinstance(ev, StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, StreamReset):
                self.resets[ev.stream_id] = ev.code
        return events

    def consume(self, stream_id: int, n: int) -> None:
        self.unconsumed[stream_id] -= n
        self.session.consumed(stream_id, n)


def pair(**kwargs: int) -> tuple[End, End]:
    return End(Session(True, **kwargs)), End(Session(False, **kwargs))


def pump(a: End, b: End, max_records: int = 100_000) -> int:
    """Move records both ways until neither side has anything to send; returns records moved."""
    moved = 0
    while moved < max_records:
        progress = False
        for src, dst in ((a, b), (b, a)):
            record = src.session.next_record()
            if record is not None:
                dst.feed(record)
                moved += 1
                progress = True
        if not progress:
            return moved
    raise AssertionError("pump did not settle")


def data_stream_ids(record: bytes) -> list[int]:
    return [f.stream_id for f in decode_record(record) if f.type is FrameType.DATA]


# -- lifecycles -------------------------------------------------------------------


def test_open_and_data_share_the_first_record() -> None:
    """No round trip: OPEN and the first bytes leave together, before any answer."""
    a, b = pair()
    sid = a.session.open_stream(b"svc=web;inst=3")
    a.session.send(sid, b"GET / HTTP/1.1\r\n\r\n")
    record = a.session.next_record()
    assert record is not None
    assert [f.type for f in decode_record(record)] == [FrameType.OPEN, FrameType.DATA]
    assert b.feed(record) == [StreamOpened(sid, b"svc=web;inst=3"), Data(sid, b"GET / HTTP/1.1\r\n\r\n")]
    assert a.session.next_record() is None


def test_send_keeps_immutable_data_and_copies_the_rest() -> None:
    """A caller may reuse a bytearray after send(); bytes, and views of bytes, need no copy."""
    a, b = pair()
    sid = a.session.open_stream()
    reused = bytearray(b"first")
    a.session.send(sid, reused)
    reused[:] = b"XXXXX"
    whole = b"0123456789" * 10
    part = memoryview(whole)[10:30]
    a.session.send(sid, part)
    queue = a.session._streams[sid].queue
    assert queue[-1] is part  # kept as given: the bytes under it cannot change
    a.session.send(sid, memoryview(bytearray(b"view")))
    assert isinstance(queue[-1], bytes)
    pump(a, b)
    assert bytes(b.received[sid]) == b"first" + whole[10:30] + b"view"


def test_direct_records_only_when_nothing_is_overtaken() -> None:
    """seal_direct makes the record next_record would have made, and is refused
    whenever it would jump a queued frame or exceed the peer's credit."""
    a, b = pair(initial_window=100_000)
    b.auto_consume = False  # no credit comes back
    sid = a.session.open_stream(b"h")
    assert a.session.direct_room(sid) == 0  # the OPEN has not left: no DATA may pass it
    pump(a, b)
    assert a.session.direct_room(sid) == DEFAULT_MAX_RECORD - HEADER_SIZE
    record = bytearray(HEADER_SIZE) + b"hello"
    a.session.seal_direct(sid, record)
    assert bytes(record) == encode_frame(FrameType.DATA, sid, b"hello")
    b.feed(bytes(record))
    assert bytes(b.received[sid]) == b"hello"

    other = a.session.open_stream()
    pump(a, b)
    a.session.send(other, b"queued")  # another stream waits for its turn
    assert a.session.direct_room(sid) == 0
    with pytest.raises(FlowControlError):
        a.session.seal_direct(sid, bytearray(HEADER_SIZE + 1))
    pump(a, b)
    a.session.send(sid, b"own")  # its own queued data goes first
    assert a.session.direct_room(sid) == 0
    pump(a, b)

    # Credit: the peer has consumed nothing, so 8 bytes of it are spent.
    room = DEFAULT_MAX_RECORD - HEADER_SIZE
    assert a.session.direct_room(sid) == room and not a.session.out_of_credit(sid)
    a.session.seal_direct(sid, bytearray(HEADER_SIZE + room))
    left = 100_000 - 8 - room
    assert a.session.direct_room(sid) == left
    a.session.seal_direct(sid, bytearray(HEADER_SIZE + left))
    assert a.session.direct_room(sid) == 0 and a.session.out_of_credit(sid)
    a.session.send(sid, b"more")  # queued behind the credit: no longer "out of credit" but stuck
    assert not a.session.out_of_credit(sid) and a.session.next_record() is None
    assert a.session.counters["data_bytes_out"] == 100_000 + len(b"queued")
    a.session.close(sid)
    assert a.session.direct_room(sid) == 0


def test_receive_data_is_receive_for_single_data_records_and_declines_the_rest() -> None:
    """Fed the same records, a receiver that tries receive_data first ends exactly
    like one that only calls receive: same data, counters, errors."""
    f = encode_frame
    window = 4096
    cases: list[list[bytes]] = [
        [f(FrameType.OPEN, 1, b"h"), f(FrameType.DATA, 1, b"x" * 100), f(FrameType.DATA, 1, b"y")],
        [f(FrameType.OPEN, 1) + f(FrameType.DATA, 1, b"both in one"), f(FrameType.DATA, 1, b"z")],
        [f(FrameType.OPEN, 1), f(FrameType.DATA, 1, b"a") + f(FrameType.DATA, 1, b"b")],  # two frames
        [f(FrameType.OPEN, 1), f(FrameType.DATA, 1, b"x" * window), f(FrameType.DATA, 1, b"over credit")],
        [f(FrameType.OPEN, 1), f(FrameType.FIN, 1), f(FrameType.DATA, 1, b"after FIN")],
        [f(FrameType.DATA, 3, b"never opened")],
        [f(FrameType.DATA, 0, b"on the session")],
        [f(FrameType.OPEN, 1), f(FrameType.DATA, 1, b"short")[:-1]],  # length says more
        [f(FrameType.OPEN, 1), f(FrameType.DATA, 1, b"long") + b"!"],  # trailing byte
        [f(FrameType.OPEN, 1), f(FrameType.DATA, 1, b"")],  # empty DATA is an error
    ]
    def feed(session: Session, records: list[bytes], fast: bool) -> tuple[bytes, str | None]:
        got = bytearray()
        for record in records:
            try:
                if fast and (sid := session.receive_data(record)):
                    assert sid == 1
                    got += record[HEADER_SIZE:]
                    continue
                for ev in session.receive(record):
                    if isinstance(ev, Data):
                        got += ev.data
            except ProtocolError as exc:
                return bytes(got), exc.reason
        return bytes(got), None

    for records in cases:
        plain, fast = Session(False, initial_window=window), Session(False, initial_window=window)
        assert feed(fast, records, True) == feed(plain, records, False), records
        assert fast.counters == plain.counters, records
    # It takes the fast way where it should.
    s = Session(False)
    s.receive(f(FrameType.OPEN, 1))
    assert s.receive_data(f(FrameType.DATA, 1, b"hello")) == 1
    assert s.receive_data(f(FrameType.DATA, 1, b"a") + f(FrameType.DATA, 1, b"b")) == 0


def test_full_lifecycle_with_half_close_and_cleanup() -> None:
    a, b = pair()
    sid = a.session.open_stream(b"h")
    a.session.send(sid, b"request")
    a.session.close(sid)
    pump(a, b)
    assert b.received[sid] == b"request" and sid in b.ended
    # Half-closed: a can still receive, but not send.
    assert a.session.stream_count == 1 and b.session.stream_count == 1
    with pytest.raises(StreamClosedError):
        a.session.send(sid, b"more")
    with pytest.raises(StreamClosedError):
        a.session.close(sid)
    b.session.send(sid, b"response")
    b.session.close(sid)
    pump(a, b)
    assert a.received[sid] == b"response" and sid in a.ended
    assert a.session.stream_count == 0 and b.session.stream_count == 0
    assert a.session.counters["streams_closed"] == 1 and b.session.counters["streams_closed"] == 1
    with pytest.raises(StreamClosedError):
        b.session.send(sid, b"x")


def test_fin_waits_for_queued_data_and_credit() -> None:
    """FIN follows the last byte, even when that byte waits for credit."""
    a, b = pair(initial_window=1000)
    b.auto_consume = False
    sid = a.session.open_stream()
    a.session.send(sid, b"x" * 1000)
    pump(a, b)
    a.session.send(sid, b"y" * 10)
    a.session.close(sid)
    assert a.session.next_record() is None  # no credit: neither the data nor the FIN may pass it
    b.consume(sid, 1000)
    pump(a, b)
    assert b.received[sid] == b"x" * 1000 + b"y" * 10 and sid in b.ended


def test_empty_stream_open_then_fin() -> None:
    a, b = pair()
    sid = a.session.open_stream()
    a.session.close(sid)
    record = a.session.next_record()
    assert record is not None
    assert [f.type for f in decode_record(record)] == [FrameType.OPEN, FrameType.FIN]
    assert b.feed(record) == [StreamOpened(sid, b""), StreamEnded(sid)]
    b.session.close(sid)
    pump(a, b)
    assert a.session.stream_count == 0 and b.session.stream_count == 0


def test_reset_forgets_both_ends_and_ignores_frames_in_flight() -> None:
    a, b = pair()
    sid = a.session.open_stream()
    a.session.send(sid, b"hello")
    pump(a, b)
    # b answers, and a resets before b's answer arrives: a crossing race.
    b.session.send(sid, b"reply")
    b.session.close(sid)
    in_flight = b.session.next_record()
    assert in_flight is not None
    a.session.reset(sid, ResetCode.CONNECT_FAILED)
    assert a.session.stream_count == 0
    assert a.feed(in_flight) == []
    assert a.session.counters["ignored_after_reset"] == 2  # the DATA and the FIN
    pump(a, b)
    assert b.resets == {sid: ResetCode.CONNECT_FAILED}
    assert b.session.stream_count == 0
    with pytest.raises(StreamClosedError):
        b.session.send(sid, b"late")
    b.session.reset(sid)  # idempotent: the stream is already gone
    b.session.consumed(sid, 0)  # harmless after the end
    assert b.session.next_record() is None


def test_reset_drops_queued_data() -> None:
    a, b = pair(initial_window=100)
    sid = a.session.open_stream()
    a.session.send(sid, b"z" * 100)
    b.auto_consume = False
    pump(a, b)
    a.session.send(sid, b"w" * 50)  # waits for credit
    a.session.reset(sid)
    record = a.session.next_record()
    assert record is not None
    assert [f.type for f in decode_record(record)] == [FrameType.RST]
    b.feed(record)
    assert b.resets == {sid: ResetCode.CANCEL} and bytes(b.received[sid]) == b"z" * 100


def test_reset_before_open_left_sends_nothing() -> None:
    a, _ = pair()
    sid = a.session.open_stream(b"never seen")
    a.session.send(sid, b"data")
    a.session.reset(sid)
    assert a.session.next_record() is None
    assert a.session.stream_count == 0


def test_stream_id_parity() -> None:
    a, b = pair()
    assert [a.session.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [b.session.open_stream() for _ in range(3)] == [2, 4, 6]
    # Both open at once; the crossing OPENs do not collide.
    pump(a, b)
    assert sorted(b.opened) == [1, 3, 5] and sorted(a.opened) == [2, 4, 6]
    assert a.session.stream_count == 6 and b.session.stream_count == 6


def test_ping_pong() -> None:
    a, b = pair()
    a.session.ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    pump(a, b)
    assert b.events == [Ping(b"\x00\x01\x02\x03\x04\x05\x06\x07")]
    assert a.events == [Pong(b"\x00\x01\x02\x03\x04\x05\x06\x07")]
    with pytest.raises(ValueError):
        a.session.ping(b"short")


def test_goaway_refuses_streams_that_cross_it() -> None:
    a, b = pair()
    old = b.session.open_stream()
    pump(a, b)
    a.session.go_away()
    crossing = b.session.open_stream(b"opened before goaway arrived")
    b.session.send(crossing, b"data")
    record_b = b.session.next_record()
    record_a = a.session.next_record()
    assert record_a is not None and record_b is not None
    assert b.feed(record_a) == [GoAway(GoAwayCode.NORMAL)]
    assert a.feed(record_b) == []  # refused: no StreamOpened, its DATA ignored
    assert a.session.counters["streams_refused"] == 1
    pump(a, b)
    assert b.resets == {crossing: ResetCode.REFUSED}
    with pytest.raises(MuxError):
        b.session.open_stream()
    with pytest.raises(MuxError):
        a.session.open_stream()
    # Existing streams go on.
    b.session.send(old, b"still fine")
    b.session.close(old)
    a.session.close(old)
    pump(a, b)
    assert a.received[old] == b"still fine"
    assert a.session.stream_count == 0 and b.session.stream_count == 0


# -- flow control -----------------------------------------------------------------


def test_send_buffer_is_bounded() -> None:
    a, _ = pair(initial_window=1000)
    sid = a.session.open_stream()
    assert a.session.writable(sid) == 1000
    a.session.send(sid, b"a" * 600)
    assert a.session.writable(sid) == 400
    with pytest.raises(FlowControlError):
        a.session.send(sid, b"b" * 401)
    assert a.session.writable(sid) == 400  # a refused send queues nothing
    a.session.next_record()  # the OPEN and 600 bytes leave, within credit
    assert a.session.writable(sid) == 1000
    with pytest.raises(StreamClosedError):
        a.session.writable(99)
    with pytest.raises(StreamClosedError):
        a.session.send(99, b"x")


def test_send_buffer_can_differ_from_window() -> None:
    a, _ = pair(initial_window=1000, send_buffer=10)
    sid = a.session.open_stream()
    assert a.session.writable(sid) == 10
    with pytest.raises(FlowControlError):
        a.session.send(sid, b"x" * 11)


def test_window_updates_are_batched_at_half_the_window() -> None:
    a, b = pair(initial_window=1000)
    b.auto_consume = False
    sid = a.session.open_stream()
    a.session.send(sid, b"x" * 1000)
    pump(a, b)
    a.session.send(sid, b"y" * 1000)
    assert a.session.next_record() is None  # credit spent
    for _ in range(4):
        b.consume(sid, 100)
        assert b.session.next_record() is None  # 400 < 500: not worth a frame yet
    b.consume(sid, 100)
    record = b.session.next_record()
    assert record is not None
    frames = decode_record(record)
    assert [(f.type, f.stream_id, f.payload) for f in frames] == [
        (FrameType.WINDOW_UPDATE, sid, (500).to_bytes(4, "big"))
    ]
    assert a.feed(record) == [WindowOpened(sid)]
    record = a.session.next_record()
    assert record is not None and data_stream_ids(record) == [sid]
    assert sum(len(f.payload) for f in decode_record(record)) == 500
    assert a.session.next_record() is None
    assert b.session.counters["window_updates_out"] == 1


def test_no_window_update_once_the_peer_has_finished() -> None:
    a, b = pair(initial_window=1000)
    b.auto_consume = False
    sid = a.session.open_stream()
    a.session.send(sid, b"x" * 1000)
    a.session.close(sid)
    pump(a, b)
    b.consume(sid, 1000)
    assert b.session.next_record() is None


def window_updates(record: bytes) -> list[int]:
    return [int.from_bytes(f.payload, "big") for f in decode_record(record) if f.type is FrameType.WINDOW_UPDATE]


def stream_through(a: End, b: End, sid: int, chunk: int, rounds: int) -> list[int]:
    """Send ``chunk`` bytes ``rounds`` times, delivering every record at once; b's window increments."""
    updates: list[int] = []
    for _ in range(rounds):
        a.session.send(sid, b"x" * chunk)
        while (record := a.session.next_record()) is not None:
            b.feed(record)
        while (record := b.session.next_record()) is not None:
            updates += window_updates(record)
            a.feed(record)
    return updates


def test_window_doubles_while_the_reader_keeps_up_until_max_window() -> None:
    a, b = pair(initial_window=1000, max_window=4000)
    sid = a.session.open_stream()
    updates = stream_through(a, b, sid, 250, 40)
    # Each update returns the half window consumed, plus as much again while growing.
    assert updates[:3] == [500 + 1000, 1000 + 2000, 2000]
    assert set(updates[2:]) == {2000}
    assert b.session.counters["windows_grown"] == 2
    assert b.received[sid] == b"x" * 250 * 40


def test_a_lagging_reader_keeps_its_window() -> None:
    a, b = pair(initial_window=1000, max_window=4000)
    b.auto_consume = False
    sid = a.session.open_stream()
    updates: list[int] = []
    for _ in range(10):
        a.session.send(sid, b"x" * 500)
        pump(a, b)
        b.consume(sid, b.unconsumed[sid] - 100)  # always a little left behind
        while (record := b.session.next_record()) is not None:
            updates += window_updates(record)
            a.feed(record)
    # Updates return consumed bytes only (400 + 500 first, then 500 a round): no growth.
    assert updates == [900] + [500] * 8
    assert b.session.counters["windows_grown"] == 0


def test_growth_is_bounded_by_the_session_budget_and_returned_when_a_stream_ends() -> None:
    a, b = pair(initial_window=1000, max_window=8000, growth_budget=1500)
    first, second = a.session.open_stream(), a.session.open_stream()
    assert stream_through(a, b, first, 500, 1) == [500 + 1000]  # window 2000; 500 left
    assert stream_through(a, b, second, 500, 1) == [500 + 500]  # window 1500; budget spent
    assert stream_through(a, b, first, 1000, 3) == [1000] * 3  # no more growth
    assert b.session.growth_left == 0
    a.session.reset(first)
    pump(a, b)
    assert b.session.growth_left == 1000
    assert stream_through(a, b, second, 750, 1) == [750 + 1000]  # grows again from what came back
    assert b.session.counters["windows_grown"] == 3


def test_window_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        Session(True, initial_window=1000, max_window=999)
    with pytest.raises(ValueError):
        Session(True, max_window=MAX_WINDOW + 1)
    with pytest.raises(ValueError):
        Session(True, growth_budget=-1)


def test_consuming_more_than_delivered_is_a_local_error() -> None:
    a, b = pair()
    b.auto_consume = False
    sid = a.session.open_stream()
    a.session.send(sid, b"abc")
    pump(a, b)
    with pytest.raises(MuxError):
        b.session.consumed(sid, 4)
    with pytest.raises(ValueError):
        b.session.consumed(sid, -1)


def test_slow_reader_does_not_stall_other_streams() -> None:
    """One stream's reader never consumes; another stream moves 1 MiB through the same session."""
    window = 64 * 1024
    a, b = pair(initial_window=window)
    b.auto_consume = False
    slow = a.session.open_stream(b"slow")
    fast = a.session.open_stream(b"fast")
    bulk = random.Random(7).randbytes(1024 * 1024)
    accepted_slow = 0
    fast_sent = 0
    for _ in range(10_000):
        # The slow stream's writer offers all it may, every time.
        n = a.session.writable(slow)
        a.session.send(slow, b"s" * n)
        accepted_slow += n
        if fast_sent < len(bulk):
            n = min(a.session.writable(fast), len(bulk) - fast_sent)
            a.session.send(fast, bulk[fast_sent : fast_sent + n])
            fast_sent += n
        pump(a, b)
        if b.unconsumed[fast]:
            b.consume(fast, b.unconsumed[fast])
        if len(b.received[fast]) == len(bulk):
            break
    assert bytes(b.received[fast]) == bulk
    # The receiver holds at most one window of the slow stream, the sender at
    # most its send buffer: nobody buffers without bound.
    assert len(b.received[slow]) == window
    assert accepted_slow == window + a.session.send_buffer
    assert a.session.writable(slow) == 0
    assert b.session.counters["data_bytes_in"] == len(bulk) + window


# -- scheduling and packing -------------------------------------------------------


def test_round_robin_alternates_between_bulk_streams() -> None:
    a, b = pair(initial_window=1024 * 1024)
    s1 = a.session.open_stream()
    s2 = a.session.open_stream()
    pump(a, b)  # the OPENs, so the data records below hold data only
    chunk = DEFAULT_MAX_RECORD - HEADER_SIZE
    a.session.send(s1, b"1" * chunk * 6)
    a.session.send(s2, b"2" * chunk * 6)
    order = []
    while (record := a.session.next_record()) is not None:
        assert len(record) <= DEFAULT_MAX_RECORD
        order.append(data_stream_ids(record))
        b.feed(record)
    assert order == [[s1], [s2]] * 6
    assert b.received[s1] == b"1" * chunk * 6 and b.received[s2] == b"2" * chunk * 6


def test_a_small_stream_is_not_stuck_behind_a_bulk_one() -> None:
    a, b = pair(initial_window=1024 * 1024)
    bulk = a.session.open_stream()
    small = a.session.open_stream()
    pump(a, b)
    a.session.send(bulk, b"B" * 500_000)
    first = a.session.next_record()
    a.session.send(small, b"tiny request")
    second = a.session.next_record()
    third = a.session.next_record()
    assert first is not None and second is not None and third is not None
    # The bulk stream had already queued its next turn; the small one gets the
    # very next one, not a place behind the remaining 480 KB.
    assert data_stream_ids(first) == [bulk] and data_stream_ids(second) == [bulk]
    assert data_stream_ids(third)[0] == small


def test_small_frames_share_one_record() -> None:
    a, b = pair()
    sids = [a.session.open_stream(f"svc{i}".encode()) for i in range(10)]
    for sid in sids:
        a.session.send(sid, b"0123456789")
    record = a.session.next_record()
    assert record is not None
    assert a.session.next_record() is None
    assert len(decode_record(record)) == 20
    events = b.feed(record)
    assert len(events) == 20
    assert a.session.counters["records_out"] == 1 and a.session.counters["frames_out"] == 20
    assert all(b.received[sid] == b"0123456789" for sid in sids)


def test_records_respect_max_record() -> None:
    a, b = pair(max_record=MIN_RECORD, initial_window=1 << 20)
    sids = [a.session.open_stream(b"h" * MAX_OPEN_HEADER) for _ in range(5)]
    for i, sid in enumerate(sids):
        a.session.send(sid, bytes([i]) * 5000)
        a.session.close(sid)
    while (record := a.session.next_record()) is not None:
        assert len(record) <= MIN_RECORD
        b.feed(record)
    for i, sid in enumerate(sids):
        assert b.received[sid] == bytes([i]) * 5000 and sid in b.ended


# -- randomised end-to-end --------------------------------------------------------

stream_spec = st.tuples(
    st.sampled_from("ab"),  # opener
    st.integers(0, 20_000),  # bytes opener -> acceptor
    st.integers(0, 20_000),  # bytes acceptor -> opener
    st.sampled_from([None, None, None, "a", "b"]),  # which end resets it at a random moment, if any
)


@settings(SETTINGS, max_examples=100)
@given(
    specs=st.lists(stream_spec, min_size=1, max_size=8),
    window=st.sampled_from([300, 1024, 4096, 65536]),
    max_record=st.sampled_from([MIN_RECORD, 3000, DEFAULT_MAX_RECORD]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_interleaving_is_byte_exact(
    specs: list[tuple[str, int, int, str | None]], window: int, max_record: int, seed: int
) -> None:
    rng = random.Random(seed)
    ends = {"a": End(Session(True, initial_window=window, max_record=max_record), auto_consume=False),
            "b": End(Session(False, initial_window=window, max_record=max_record), auto_consume=False)}
    other = {"a": "b", "b": "a"}
    payload: dict[tuple[int, str], bytes] = {}  # (spec index, sending end)
    for i, (opener, out, back, _) in enumerate(specs):
        payload[i, opener] = rng.randbytes(out)
        payload[i, other[opener]] = rng.randbytes(back)
    sid_of: dict[int, int] = {}
    sent: dict[tuple[int, str], int] = defaultdict(int)
    closed: set[tuple[int, str]] = set()
    reset_done: set[int] = set()
    wires: dict[str, list[bytes]] = {"a": [], "b": []}  # records in flight *to* this end

    def knows(i: int, end: str) -> bool:
        if i not in sid_of:
            return False
        sid = sid_of[i]
        return ends[end].session.is_open(sid) and (specs[i][0] == end or sid in ends[end].opened)

    # An action is (kind, spec index or stream id, end); one is picked at random per step.
    Action = tuple[str, int, str]

    def enabled() -> list[Action]:
        actions: list[Action] = []
        for i, (opener, _, _, reset_by) in enumerate(specs):
            if i not in sid_of:
                actions.append(("open", i, opener))
                continue
            for e in "ab":
                if not knows(i, e):
                    continue
                if sent[i, e] < len(payload[i, e]):
                    if ends[e].session.writable(sid_of[i]) > 0:
                        actions.append(("write", i, e))
                elif (i, e) not in closed:
                    actions.append(("close", i, e))
                if reset_by == e and i not in reset_done:
                    actions.append(("reset", i, e))
        for e in "ab":
            for sid, n in ends[e].unconsumed.items():
                if n > 0 and ends[e].session.is_open(sid):
                    actions.append(("consume", sid, e))
            if wires[e]:
                actions.append(("deliver", 0, e))
        return actions

    def perform(kind: str, key: int, e: str) -> None:
        end = ends[e]
        if kind == "open":
            sid_of[key] = end.session.open_stream(b"%d" % key)
        elif kind == "write":
            sid, data = sid_of[key], payload[key, e]
            n = min(end.session.writable(sid), len(data) - sent[key, e], rng.randint(1, 30_000))
            end.session.send(sid, data[sent[key, e] : sent[key, e] + n])
            sent[key, e] += n
        elif kind == "close":
            end.session.close(sid_of[key])
            closed.add((key, e))
        elif kind == "reset":
            end.session.reset(sid_of[key])
            reset_done.add(key)
        elif kind == "consume":
            end.consume(key, rng.randint(1, end.unconsumed[key]))
        else:
            end.feed(wires[e].pop(0))

    for _ in range(200_000):
        actions = enabled()
        if actions:
            perform(*rng.choice(actions))
        # Producing a record is always possible; do it about as often as the rest,
        # so several records can be in flight each way and frames cross.
        produced = False
        for e in "ab":
            if rng.random() < 0.5 or not actions:
                record = ends[e].session.next_record()
                if record is not None:
                    assert len(record) <= max_record
                    wires[other[e]].append(record)
                    produced = True
        if not actions and not produced:
            break
    else:
        raise AssertionError("did not settle")

    for i, (_, _, _, reset_by) in enumerate(specs):
        sid = sid_of[i]
        for e in "ab":
            got = bytes(ends[other[e]].received.get(sid, b""))
            if reset_by is None:
                assert got == payload[i, e], f"stream {i} {e}->{other[e]}"
                assert sid in ends[other[e]].ended
            else:
                assert payload[i, e].startswith(got)
    for e in "ab":
        s = ends[e].session
        assert s.stream_count == 0
        assert s.failed is None


# -- protocol violations ----------------------------------------------------------


def f(ftype: FrameType | int, sid: int, payload: bytes = b"") -> bytes:
    """A raw frame, including ones encode_frame would not make (unknown types)."""
    n = len(payload)
    return bytes([ftype]) + sid.to_bytes(4, "big") + n.to_bytes(3, "big") + payload


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


OPEN1 = f(FrameType.OPEN, 1)
VIOLATIONS: dict[str, tuple[str, list[bytes]]] = {
    # Records from an initiator peer to a fresh responder (initial_window=100, max_streams=2).
    "unknown frame type": ("unknown_frame_type", [f(99, 1)]),
    "truncated header": ("truncated", [b"\x00\x00\x00"]),
    "length beyond record": ("truncated", [OPEN1 + f(FrameType.DATA, 1, b"abcdef")[:-2]]),
    "window update of 3 bytes": ("bad_length", [OPEN1 + f(FrameType.WINDOW_UPDATE, 1, b"\x00\x00\x01")]),
    "rst of 2 bytes": ("bad_length", [OPEN1 + f(FrameType.RST, 1, b"\x00\x01")]),
    "fin with payload": ("bad_length", [OPEN1 + f(FrameType.FIN, 1, b"x")]),
    "ping of 7 bytes": ("bad_length", [f(FrameType.PING, 0, b"1234567")]),
    "goaway of 5 bytes": ("bad_length", [f(FrameType.GOAWAY, 0, b"12345")]),
    "empty data": ("bad_length", [OPEN1 + f(FrameType.DATA, 1)]),
    "oversized open header": ("bad_length", [f(FrameType.OPEN, 1, b"h" * (MAX_OPEN_HEADER + 1))]),
    "data beyond the window": (
        "flow_control", [OPEN1 + f(FrameType.DATA, 1, b"x" * 60), f(FrameType.DATA, 1, b"x" * 41)]
    ),
    "window overflow": ("flow_control", [OPEN1 + f(FrameType.WINDOW_UPDATE, 1, u32(MAX_WINDOW - 99))]),
    "zero increment": ("zero_window_increment", [OPEN1 + f(FrameType.WINDOW_UPDATE, 1, u32(0))]),
    "data after fin": ("stream_closed", [OPEN1 + f(FrameType.FIN, 1), f(FrameType.DATA, 1, b"x")]),
    "second fin": ("stream_closed", [OPEN1 + f(FrameType.FIN, 1) + f(FrameType.FIN, 1)]),
    "data after peer reset": ("stream_closed", [OPEN1 + f(FrameType.RST, 1, u32(0)), f(FrameType.DATA, 1, b"x")]),
    "data on never-opened stream": ("idle_stream", [OPEN1 + f(FrameType.DATA, 3, b"x")]),
    "fin on never-opened stream": ("idle_stream", [f(FrameType.FIN, 7)]),
    "window update on our never-opened stream": ("idle_stream", [f(FrameType.WINDOW_UPDATE, 2, u32(1))]),
    "too many streams": ("too_many_streams", [OPEN1 + f(FrameType.OPEN, 3) + f(FrameType.OPEN, 5)]),
    "open with our parity": ("bad_stream_id", [f(FrameType.OPEN, 2)]),
    "open on stream 0": ("bad_stream_id", [f(FrameType.OPEN, 0)]),
    "reused stream id": ("bad_stream_id", [f(FrameType.OPEN, 3) + f(FrameType.OPEN, 1)]),
    "reopened closed stream": ("bad_stream_id", [OPEN1 + f(FrameType.RST, 1, u32(0)), OPEN1]),
    "ping on a stream": ("bad_stream_id", [f(FrameType.PING, 1, b"12345678")]),
    "data on stream 0": ("bad_stream_id", [f(FrameType.DATA, 0, b"x")]),
    "ping flood": ("control_flood", [f(FrameType.PING, 0, b"12345678") * 300]),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_protocol_violations(case: str) -> None:
    reason, records = VIOLATIONS[case]
    s = Session(False, initial_window=100, max_streams=2)
    with pytest.raises(ProtocolError) as info:
        for record in records:
            s.receive(record)
    assert info.value.reason == reason
    # The session is dead, with a last GOAWAY worth sending before closing.
    assert s.failed == reason and s.stream_count == 0
    last = s.next_record()
    assert last is not None
    assert decode_record(last) == [(FrameType.GOAWAY, 0, u32(GoAwayCode.PROTOCOL_ERROR))]
    assert s.next_record() is None
    with pytest.raises(MuxError):
        s.receive(f(FrameType.PING, 0, b"12345678"))
    with pytest.raises(MuxError):
        s.open_stream()


def test_frame_on_our_stream_before_its_open_left() -> None:
    s = Session(False)
    sid = s.open_stream()
    with pytest.raises(ProtocolError) as info:
        s.receive(f(FrameType.WINDOW_UPDATE, sid, u32(10)))
    assert info.value.reason == "idle_stream"


def test_data_on_a_normally_closed_stream_is_a_violation() -> None:
    a, b = pair()
    sid = a.session.open_stream()
    a.session.close(sid)
    b_sid = sid
    pump(a, b)
    b.session.close(b_sid)
    pump(a, b)
    assert b.session.stream_count == 0
    with pytest.raises(ProtocolError) as info:
        b.session.receive(f(FrameType.DATA, sid, b"late"))
    assert info.value.reason == "stream_closed"


def test_window_update_and_reset_after_a_normal_close_are_benign() -> None:
    a, b = pair()
    sid = a.session.open_stream()
    a.session.close(sid)
    pump(a, b)
    b.session.close(sid)
    pump(a, b)
    assert a.session.receive(f(FrameType.WINDOW_UPDATE, sid, u32(5)) + f(FrameType.RST, sid, u32(4))) == []
    assert a.session.counters["ignored_after_close"] == 2
    assert a.session.failed is None


def test_empty_record_is_harmless() -> None:
    assert Session(True).receive(b"") == []


@SETTINGS
@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_protocol_error(record: bytes) -> None:
    s = Session(False, max_streams=4)
    try:
        s.receive(record)
    except ProtocolError:
        assert s.failed is not None


@SETTINGS
@given(st.data())
def test_corrupted_valid_records_only_ever_raise_protocol_error(data: st.DataObject) -> None:
    a, _ = pair(initial_window=500)
    for i in range(3):
        sid = a.session.open_stream(b"hdr%d" % i)
        a.session.send(sid, b"payload" * 10)
        if i == 1:
            a.session.close(sid)
    a.session.ping(b"pingpong")
    record = a.session.next_record()
    assert record is not None
    corrupted = bytearray(record)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupted[data.draw(st.integers(0, len(corrupted) - 1))] = data.draw(st.integers(0, 255))
    s = Session(False, initial_window=500, max_streams=4)
    try:
        s.receive(bytes(corrupted))
    except ProtocolError:
        pass


# -- local misuse and state hygiene -------------------------------------------------


def test_local_stream_limit() -> None:
    a, b = pair(max_streams=3)
    sids = [a.session.open_stream() for _ in range(3)]
    with pytest.raises(TooManyStreamsError):
        a.session.open_stream()
    a.session.reset(sids[0])
    sid = a.session.open_stream()  # a slot was freed
    pump(a, b)
    assert sorted(b.opened) == [sids[1], sids[2], sid]  # the reset one never left
    assert b.session.failed is None


def test_parameter_validation() -> None:
    with pytest.raises(ValueError):
        Session(True, initial_window=0)
    with pytest.raises(ValueError):
        Session(True, initial_window=MAX_WINDOW + 1)
    with pytest.raises(ValueError):
        Session(True, max_record=MIN_RECORD - 1)
    with pytest.raises(ValueError):
        Session(True, max_streams=0)
    with pytest.raises(ValueError):
        Session(True).open_stream(b"x" * (MAX_OPEN_HEADER + 1))
    with pytest.raises(ValueError):
        encode_frame(FrameType.DATA, 1, bytes(1 << 24))


def test_many_lifecycles_leave_no_state() -> None:
    a, b = pair(initial_window=4096, max_streams=16)
    rng = random.Random(3)
    for round_ in range(40):
        sids = [a.session.open_stream() for _ in range(8)] + [b.session.open_stream() for _ in range(8)]
        pump(a, b)
        for k, sid in enumerate(sids):
            for end in (a, b):
                end.session.send(sid, rng.randbytes(rng.randint(0, 3000)))
            if k % 4 == 0:
                (a if round_ % 2 else b).session.reset(sid)
            else:
                a.session.close(sid)
                b.session.close(sid)
        pump(a, b)
        assert a.session.stream_count == 0 and b.session.stream_count == 0
    for end in (a, b):
        s = end.session
        assert s.failed is None
        assert not s._ready and not s._control
        assert len(s._recently_reset) <= s._recently_reset_limit
        assert s.counters["streams_closed"] + s.counters["streams_reset_local"] + s.counters[
            "streams_reset_remote"] == 40 * 16


def test_a_stream_deferred_for_lack_of_room_keeps_its_turn() -> None:
    """A chunk that would only fit as a sliver waits, but goes first in the next record."""
    a, b = pair(initial_window=1024 * 1024)
    s1, s2, s3 = (a.session.open_stream() for _ in range(3))
    pump(a, b)
    chunk = DEFAULT_MAX_RECORD - HEADER_SIZE
    a.session.send(s1, b"1" * (chunk - 100))  # leaves 100 bytes of room: too little for s2
    a.session.send(s2, b"2" * chunk * 2)
    a.session.send(s3, b"3" * chunk * 2)
    order = []
    while (record := a.session.next_record()) is not None:
        order.append(data_stream_ids(record))
        b.feed(record)
    assert order == [[s1], [s2], [s3], [s2], [s3]]
