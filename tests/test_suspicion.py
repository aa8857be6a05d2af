"""gossip.suspicion: Lifeguard's dynamic suspicion timeout (memberlist suspicion.go)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.config import LAN, LOCAL, WAN, GossipConfig
from gossip.suspicion import Suspicion, Suspicions

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=200)


def memberlist_timeout(n: int, k: int, lo: float, hi: float) -> float:
    """memberlist remainingSuspicionTime, without the elapsed part."""
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = hi - frac * (hi - lo)
    return max(lo, math.floor(raw * 1000.0) / 1000.0)


@pytest.mark.parametrize("config", [LAN, LOCAL, WAN], ids=["lan", "local", "wan"])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 50, 1000])
def test_min_and_max_follow_memberlist(config: GossipConfig, n: int) -> None:
    scale = max(1.0, math.log10(max(1, n)))
    assert config.suspicion_min(n) == pytest.approx(config.suspicion_mult * scale * config.probe_interval)
    assert config.suspicion_max(n) == pytest.approx(config.suspicion_max_timeout_mult
                                                    * config.suspicion_min(n))


def test_lan_figures() -> None:
    # DefaultLANConfig: SuspicionMult 4, SuspicionMaxTimeoutMult 6, ProbeInterval 1s.
    assert LAN.suspicion_min(10) == 4.0 and LAN.suspicion_max(10) == 24.0
    assert LAN.suspicion_min(100) == 8.0 and LAN.suspicion_max(100) == 48.0


def test_starts_at_max() -> None:
    lo, hi = LAN.suspicion_min(10), LAN.suspicion_max(10)
    s = Suspicion(100.0, "a", 2, lo, hi)
    assert s.confirmations == 0
    assert s.deadline == 100.0 + hi
    assert not s.expired(100.0 + hi - 0.001)
    assert s.expired(100.0 + hi)


def test_confirmations_shorten_to_min_and_no_further() -> None:
    lo, hi = LAN.suspicion_min(10), LAN.suspicion_max(10)
    s = Suspicion(100.0, "a", 2, lo, hi)
    assert s.confirm("b")
    assert s.confirmations == 1
    assert s.deadline == pytest.approx(100.0 + memberlist_timeout(1, 2, lo, hi))
    assert lo < s.deadline - 100.0 < hi
    assert s.confirm("c")
    assert s.deadline == pytest.approx(100.0 + lo)
    # k confirmations reached: more are not counted.
    assert not s.confirm("d")
    assert s.confirmations == 2
    assert s.deadline == pytest.approx(100.0 + lo)


def test_duplicate_and_self_confirmations_are_ignored() -> None:
    s = Suspicion(0.0, "a", 3, 2.0, 12.0)
    assert not s.confirm("a")  # the accuser does not confirm itself
    assert s.confirm("b")
    deadline = s.deadline
    assert not s.confirm("b")
    assert s.confirmations == 1 and s.deadline == deadline


@pytest.mark.parametrize("k", [0, -1])
def test_no_expected_confirmations_means_min_at_once(k: int) -> None:
    s = Suspicion(5.0, "a", k, 2.0, 12.0)
    assert s.deadline == 7.0
    assert s.remaining_timeout() == 2.0
    assert not s.confirm("b")
    assert s.deadline == 7.0


def test_deadline_is_measured_from_the_start() -> None:
    # A late confirmation may move the deadline into the past: expired at once.
    s = Suspicion(0.0, "a", 1, 2.0, 12.0)
    assert s.confirm("b")
    assert s.deadline == 2.0
    assert s.expired(2.0)


@SETTINGS
@given(
    k=st.integers(min_value=1, max_value=8),
    lo=st.floats(min_value=0.1, max_value=100.0),
    mult=st.integers(min_value=1, max_value=10),
    confirmers=st.lists(st.sampled_from("abcdefghijkl"), max_size=20),
)
def test_timeout_falls_monotonically_between_max_and_min(
    k: int, lo: float, mult: int, confirmers: list[str]
) -> None:
    hi = lo * mult
    s = Suspicion(10.0, "a", k, lo, hi)
    seen = {"a"}
    previous = s.deadline
    assert previous == 10.0 + hi
    for c in confirmers:
        new = s.confirm(c)
        assert new == (c not in seen and len(seen) - 1 < k)
        if new:
            seen.add(c)
        n = len(seen) - 1
        assert s.confirmations == n
        assert s.deadline <= previous
        assert 10.0 + lo - 1e-9 <= s.deadline <= 10.0 + hi
        if n:
            assert s.deadline == pytest.approx(10.0 + memberlist_timeout(n, k, lo, hi))
        previous = s.deadline
    if len(seen) - 1 == k:
        assert s.deadline == pytest.approx(10.0 + lo)


# -- Suspicions: every live suspicion, the earliest deadline at hand ----------------------------


def test_suspicions_expire_in_deadline_order_and_skip_ended_ones() -> None:
    sus = Suspicions()
    sus.start("a", Suspicion(0.0, "x", 0, 3.0, 9.0))
    sus.start("b", Suspicion(0.0, "x", 0, 1.0, 9.0))
    sus.start("c", Suspicion(0.0, "x", 0, 2.0, 9.0))
    assert sus.next_deadline() == 1.0
    sus.discard("b")  # refuted: its heap entry is stale, never reported
    assert "b" not in sus and sus.next_deadline() == 2.0
    assert list(sus.expire(2.5)) == ["c"]
    assert list(sus.expire(2.9)) == []
    assert list(sus.expire(3.0)) == ["a"]
    assert len(sus) == 0 and sus.next_deadline() == math.inf


def test_a_confirmation_moves_the_deadline_earlier_and_the_old_entry_goes_stale() -> None:
    sus = Suspicions()
    sus.start("a", Suspicion(0.0, "x", 3, 2.0, 12.0))
    assert sus.next_deadline() == 12.0
    assert sus.confirm("a", "y") and not sus.confirm("a", "y")  # a repeat is no confirmation
    moved = sus["a"].deadline
    assert 2.0 < moved < 12.0 and sus.next_deadline() == moved
    assert list(sus.expire(moved)) == ["a"]
    assert list(sus.expire(12.0)) == []  # the old deadline's entry is not a second expiry


def test_a_suspicion_started_again_counts_only_its_new_deadline() -> None:
    sus = Suspicions()
    sus.start("a", Suspicion(0.0, "x", 0, 1.0, 9.0))
    sus.discard("a")
    sus.start("a", Suspicion(5.0, "x", 0, 1.0, 9.0))
    assert list(sus.expire(1.0)) == []
    assert sus.next_deadline() == 6.0 and list(sus.expire(6.0)) == ["a"]
