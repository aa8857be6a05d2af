"""The HTTP layer's pure parts: the retry budget, hop-by-hop rules, the far end's observer, the pool,
the service-router's matching, and the clock the reactor's turns read."""

from __future__ import annotations

import random
from time import perf_counter
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from dataplane.discovery_chain import DiscoveryChain, Target
from dataplane.hop_by_hop import request_headers, response_headers, wants_upgrade
from dataplane.http_observer import ExchangeObserver
from dataplane.http_pool import InstanceConn, Pool
from dataplane.http_turns import clock_offset
from dataplane.retry_budget import BudgetConfig, RetryBudget

# -- retry budget ---------------------------------------------------------------------------


def test_the_budget_allows_its_floor_then_a_share_of_requests() -> None:
    b = RetryBudget(BudgetConfig(ratio=0.2, min_per_second=1, ttl=10))
    assert sum(b.try_retry(0.5) for _ in range(50)) == 10  # the floor: 1/s over 10 s
    for _ in range(100):
        b.request(1.0)
    assert sum(b.try_retry(1.5) for _ in range(50)) == 20  # 20% of 100 requests
    assert b.exhausted == 70


def test_the_budget_forgets_what_left_its_window() -> None:
    b = RetryBudget(BudgetConfig(ratio=0.0, min_per_second=1, ttl=10))
    assert sum(b.try_retry(0.0) for _ in range(20)) == 10
    assert not b.try_retry(9.9)
    assert b.try_retry(10.5)  # second 0's retries have left the 10 s window


@given(st.lists(st.tuples(st.floats(0, 100), st.booleans()), max_size=300))
def test_retries_never_exceed_the_ratio_plus_floor_in_any_window(events: list[tuple[float, bool]]) -> None:
    cfg = BudgetConfig(ratio=0.2, min_per_second=2, ttl=5)
    b = RetryBudget(cfg)
    log: list[tuple[int, str]] = []
    for t, is_request in sorted(events):
        if is_request:
            b.request(t)
            log.append((int(t), "req"))
        elif b.try_retry(t):
            log.append((int(t), "retry"))
    for end in {s for s, _ in log}:
        window = [k for s, k in log if end - 5 < s <= end]
        assert window.count("retry") <= 0.2 * window.count("req") + 2 * 5


# -- hop-by-hop ----------------------------------------------------------------------------


def test_connection_and_the_fields_it_names_are_not_passed_on() -> None:
    got = request_headers([(b"host", b"web"), (b"connection", b"keep-alive, x-secret"), (b"x-secret", b"1"),
                           (b"keep-alive", b"timeout=5"), (b"te", b"trailers"), (b"traceparent", b"00-ab"),
                           (b"proxy-connection", b"keep-alive")], "10.1.2.3", b"rid")
    names = [n for n, _ in got]
    assert names == [b"host", b"traceparent", b"x-request-id", b"x-forwarded-for", b"forwarded"]
    assert dict(got)[b"x-forwarded-for"] == b"10.1.2.3"
    assert dict(got)[b"forwarded"] == b"for=10.1.2.3;proto=http"


def test_chunked_framing_is_asked_for_again_and_beats_content_length() -> None:
    got = response_headers([(b"transfer-encoding", b"chunked"), (b"content-length", b"5"), (b"x", b"y")])
    assert got == [(b"x", b"y"), (b"transfer-encoding", b"chunked")]
    assert response_headers([(b"content-length", b"5")]) == [(b"content-length", b"5")]


def test_forwarded_quotes_an_ipv6_client_and_xff_is_appended() -> None:
    got = dict(request_headers([(b"x-forwarded-for", b"1.1.1.1"), (b"x-request-id", b"mine")], "::1"))
    assert got[b"forwarded"] == b'for="[::1]";proto=http'
    assert got[b"x-forwarded-for"] == b"1.1.1.1, ::1" and got[b"x-request-id"] == b"mine"


def test_an_upgrade_needs_both_fields() -> None:
    assert wants_upgrade([(b"connection", b"Upgrade"), (b"upgrade", b"websocket")])
    assert not wants_upgrade([(b"upgrade", b"websocket")])
    assert not wants_upgrade([(b"connection", b"upgrade")])


# -- the observer ----------------------------------------------------------------------------


def _observe(requests: list[bytes], responses: list[bytes]) -> list[tuple[Any, ...]]:
    done: list[tuple[Any, ...]] = []

    async def run() -> None:
        obs = ExchangeObserver(lambda *a: done.append(a[:3]))
        for chunk in requests:
            obs.requests(chunk)
        for chunk in responses:
            obs.responses(chunk)

    trio.run(run)
    return done


def test_pipelined_requests_are_matched_to_their_responses_in_order() -> None:
    reqs = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    resps = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
             b"HTTP/1.1 100 Continue\r\n\r\n"
             b"HTTP/1.1 503 Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    # Byte by byte: the observer must not care how the stream is cut.
    assert _observe([reqs[i:i + 1] for i in range(len(reqs))], [resps[i:i + 1] for i in range(len(resps))]) == [
        ("GET", "/a", 200), ("POST", "/b", 503)]


def test_a_head_response_is_counted_at_its_head_and_watching_stops() -> None:
    got = _observe([b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /g HTTP/1.1\r\nHost: x\r\n\r\n"],
                   [b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert got == [("HEAD", "/h", 200)]


def test_garbage_ends_the_watching_not_the_caller() -> None:
    assert _observe([b"\x16\x03\x01 not http at all\r\n\r\n"], [b"HTTP/1.1 200 OK\r\n\r\n"]) == []


# -- the pool ----------------------------------------------------------------------------------


class _Conn:
    def __init__(self, rest: bool = True) -> None:
        self.rest = rest
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return b""

    def at_rest(self) -> bool:
        return self.rest

    def close_now(self) -> None:
        self.closed = True


def _done_conn(key: tuple[str, str], stream: _Conn) -> InstanceConn:
    ic = InstanceConn(key, stream, local=True)
    h = ic.framer()
    h.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    h.send(h11.EndOfMessage())
    h.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    while h.next_event() is not h11.NEED_DATA and h.their_state is not h11.DONE:
        pass
    return ic


def test_the_pool_hands_back_the_most_recent_connection_and_drops_stale_ones() -> None:
    pool = Pool(idle_timeout=4.0)
    key = ("n", "i")
    old, new, stale = _Conn(), _Conn(), _Conn()
    pool.give(_done_conn(key, old), 0.0)
    pool.give(_done_conn(key, stale), 1.0)
    pool.give(_done_conn(key, new), 2.0)
    stale.rest = False
    got = pool.take(key, 3.0)
    assert got is not None and got.stream is new
    got = pool.take(key, 3.0)
    assert got is not None and got.stream is old and stale.closed and pool.stale == 1
    assert pool.take(key, 3.0) is None


def test_the_pool_keeps_only_cleanly_ended_exchanges_and_expires_idle_ones() -> None:
    pool = Pool(idle_timeout=4.0)
    half = InstanceConn(("n", "i"), _Conn(), local=True)
    half.framer().send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    pool.give(half, 0.0)
    assert half.stream.closed and pool.idle_count() == 0  # type: ignore[attr-defined]
    kept = _Conn()
    pool.give(_done_conn(("n", "i"), kept), 0.0)
    assert pool.take(("n", "i"), 10.0) is None and kept.closed and pool.expired == 1


# -- the service-router's matching --------------------------------------------------------------


def _chain() -> DiscoveryChain:
    router = {"routes": [
        {"match": {"path_prefix": "/api", "methods": ["POST"]}, "destination": {"subset": "v2"}},
        {"match": {"header": {"name": "x-canary", "present": True}}, "destination": {"service": "web-canary"}},
        {"match": {"header": {"name": "x-user", "exact": "ann"}}, "destination": {"subset": "v2"}},
    ]}
    resolvers = {"web": {"subsets": {"v1": {"tags": ["v1"]}, "v2": {"tags": ["v2"]}}, "default_subset": "v1"}}
    return DiscoveryChain("web", None, resolvers, router)


@pytest.mark.parametrize(("method", "target", "headers", "expected"), [
    (b"POST", b"/api/users?x=1", [], Target("web", "v2")),
    (b"GET", b"/api/users", [], None),
    (b"POST", b"/apis", [], Target("web", "v2")),  # a prefix of the path, as Consul's path_prefix
    (b"POST", b"/v1/api", [], None),
    (b"GET", b"/", [(b"x-canary", b"")], Target("web-canary", None)),
    (b"GET", b"/", [(b"x-user", b"bob"), (b"x-user", b"ann")], Target("web", "v2")),
    (b"GET", b"/", [(b"x-user", b"bob")], None),
])
def test_the_first_matching_route_names_the_target(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                                                    expected: Target | None) -> None:
    assert _chain().route(method, target, headers) == expected


def test_a_request_no_route_matches_is_split() -> None:
    chain = _chain()
    assert chain.route(b"GET", b"/", []) is None
    assert chain.choose(random.Random(1)) == Target("web", "v1")  # the resolver's default subset


def test_a_sweep_closes_only_what_idled_too_long() -> None:
    pool = Pool(idle_timeout=4.0)
    old, recent, other = _Conn(), _Conn(), _Conn()
    pool.give(_done_conn(("n", "i"), old), 0.0)
    pool.give(_done_conn(("n", "i"), recent), 3.0)
    pool.give(_done_conn(("n", "j"), other), 0.5)
    pool.sweep(5.0)
    assert old.closed and other.closed and not recent.closed
    assert pool.expired == 2 and pool.idle_count() == 1
    got = pool.take(("n", "i"), 5.0)
    assert got is not None and got.stream is recent


# -- the turns' clock ------------------------------------------------------------------------


async def test_the_turns_read_trios_own_clock_without_calling_it() -> None:
    offset = clock_offset(trio.lowlevel.current_clock())
    assert offset is not None
    for _ in range(100):
        before = trio.current_time()
        read = offset + perf_counter()
        assert before <= read <= trio.current_time()


def test_any_other_clock_is_called() -> None:
    assert clock_offset(trio.testing.MockClock()) is None
