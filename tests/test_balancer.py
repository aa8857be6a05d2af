"""dataplane.balancer: peak-EWMA (Finagle/Linkerd), P2C, round robin, least connections, locality."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.balancer import DEFAULT_RTT, SAMPLE_WEIGHT_FLOOR, Balancer, Candidate, PeakEwma

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=200)

Key = tuple[str, int]


def cands(*keys: Key, rtt: float | None = None) -> list[Candidate[Key]]:
    return [Candidate(k, rtt) for k in keys]


A: Key = ("a", 1)
B: Key = ("b", 1)
C: Key = ("c", 1)
D: Key = ("d", 1)


# -- PeakEwma ------------------------------------------------------------------


def test_prior_is_rtt_as_given_or_default_decaying_from_birth() -> None:
    e = PeakEwma(decay_time=10.0, born=5.0)
    assert e.value(5.0) == DEFAULT_RTT == 0.030
    assert e.value(15.0) == pytest.approx(0.030 * math.exp(-1))
    assert e.value(1000.0, prior=0.002) == 0.002  # a measured RTT does not decay
    assert not e.observed


def test_first_observation_replaces_prior() -> None:
    e = PeakEwma(decay_time=10.0, default=0.5)
    e.observe(3.0, 0.010)
    assert e.observed
    assert e.value(3.0) == pytest.approx(0.010)
    assert e.value(3.0, prior=0.9) == pytest.approx(0.010)  # a prior no longer matters


def test_peak_is_taken_at_once_and_decays_toward_zero() -> None:
    e = PeakEwma(decay_time=10.0)
    e.observe(0.0, 0.010)
    e.observe(0.0, 0.050)
    assert e.value(0.0) == pytest.approx(0.050)
    # Between observations the estimate decays toward 0 (Finagle get() observes 0).
    assert e.value(10.0) == pytest.approx(0.050 * math.exp(-1))
    assert e.value(20.0) == pytest.approx(0.050 * math.exp(-2))


def test_lower_sample_pulls_down_with_time_weight() -> None:
    e = PeakEwma(decay_time=10.0)
    e.observe(0.0, 0.050)
    e.observe(10.0, 0.010)
    w = math.exp(-1)
    # Finagle: cost * w + rtt * (1 - w)
    assert e.value(10.0) == pytest.approx(0.050 * w + 0.010 * (1 - w))
    assert e.value(10.0) == pytest.approx(0.024715, abs=1e-6)
    # A sample at the same instant as the last one (w = 1) still weighs SAMPLE_WEIGHT_FLOOR: per-request
    # samples come a millisecond apart, and a spike must wear off with them, not only with time.
    before = e.value(10.0)
    e.observe(10.0, 0.001)
    assert e.value(10.0) == pytest.approx(before * (1 - SAMPLE_WEIGHT_FLOOR) + 0.001 * SAMPLE_WEIGHT_FLOOR)


def test_a_one_off_spike_wears_off_with_the_samples_after_it() -> None:
    e = PeakEwma(decay_time=10.0)
    for i in range(20):
        e.observe(i * 0.001, 0.001)
    e.observe(0.020, 0.020)  # one stall: taken at once
    assert e.value(0.020) == pytest.approx(0.020)
    for i in range(21, 41):  # twenty ordinary requests within the next 20 ms
        e.observe(i * 0.001, 0.001)
    assert e.value(0.040) < 0.0013  # back within a third of the ordinary latency; time alone left it at 0.020
    # An instance that stays slow stays expensive: its samples keep the estimate up.
    for i in range(41, 61):
        e.observe(i * 0.001, 0.010 if i % 2 else 0.012)
    assert e.value(0.060) >= 0.010


def test_spike_after_decay_is_taken_at_once() -> None:
    e = PeakEwma(decay_time=10.0)
    e.observe(0.0, 0.100)
    e.observe(30.0, 0.020)  # decayed value 0.100 * e^-3 = 0.00498 < 0.020: a peak
    assert e.value(30.0) == pytest.approx(0.020)


def test_steady_samples_converge() -> None:
    e = PeakEwma(decay_time=10.0)
    e.observe(0.0, 1.0)
    for i in range(1, 200):
        e.observe(float(i), 0.005)
    assert e.value(199.0) == pytest.approx(0.005, rel=1e-3)


def test_clock_stepping_back_counts_as_no_time() -> None:
    e = PeakEwma(decay_time=10.0)
    e.observe(10.0, 0.040)
    e.observe(5.0, 0.010)  # elapsed clamped to 0: w = 1, only the floor's pull
    assert e.value(10.0) == pytest.approx(0.040 * (1 - SAMPLE_WEIGHT_FLOOR) + 0.010 * SAMPLE_WEIGHT_FLOOR)


def test_cost_is_estimate_times_outstanding_plus_one() -> None:
    e = PeakEwma(decay_time=10.0)
    e.observe(0.0, 0.004)
    assert e.cost(0.0, 0) == pytest.approx(0.004)
    assert e.cost(0.0, 3) == pytest.approx(0.016)
    # A zero estimate still charges for outstanding connections.
    z = PeakEwma(default=0.0)
    assert 0 < z.cost(0.0, 0) < z.cost(0.0, 5)


@given(samples=st.lists(st.tuples(st.floats(0, 100), st.floats(-1, 5)), max_size=20),
       now=st.floats(0, 200), outstanding=st.integers(-2, 50),
       prior=st.one_of(st.none(), st.floats(-1, 1)))
def test_cost_is_the_estimate_as_value_reads_it(samples: list[tuple[float, float]], now: float, outstanding: int,
                                                prior: float | None) -> None:
    """cost() reads the estimate itself (it runs twice per pick); it must agree with value()."""
    e = PeakEwma(decay_time=10.0)
    for t, sample in sorted(samples):
        e.observe(t, sample)
    expected = max(e.value(now, prior), 1e-6) * (max(outstanding, 0) + 1)
    assert e.cost(now, outstanding, prior) == pytest.approx(expected, rel=1e-12, abs=0)


def test_rejects_bad_decay_time() -> None:
    with pytest.raises(ValueError):
        PeakEwma(decay_time=0.0)


# -- Balancer: bookkeeping -----------------------------------------------------


def test_unknown_policy_rejected() -> None:
    with pytest.raises(ValueError):
        Balancer("random", random.Random(0))


def test_empty_and_single() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(0))
    assert b.pick(0.0, []) is None
    assert b.pick(0.0, cands(A)) == A


def test_outstanding_counts_and_never_goes_negative() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(0))
    b.started(0.0, A)
    b.started(0.0, A)
    assert b.outstanding(A) == 2
    b.finished(1.0, A)
    b.finished(1.0, A)
    b.finished(1.0, A)
    assert b.outstanding(A) == 0
    b.finished(1.0, B)  # never seen: ignored
    assert b.outstanding(B) == 0
    b.forget(A)
    assert b.outstanding(A) == 0 and b.ewma(1.0, A) is None


def test_ewma_display_uses_rtt_prior_then_observations() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(0), default_rtt=0.03)
    b.pick(0.0, [Candidate(A, 0.002), Candidate(B, None)])
    assert b.ewma(0.0, A) == pytest.approx(0.002)
    assert b.ewma(0.0, B) == pytest.approx(0.03)
    b.started(0.0, A)
    b.observe(0.0, A, 0.004, ok=True)
    assert b.ewma(0.0, A) == pytest.approx(0.004)
    assert b.outstanding(A) == 1  # observe leaves the count alone
    b.finished(5.0, A)
    assert b.outstanding(A) == 0
    assert b.ewma(5.0, A) == pytest.approx(0.004 * math.exp(-0.5))


def test_failure_is_observed_as_a_penalty() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(0), failure_penalty=1.0)
    b.started(0.0, A)
    b.finished(0.0, A, latency=0.0005, ok=False)  # a fast refusal
    assert b.ewma(0.0, A) == pytest.approx(1.0)
    b.started(0.0, B)
    b.finished(0.0, B, latency=5.0, ok=False)  # a timeout longer than the penalty
    assert b.ewma(0.0, B) == pytest.approx(5.0)
    b.started(0.0, C)
    b.finished(0.0, C, ok=False)
    assert b.ewma(0.0, C) == pytest.approx(1.0)


# -- P2C -----------------------------------------------------------------------


def simulate(
    b: Balancer[Key],
    latency: dict[Key, float],
    *,
    picks: int,
    every: float = 0.01,
    hold: float = 0.1,
    rtt: dict[Key, float | None] | None = None,
    weights: dict[Key, float] | None = None,
) -> Counter[Key]:
    """Open a connection every `every` s; its connect takes latency[key]; it lives `hold` s."""
    open_until: list[tuple[float, Key]] = []
    counts: Counter[Key] = Counter()
    keys = list(latency)
    for k in keys:  # one observation each, as after a few connections
        b.started(0.0, k)
        b.finished(0.0, k, latency[k], ok=True)
    for i in range(picks):
        now = i * every
        still = []
        for t, k in open_until:
            if t <= now:
                b.finished(now, k)
            else:
                still.append((t, k))
        open_until = still
        cs = [Candidate(k, (rtt or {}).get(k), (weights or {}).get(k, 1.0)) for k in keys]
        got = b.pick(now, cs)
        assert got is not None
        counts[got] += 1
        b.started(now, got)
        b.observe(now, got, latency[got], ok=True)
        open_until.append((now + hold, got))
    return counts


def test_p2c_prefers_the_fast_instance() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(1))
    counts = simulate(b, {A: 0.001, B: 0.010}, picks=2000)
    # Pairs are won in inverse proportion to cost, and about ten connections are open at a time, so
    # the slow one wins now and then and takes about a fifth: enough samples to see it recover.
    assert counts[A] / 2000 >= 0.75
    assert counts[B] > 0  # load still spills to the slow one when the fast one is busy


def test_p2c_equal_instances_split_evenly() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(2))
    n = 4000
    keys = [A, B, C, D]
    counts = simulate(b, dict.fromkeys(keys, 0.002), picks=n, hold=0.2)
    expected = n / len(keys)
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in keys)
    # 3 degrees of freedom, p = 0.001 critical value 16.27; P2C is far more even than random.
    assert chi2 < 16.27, counts


def test_p2c_two_equal_instances_within_band() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(3))
    counts = simulate(b, {A: 0.002, B: 0.002}, picks=2000)
    assert 0.45 <= counts[A] / 2000 <= 0.55, counts


def test_p2c_slow_start_weight_reduces_share() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(4))
    full = simulate(b, {A: 0.002, B: 0.002, C: 0.002}, picks=3000, hold=0.2)
    b2: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(4))
    warm = simulate(b2, {A: 0.002, B: 0.002, C: 0.002}, picks=3000, hold=0.2, weights={C: 0.1})
    assert warm[C] < full[C] / 2
    assert warm[C] > 0


def test_p2c_unmeasured_instance_without_rtt_is_eventually_tried() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(5), default_rtt=0.030)
    b.started(0.0, A)
    b.finished(0.0, A, latency=0.002, ok=True)
    b.pick(0.0, cands(A, B))  # B first seen at t=0 with only the 30 ms default
    for _ in range(3):
        b.started(0.0, A)
    # 4 outstanding * 2 ms < 30 ms: A mostly wins; once the guess has decayed, B mostly does.
    assert Counter(b.pick(0.0, cands(A, B)) for _ in range(300))[A] > 200
    b.observe(40.0, A, 0.002, ok=True)
    assert Counter(b.pick(40.0, cands(A, B)) for _ in range(300))[B] > 200


def test_p2c_fast_failing_instance_is_avoided() -> None:
    b: Balancer[Key] = Balancer("p2c_peak_ewma", random.Random(5))
    for k in (A, B):
        b.started(0.0, k)
        b.finished(0.0, k, latency=0.002, ok=True)
    b.started(0.0, C)
    b.finished(0.0, C, latency=0.0001, ok=False)  # refused in 100 us
    counts = Counter(b.pick(0.1, cands(A, B, C)) for _ in range(300))
    assert counts[C] == 0


# -- round robin -------------------------------------------------------------


def test_round_robin_rotates() -> None:
    b: Balancer[Key] = Balancer("round_robin", random.Random(6))
    cs = cands(A, B, C)
    seq = [b.pick(0.0, cs) for _ in range(12)]
    first = seq[:3]
    assert set(first) == {A, B, C}
    assert seq == first * 4


def test_round_robin_start_differs_between_seeds() -> None:
    starts = {Balancer[Key]("round_robin", random.Random(s)).pick(0.0, cands(A, B, C, D)) for s in range(20)}
    assert len(starts) > 1


def test_round_robin_honours_weights() -> None:
    b: Balancer[Key] = Balancer("round_robin", random.Random(7))
    cs = [Candidate(A, None, 1.0), Candidate(B, None, 0.5), Candidate(C, None, 0.25)]
    counts = Counter(b.pick(0.0, cs) for _ in range(700))
    assert abs(counts[A] - 400) <= 1 and abs(counts[B] - 200) <= 1 and abs(counts[C] - 100) <= 1
    # Smooth: the heavy instance never gets more than its share in a row.
    seq = [b.pick(0.0, cs) for _ in range(7)]
    assert Counter(seq) == {A: 4, B: 2, C: 1}


def test_round_robin_survives_membership_change() -> None:
    b: Balancer[Key] = Balancer("round_robin", random.Random(8))
    for _ in range(5):
        b.pick(0.0, cands(A, B, C))
    # Credits carried over from the larger set cause a short transient only.
    seq = Counter(b.pick(0.0, cands(A, C)) for _ in range(60))
    assert abs(seq[A] - 30) <= 2 and abs(seq[C] - 30) <= 2


# -- least connections ---------------------------------------------------------


def test_least_connections_picks_fewest() -> None:
    b: Balancer[Key] = Balancer("least_connections", random.Random(9))
    for _ in range(2):
        b.started(0.0, A)
    b.started(0.0, C)
    assert b.pick(0.0, cands(A, B, C)) == B
    b.started(0.0, B)
    b.started(0.0, B)
    assert b.pick(0.0, cands(A, B, C)) == C


def test_least_connections_breaks_ties_randomly() -> None:
    b: Balancer[Key] = Balancer("least_connections", random.Random(10))
    b.started(0.0, A)
    counts = Counter(b.pick(0.0, cands(A, B, C)) for _ in range(1000))
    assert counts[A] == 0
    assert 400 <= counts[B] <= 600 and 400 <= counts[C] <= 600


def test_least_connections_spreads_load() -> None:
    b: Balancer[Key] = Balancer("least_connections", random.Random(11))
    for _ in range(30):
        k = b.pick(0.0, cands(A, B, C))
        assert k is not None
        b.started(0.0, k)
    assert [b.outstanding(k) for k in (A, B, C)] == [10, 10, 10]


def test_least_connections_honours_weights() -> None:
    b: Balancer[Key] = Balancer("least_connections", random.Random(12))
    cs = [Candidate(A, None, 1.0), Candidate(B, None, 0.25)]
    counts = Counter(b.pick(0.0, cs) for _ in range(4000))
    assert 0.17 <= counts[B] / 4000 <= 0.23  # weight share 0.25 / 1.25 = 0.2
    # Under load the warming instance keeps fewer connections; with Envoy's
    # weight / (active + 1) a pile-up splits as sqrt(weight): 0.5 here.
    b2: Balancer[Key] = Balancer("least_connections", random.Random(13))
    for _ in range(2000):
        k = b2.pick(0.0, cs)
        assert k is not None
        b2.started(0.0, k)
    assert 0.4 <= b2.outstanding(B) / b2.outstanding(A) <= 0.6


# -- weights -------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["p2c_peak_ewma", "round_robin", "least_connections"])
def test_zero_weight_excluded_unless_all_zero(policy: str) -> None:
    b: Balancer[Key] = Balancer(policy, random.Random(14))
    cs = [Candidate(A, None, 0.0), Candidate(B, None, 1.0), Candidate(C, None, 0.0)]
    assert {b.pick(0.0, cs) for _ in range(50)} == {B}
    zero = [Candidate(A, None, 0.0), Candidate(B, None, 0.0)]
    assert {b.pick(0.0, zero) for _ in range(50)} == {A, B}


@pytest.mark.parametrize("policy", ["p2c_peak_ewma", "round_robin", "least_connections"])
def test_out_of_range_weights_are_clamped(policy: str) -> None:
    b: Balancer[Key] = Balancer(policy, random.Random(15))
    cs = [Candidate(A, None, 5.0), Candidate(B, None, -1.0), Candidate(C, None, math.nan)]
    assert {b.pick(0.0, cs) for _ in range(20)} == {A}


# -- locality ------------------------------------------------------------------


def local_set() -> list[Candidate[Key]]:
    # Band: max(2 * 0.5 ms, 0.5 ms + 10 ms) = 10.5 ms -> A and B local, C far, D unmeasured.
    return [Candidate(A, 0.0005), Candidate(B, 0.008), Candidate(C, 0.030), Candidate(D, None)]


@pytest.mark.parametrize("policy", ["p2c_peak_ewma", "round_robin", "least_connections"])
def test_local_tier_is_preferred(policy: str) -> None:
    b: Balancer[Key] = Balancer(policy, random.Random(16))
    picks: Counter[Key | None] = Counter()
    for _ in range(100):  # fewer than 2 * spill_outstanding
        k = b.pick(0.0, local_set())
        picks[k] += 1
        assert k is not None
        b.started(0.0, k)  # load, so that P2C has a reason to use B as well
    assert set(picks) == {A, B}


def test_band_is_relative_for_distant_instances() -> None:
    b: Balancer[Key] = Balancer("round_robin", random.Random(17))
    cs = [Candidate(A, 0.040), Candidate(B, 0.075), Candidate(C, 0.090)]
    # max(2 * 40 ms, 42 ms) = 80 ms
    assert {b.pick(0.0, cs) for _ in range(30)} == {A, B}


@pytest.mark.parametrize("policy", ["p2c_peak_ewma", "round_robin", "least_connections"])
def test_saturated_tier_member_is_skipped_then_all_spill(policy: str) -> None:
    b: Balancer[Key] = Balancer(policy, random.Random(18), spill_outstanding=4)
    for _ in range(4):
        b.started(0.0, A)
    assert {b.pick(0.0, local_set()) for _ in range(50)} == {B}
    for _ in range(4):
        b.started(0.0, B)
    spilled = Counter(b.pick(0.0, local_set()) for _ in range(200))
    assert spilled[C] + spilled[D] > 0
    assert b.stats["spill_over"] == 200
    # Capacity back in the tier: traffic comes home.
    b.finished(0.0, A)
    assert {b.pick(0.0, local_set()) for _ in range(50)} == {A}


def test_no_rtt_known_means_one_tier() -> None:
    b: Balancer[Key] = Balancer("round_robin", random.Random(19))
    assert {b.pick(0.0, cands(A, B, C)) for _ in range(9)} == {A, B, C}


def test_prefer_local_off() -> None:
    b: Balancer[Key] = Balancer("round_robin", random.Random(20), prefer_local=False)
    assert {b.pick(0.0, local_set()) for _ in range(8)} == {A, B, C, D}


def test_zero_weight_local_instance_leaves_tier_to_the_others() -> None:
    b: Balancer[Key] = Balancer("round_robin", random.Random(21))
    cs = [Candidate(A, 0.0005, 0.0), Candidate(B, 0.010), Candidate(C, 0.012)]
    # A is out (ejected); the nearest remaining RTT defines the band.
    assert {b.pick(0.0, cs) for _ in range(10)} == {B, C}


# -- properties ----------------------------------------------------------------

keys_st = st.sampled_from([A, B, C, D, ("e", 2)])
cand_st = st.builds(
    Candidate,
    keys_st,
    st.one_of(st.none(), st.floats(0.0, 0.2)),
    st.one_of(st.floats(0.0, 1.0), st.just(1.0), st.just(0.0)),
)
op_st = st.one_of(
    st.tuples(st.just("pick"), st.lists(cand_st, max_size=6)),
    st.tuples(st.just("started"), keys_st),
    st.tuples(st.just("finished"), keys_st, st.one_of(st.none(), st.floats(0.0, 2.0)), st.booleans()),
    st.tuples(st.just("forget"), keys_st),
)


@SETTINGS
@given(
    policy=st.sampled_from(["p2c_peak_ewma", "round_robin", "least_connections"]),
    ops=st.lists(op_st, max_size=60),
    seed=st.integers(0, 2**32 - 1),
    spill=st.integers(1, 4),
)
def test_pick_returns_a_candidate_and_counts_stay_sane(
    policy: str, ops: list[tuple[object, ...]], seed: int, spill: int
) -> None:
    b: Balancer[Key] = Balancer(policy, random.Random(seed), spill_outstanding=spill)
    now = 0.0
    for op in ops:
        now += 0.01
        if op[0] == "pick":
            cs = op[1]
            assert isinstance(cs, list)
            got = b.pick(now, cs)
            if cs:
                assert got in {c.key for c in cs}
            else:
                assert got is None
        elif op[0] == "started":
            b.started(now, op[1])  # type: ignore[arg-type]
        elif op[0] == "finished":
            b.finished(now, op[1], op[2], op[3])  # type: ignore[arg-type]
        else:
            b.forget(op[1])  # type: ignore[arg-type]
        for k in (A, B, C, D, ("e", 2)):
            assert b.outstanding(k) >= 0
            e = b.ewma(now, k)
            assert e is None or (e >= 0 and not math.isnan(e))


@SETTINGS
@given(
    samples=st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 1.0)), min_size=1, max_size=40),
)
def test_peak_ewma_stays_within_sample_range(samples: list[tuple[float, float]]) -> None:
    e = PeakEwma(decay_time=10.0)
    now = 0.0
    seen: list[float] = []
    for dt, s in samples:
        now += dt
        e.observe(now, s)
        seen.append(s)
        v = e.value(now)
        # Never above the worst sample; right after an observation never below it (peak).
        assert s - 1e-12 <= v <= max(seen) + 1e-12
