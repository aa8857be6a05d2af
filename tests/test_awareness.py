"""gossip.awareness: Lifeguard's saturating local health score."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.awareness import Awareness
from gossip.config import LAN, LOCAL

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=200)


def test_starts_healthy() -> None:
    a = Awareness(8)
    assert a.score == 0
    assert a.scale(0.5) == 0.5


def test_saturates_at_zero_and_max_minus_one() -> None:
    a = Awareness(8)
    a.apply_delta(-3)
    assert a.score == 0
    a.apply_delta(5)
    assert a.score == 5
    a.apply_delta(100)
    assert a.score == 7
    assert a.scale(1.0) == 8.0  # the multiplier never exceeds max_multiplier
    a.apply_delta(-1)
    assert a.score == 6
    a.apply_delta(-100)
    assert a.score == 0


@pytest.mark.parametrize("m", [0, 1, -5])
def test_a_max_of_one_or_less_disables_scaling(m: int) -> None:
    a = Awareness(m)
    a.apply_delta(10)
    assert a.score == 0
    assert a.scale(2.0) == 2.0


@pytest.mark.parametrize("config", [LAN, LOCAL])
def test_profiles_allow_an_8x_stretch(config: object) -> None:
    a = Awareness(config.awareness_max_multiplier)  # type: ignore[attr-defined]
    a.apply_delta(1000)
    assert a.scale(config.probe_interval) == 8 * config.probe_interval  # type: ignore[attr-defined]


@SETTINGS
@given(st.integers(min_value=1, max_value=20), st.lists(st.integers(min_value=-10, max_value=10)))
def test_score_is_a_clamped_running_sum(max_multiplier: int, deltas: list[int]) -> None:
    a = Awareness(max_multiplier)
    model = 0
    for d in deltas:
        a.apply_delta(d)
        model = min(max_multiplier - 1, max(0, model + d))
        assert a.score == model
        assert 0 <= a.score <= max_multiplier - 1
        assert a.scale(0.25) == pytest.approx(0.25 * (model + 1))
