"""dataplane.outlier: Envoy consecutive-failure ejection, half-open trial, Envoy slow start."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.outlier import OutlierConfig, OutlierDetector

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=200)

Key = tuple[str, int]
A: Key = ("a", 1)
B: Key = ("b", 1)
C: Key = ("c", 1)


def fail(d: OutlierDetector[Key], now: float, key: Key, n: int, total: int = 10) -> None:
    for _ in range(n):
        d.on_failure(now, key, total)


def eject(d: OutlierDetector[Key], now: float, key: Key, total: int = 10) -> None:
    fail(d, now, key, d.config.consecutive_failures, total)
    assert d.state(now, key) == "ejected"


def test_defaults_are_envoys() -> None:
    c = OutlierConfig()
    assert (c.consecutive_failures, c.base_ejection_time, c.max_ejection_percent) == (5, 30.0, 50)
    assert (c.slow_start_window, c.slow_start_min_weight, c.slow_start_aggression) == (30.0, 0.1, 1.0)
    assert c.max_ejection_time == 300.0 and not c.always_eject_one


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": 0},
        {"base_ejection_time": 0.0},
        {"base_ejection_time": 400.0},
        {"max_ejection_percent": 101},
        {"slow_start_min_weight": 0.0},
        {"slow_start_aggression": 0.0},
        {"slow_start_window": -1.0},
    ],
)
def test_config_validation(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlierConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_instance_is_active_full_weight() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    assert d.state(0.0, A) == "active"
    assert d.available(0.0, A) and d.weight(0.0, A) == 1.0
    d.on_success(0.0, A)
    assert d.state(0.0, A) == "active"


def test_ejected_after_exactly_n_consecutive_failures() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    fail(d, 0.0, A, 4)
    assert d.state(0.0, A) == "active" and d.available(0.0, A)
    d.on_failure(0.0, A, 10)
    assert d.state(0.0, A) == "ejected"
    assert not d.available(0.0, A) and d.weight(0.0, A) == 0.0
    assert d.stats["ejections"] == 1


def test_success_in_between_resets_the_count() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    fail(d, 0.0, A, 4)
    d.on_success(0.0, A)
    fail(d, 0.0, A, 4)
    assert d.state(0.0, A) == "active"
    d.on_failure(0.0, A, 10)
    assert d.state(0.0, A) == "ejected"


def test_counts_are_per_instance() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    for _ in range(4):
        d.on_failure(0.0, A, 10)
        d.on_failure(0.0, B, 10)
    assert d.state(0.0, A) == d.state(0.0, B) == "active"


def test_ejection_lasts_base_time_then_half_open() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 100.0, A)
    assert d.ejected_until(A) == 130.0
    assert d.state(129.999, A) == "ejected" and not d.available(129.999, A)
    assert d.state(130.0, A) == "half-open" and d.available(130.0, A)
    assert d.weight(130.0, A) == 1.0


def test_late_outcomes_while_ejected_are_ignored() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A)
    d.on_success(10.0, A)
    d.on_failure(10.0, A, 10)
    assert d.state(10.0, A) == "ejected" and d.ejected_until(A) == 30.0


def test_half_open_allows_exactly_one_trial() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A)
    assert d.available(30.0, A)
    d.trial_started(30.0, A)
    assert d.state(31.0, A) == "half-open"
    assert not d.available(31.0, A) and d.weight(31.0, A) == 0.0
    d.trial_started(31.0, A)  # no trial to take: no-op
    assert d.stats["half_open_trials"] == 1


def test_trial_started_is_a_noop_for_healthy_instances() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    d.trial_started(0.0, A)
    eject(d, 0.0, B)
    d.trial_started(10.0, B)  # still ejected
    assert d.stats["half_open_trials"] == 0
    assert d.available(30.0, B)


def test_silent_trial_is_abandoned_after_trial_timeout() -> None:
    d: OutlierDetector[Key] = OutlierDetector(OutlierConfig(trial_timeout=5.0))
    eject(d, 0.0, A)
    d.trial_started(30.0, A)
    assert not d.available(34.9, A)
    assert d.available(35.0, A)
    d.trial_started(35.0, A)
    assert d.stats["half_open_trials"] == 2


def test_trial_success_starts_slow_start() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A)
    d.trial_started(30.0, A)
    d.on_success(30.5, A)
    assert d.state(30.5, A) == "slow-start"
    assert d.available(30.5, A)
    assert d.stats["returned"] == 1 and d.stats["slow_starts"] == 1
    assert d.state(60.5, A) == "active" and d.weight(60.5, A) == 1.0


def test_trial_failure_ejects_again_for_longer() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A)
    d.trial_started(30.0, A)
    d.on_failure(31.0, A, 10)
    assert d.state(31.0, A) == "ejected"
    assert d.ejected_until(A) == 31.0 + 60.0
    d.trial_started(91.0, A)
    d.on_failure(91.0, A, 10)
    assert d.ejected_until(A) == 91.0 + 90.0
    assert d.stats["trial_failures"] == 2 and d.stats["ejections"] == 3


def test_ejection_time_is_capped_at_max() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    now = 0.0
    eject(d, now, A)
    durations = []
    for _ in range(15):
        until = d.ejected_until(A)
        assert until is not None
        durations.append(until - now)
        now = until
        d.on_failure(now, A, 10)  # trial fails
    assert durations[:4] == [30.0, 60.0, 90.0, 120.0]
    assert max(durations) == 300.0 and durations[-1] == 300.0
    # Envoy stops growing the backoff once base * backoff reaches max + base.
    assert d.multiplier(now, A) == 11


def test_multiplier_decays_while_healthy() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A)
    d.on_failure(30.0, A, 10)  # trial fails: multiplier 2, until 90
    assert d.multiplier(30.0, A) == 2
    d.on_success(90.0, A)  # back in service at 90
    assert d.multiplier(99.9, A) == 2
    assert d.multiplier(100.0, A) == 1
    assert d.multiplier(110.0, A) == 0
    eject(d, 130.0, A)
    assert d.ejected_until(A) == 160.0  # forgiven: base time again


def test_quick_relapse_keeps_the_multiplier() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A)
    d.on_success(30.0, A)
    eject(d, 35.0, A)  # within one interval of returning
    assert d.ejected_until(A) == 35.0 + 60.0


def test_failures_during_slow_start_can_eject() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A)
    d.on_success(30.0, A)
    eject(d, 32.0, A)
    assert d.stats["ejections"] == 2


def test_max_ejection_percent_two_instances_one_may_go() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A, total=2)  # 100 * 1 / 2 = 50 <= 50
    fail(d, 0.0, B, 5, total=2)  # 100 * 2 / 2 > 50
    assert d.state(0.0, B) == "active"
    assert d.stats["ejections_refused_max_percent"] == 1


def test_max_ejection_percent_three_instances() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A, total=3)
    fail(d, 0.0, B, 5, total=3)  # 67% > 50%
    assert d.state(0.0, B) == "active" and d.ejected_count() == 1
    # The count restarts after a refusal (Envoy), so it takes another full run.
    fail(d, 0.0, B, 4, total=3)
    assert d.stats["ejections_refused_max_percent"] == 1
    d.on_failure(0.0, B, 3)
    assert d.stats["ejections_refused_max_percent"] == 2


def test_half_open_still_counts_against_the_cap() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A, total=2)
    assert d.state(30.0, A) == "half-open"
    fail(d, 30.0, B, 5, total=2)
    assert d.state(30.0, B) == "active"
    d.on_success(30.0, A)
    eject(d, 31.0, B, total=2)


def test_single_instance_is_never_ejected_by_default() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    fail(d, 0.0, A, 50, total=1)
    assert d.state(0.0, A) == "active"
    assert d.stats["ejections_refused_max_percent"] == 10


def test_always_eject_one() -> None:
    d: OutlierDetector[Key] = OutlierDetector(OutlierConfig(always_eject_one=True))
    eject(d, 0.0, A, total=1)
    fail(d, 0.0, B, 5, total=1)
    assert d.state(0.0, B) == "active"


def test_forget_frees_the_cap() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A, total=2)
    d.forget(A)
    assert d.state(0.0, A) == "active"
    eject(d, 0.0, B, total=2)


@pytest.mark.parametrize(
    ("elapsed", "weight"),
    [(0.0, 0.1), (0.5, 0.1), (3.0, 0.1), (6.0, 0.2), (15.0, 0.5), (24.0, 0.8), (29.97, 0.999), (30.0, 1.0)],
)
def test_slow_start_linear_ramp(elapsed: float, weight: float) -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    d.joined(100.0, A)
    assert d.weight(100.0 + elapsed, A) == pytest.approx(weight)
    assert d.state(100.0 + elapsed, A) == ("active" if elapsed >= 30.0 else "slow-start")


@pytest.mark.parametrize(("elapsed", "weight"), [(0.0, 0.1), (7.5, 0.5), (16.875, 0.75), (27.0, 0.9**0.5)])
def test_slow_start_aggression(elapsed: float, weight: float) -> None:
    # weight = max(0.1, (t / 30) ** (1 / 2))
    d: OutlierDetector[Key] = OutlierDetector(OutlierConfig(slow_start_aggression=2.0))
    d.joined(0.0, A)
    assert d.weight(elapsed, A) == pytest.approx(weight)


def test_slow_start_min_weight_floor_and_tiny_elapsed() -> None:
    d: OutlierDetector[Key] = OutlierDetector(OutlierConfig(slow_start_min_weight=0.01, slow_start_window=10.0))
    d.joined(0.0, A)
    # Envoy floors elapsed at 1 ms: 0.001 / 10 = 1e-4, below the 1% floor.
    assert d.weight(0.0, A) == pytest.approx(0.01)
    assert d.weight(0.5, A) == pytest.approx(0.05)


def test_no_slow_start_when_window_is_zero() -> None:
    d: OutlierDetector[Key] = OutlierDetector(OutlierConfig(slow_start_window=0.0))
    eject(d, 0.0, A)
    d.on_success(30.0, A)
    assert d.state(30.0, A) == "active" and d.weight(30.0, A) == 1.0
    assert d.stats["returned"] == 1 and d.stats["slow_starts"] == 0
    d.joined(31.0, B)
    assert d.state(31.0, B) == "active"


def test_joined_does_not_resurrect_an_ejected_instance() -> None:
    d: OutlierDetector[Key] = OutlierDetector()
    eject(d, 0.0, A)
    d.joined(1.0, A)
    assert d.state(1.0, A) == "ejected"


# -- properties ----------------------------------------------------------------

keys_st = st.sampled_from([A, B, C, ("d", 1)])
op_st = st.tuples(
    st.sampled_from(["success", "failure", "trial", "forget", "joined"]),
    keys_st,
    st.floats(0.0, 20.0),
)


@SETTINGS
@given(
    ops=st.lists(op_st, max_size=120),
    percent=st.sampled_from([0, 25, 50, 75, 100]),
    n=st.integers(1, 3),
)
def test_cap_and_weights_hold(ops: list[tuple[str, Key, float]], percent: int, n: int) -> None:
    cfg = OutlierConfig(consecutive_failures=n, max_ejection_percent=percent)
    d: OutlierDetector[Key] = OutlierDetector(cfg)
    total = 4
    now = 0.0
    for kind, key, dt in ops:
        now += dt
        if kind == "success":
            d.on_success(now, key)
        elif kind == "failure":
            d.on_failure(now, key, total)
        elif kind == "trial":
            d.trial_started(now, key)
        elif kind == "forget":
            d.forget(key)
        else:
            d.joined(now, key)
        assert 100.0 * d.ejected_count() / total <= percent
        for k in (A, B, C, ("d", 1)):
            w = d.weight(now, k)
            state = d.state(now, k)
            assert 0.0 <= w <= 1.0
            assert (w > 0.0) == d.available(now, k)
            if state == "ejected":
                assert w == 0.0
            if state == "active":
                assert w == 1.0
            if state == "slow-start":
                assert cfg.slow_start_min_weight <= w <= 1.0
