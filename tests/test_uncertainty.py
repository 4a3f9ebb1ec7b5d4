"""Bootstrap intervals over test crystals and paired differences between arms: coverage, seeding, pairing."""

import inspect
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from equicsp.evaluation.scores import corrected_rmse
from equicsp.evaluation.uncertainty import bootstrap_interval, crmse, match_rate, paired_difference, rmse

STOL = 0.5


def synthetic_arm(rng: np.random.Generator, crystals: int, rate: float, seeds: int = 1) -> np.ndarray:
    """rms per (crystal, seed): matched with probability `rate`, at a uniform rms below 0.4 (mean 0.2); NaN otherwise."""
    rms = rng.uniform(0, 0.4, size=(crystals, seeds))
    return np.where(rng.random((crystals, seeds)) < rate, rms, np.nan)


def test_the_statistics_read_nan_as_no_match_and_crmse_agrees_with_scores():
    table = np.array([[0.1, np.nan], [np.nan, np.nan], [0.3, 0.2]])
    assert match_rate(table) == 0.5
    assert rmse(table) == pytest.approx(0.2)
    assert crmse(STOL)(table) == pytest.approx(corrected_rmse([0.1, None, None, None, 0.3, 0.2], STOL))
    np.testing.assert_allclose(rmse(np.stack([table, table[::-1]])), [0.2, 0.2])  # vectorised over leading axes


def test_intervals_cover_the_true_match_rate_and_rmse_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    rate_hits = rmse_hits = 0
    trials = 200
    for trial in range(trials):
        arm = synthetic_arm(rng, 300, 0.4)
        rate_interval = bootstrap_interval(arm, match_rate, n_resamples=400, seed=trial)
        rmse_interval = bootstrap_interval(arm, rmse, n_resamples=400, seed=trial)
        rate_hits += rate_interval.low <= 0.4 <= rate_interval.high
        rmse_hits += rmse_interval.low <= 0.2 <= rmse_interval.high
    assert 0.90 <= rate_hits / trials <= 0.99
    assert 0.90 <= rmse_hits / trials <= 0.99


def test_an_interval_is_reproducible_for_a_seed():
    arm = synthetic_arm(np.random.default_rng(1), 200, 0.5, seeds=3)
    first, again = bootstrap_interval(arm, rmse, seed=7), bootstrap_interval(arm, rmse, seed=7)
    assert first == again
    assert bootstrap_interval(arm, rmse, seed=8) != first


def test_a_crystals_seeds_are_drawn_together():
    """Three seeds that always agree add no information: the interval is the one-seed interval, not sqrt(3) narrower."""
    arm = synthetic_arm(np.random.default_rng(2), 150, 0.5)
    one_seed = bootstrap_interval(arm, match_rate)
    three_identical_seeds = bootstrap_interval(np.repeat(arm, 3, axis=1), match_rate)
    assert three_identical_seeds == one_seed


def scipy_bootstrap(data, statistic, n_resamples, seed):
    seeding = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    return stats.bootstrap(data, statistic, n_resamples=n_resamples, batch=64, paired=True, vectorized=True,
                           method="percentile", **{seeding: np.random.default_rng(seed)}).confidence_interval


def test_the_intervals_are_scipys_percentile_bootstrap_where_scipy_applies():
    rng = np.random.default_rng(3)
    arm, reference = synthetic_arm(rng, 120, 0.5, seeds=3), synthetic_arm(rng, 120, 0.4, seeds=2)
    pooled_rate = lambda *seeds, axis: match_rate(np.stack(seeds, axis=-1))  # noqa: E731
    ours = bootstrap_interval(arm, match_rate, n_resamples=300, seed=5)
    theirs = scipy_bootstrap(tuple(arm.T), pooled_rate, 300, 5)
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), abs=1e-12)

    def difference(*seeds, axis):
        return match_rate(np.stack(seeds[:3], axis=-1)) - match_rate(np.stack(seeds[3:], axis=-1))

    ours = paired_difference(arm, reference, match_rate, n_resamples=300, seed=5)
    theirs = scipy_bootstrap(tuple(arm.T) + tuple(reference.T), difference, 300, 5)
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), abs=1e-12)


def test_resamples_without_a_match_leave_the_rmse_interval_defined_and_are_counted():
    arm = np.full(30, np.nan)
    arm[[4, 17]] = [0.1, 0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        interval = bootstrap_interval(arm, rmse, n_resamples=1000)
    assert interval.estimate == pytest.approx(0.2)
    assert 0 < interval.undefined < 1000  # P(no match in a resample) = (28/30)^30, about 13 %
    assert 0.1 <= interval.low <= interval.high <= 0.3
    nothing = bootstrap_interval(np.full(10, np.nan), rmse)
    assert math.isnan(nothing.estimate) and math.isnan(nothing.low) and nothing.undefined == nothing.n_resamples


def test_identical_arms_differ_by_nothing_and_arms_from_one_distribution_are_not_told_apart():
    rng = np.random.default_rng(4)
    reference = synthetic_arm(rng, 300, 0.5, seeds=3)
    same = paired_difference(reference, reference.copy(), match_rate)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    another_run = synthetic_arm(rng, 300, 0.5, seeds=3)
    for statistic in (match_rate, rmse):
        difference = paired_difference(another_run, reference, statistic)
        assert difference.low <= 0 <= difference.high and not difference.excludes_zero


def test_clearly_different_arms_are_told_apart_with_the_sign_of_the_difference():
    rng = np.random.default_rng(5)
    reference, better = synthetic_arm(rng, 300, 0.3), synthetic_arm(rng, 300, 0.6)
    difference = paired_difference(better, reference, match_rate)
    assert difference.excludes_zero and 0 < difference.low < 0.3 < difference.high
    worse_rmse = np.where(np.isfinite(reference), reference + 0.1, np.nan)
    assert paired_difference(worse_rmse, reference, rmse).low > 0


def test_pairing_resolves_a_small_difference_that_separate_intervals_would_not():
    """An arm that matches 15 more of 600 crystals than the reference, and otherwise the same ones."""
    rng = np.random.default_rng(6)
    reference = synthetic_arm(rng, 600, 0.5)
    arm = reference.copy()
    arm[np.flatnonzero(np.isnan(reference[:, 0]))[:15], 0] = 0.2
    alone, with_reference = bootstrap_interval(arm, match_rate), bootstrap_interval(reference, match_rate)
    assert alone.low < with_reference.high  # the two intervals overlap...
    difference = paired_difference(arm, reference, match_rate)
    assert difference.estimate == pytest.approx(15 / 600) and difference.excludes_zero  # ...the paired one does not


def test_a_paired_comparison_needs_the_same_crystals_and_inputs_are_checked():
    with pytest.raises(ValueError, match="same test crystals"):
        paired_difference(np.zeros(5), np.zeros(6), match_rate)
    with pytest.raises(ValueError, match="shape"):
        bootstrap_interval(np.zeros((2, 2, 2)), match_rate)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(np.zeros(3), match_rate, confidence=95)


rms_tables = arrays(float, st.tuples(st.integers(1, 30), st.integers(1, 3)),
                    elements=st.one_of(st.just(math.nan), st.floats(0, STOL, exclude_max=True)))


@settings(max_examples=40, deadline=None)
@given(rms_tables, st.integers(0, 2**32 - 1))
def test_intervals_are_ordered_and_within_what_a_resample_can_give(table, seed):
    rate = bootstrap_interval(table, match_rate, n_resamples=50, seed=seed)
    assert 0 <= rate.low <= rate.high <= 1
    matched = table[np.isfinite(table)]
    error = bootstrap_interval(table, rmse, n_resamples=50, seed=seed)
    if len(matched):
        assert matched.min() - 1e-12 <= error.low <= error.high <= matched.max() + 1e-12
    else:
        assert math.isnan(error.low) and math.isnan(error.high)


@settings(max_examples=40, deadline=None)
@given(rms_tables, st.data())
def test_swapping_the_arms_negates_the_difference(arm, data):
    reference = data.draw(arrays(float, (len(arm), data.draw(st.integers(1, 3))),
                                 elements=st.one_of(st.just(math.nan), st.floats(0, STOL, exclude_max=True))))
    forward = paired_difference(arm, reference, crmse(STOL), n_resamples=50, seed=1)
    backward = paired_difference(reference, arm, crmse(STOL), n_resamples=50, seed=1)
    assert backward.estimate == pytest.approx(-forward.estimate, abs=1e-12)
    assert (backward.low, backward.high) == pytest.approx((-forward.high, -forward.low), abs=1e-12)
