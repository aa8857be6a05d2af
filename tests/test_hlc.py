"""The hybrid logical clock: monotonic, causal, close to wall time, wary of clocks far ahead."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gossip import hlc
from gossip.hlc import MAX_DRIFT_MS, ClockDriftError, HybridClock


def test_follows_the_wall_clock_when_it_moves_on() -> None:
    c = HybridClock()
    t1 = c.now(1_000)
    assert hlc.wall_ms(t1) == 1_000 and t1 == hlc.make(1_000)
    t2 = c.now(2_000)
    assert t2 == hlc.make(2_000)


def test_counts_within_one_millisecond_and_when_the_wall_clock_goes_back() -> None:
    c = HybridClock()
    a, b = c.now(5_000), c.now(5_000)
    assert b == a + 1 and hlc.wall_ms(b) == 5_000
    back = c.now(4_000)  # the wall clock was set back: versions still grow
    assert back > b and hlc.wall_ms(back) == 5_000


def test_a_write_after_seeing_another_orders_after_it_even_with_a_slow_clock() -> None:
    fast, slow = HybridClock(), HybridClock()
    seen = fast.now(10_000)
    slow.observe(seen, wall=9_000)  # this node's clock is a second behind
    assert slow.now(9_000) > seen


def test_a_timestamp_far_ahead_is_refused_and_changes_nothing() -> None:
    c = HybridClock()
    mine = c.now(1_000)
    with pytest.raises(ClockDriftError, match="ahead of this node's clock"):
        c.observe(hlc.make(1_000 + MAX_DRIFT_MS + 1), wall=1_000)
    assert c.last == mine
    c.observe(hlc.make(1_000 + MAX_DRIFT_MS), wall=1_000)  # at the bound: believed
    assert c.last == hlc.make(1_000 + MAX_DRIFT_MS)


def test_counter_overflow_carries_into_the_milliseconds() -> None:
    c = HybridClock(hlc.make(7, hlc.COUNTER_SPAN - 1))
    assert c.now(7) == hlc.make(8, 0)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10**6), st.integers(0, 10**6)), max_size=60))
def test_every_timestamp_issued_is_later_than_all_before(events: list[tuple[bool, int, int]]) -> None:
    c = HybridClock()
    issued: list[int] = []
    for local, wall, remote_wall in events:
        if local:
            issued.append(c.now(wall))
            assert hlc.wall_ms(issued[-1]) >= wall
        else:
            try:
                c.observe(hlc.make(remote_wall), wall)
            except ClockDriftError:
                continue
    assert issued == sorted(set(issued))


def test_versions_stay_exact_in_a_double_for_centuries() -> None:
    # A browser or jq reads JSON numbers as doubles: a version must survive that, or a
    # check-and-set copied from `config read` would never match.
    year_2255_ms = 9_000_000_000_000
    ts = hlc.make(year_2255_ms, hlc.COUNTER_SPAN - 1)
    assert ts < 2**53 and int(float(ts)) == ts
