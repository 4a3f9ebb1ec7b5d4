"""Corrected RMSE and METRe (OMatG): what the published match rate and RMSE miss."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymatgen.analysis.structure_matcher import StructureMatcher
from test_matching import TOLERANCES, perturbed, read_structures

from equicsp.evaluation.scores import Metre, composition_key, corrected_rmse, metre

STOL = TOLERANCES["stol"]


def test_a_model_that_matches_fewer_crystals_at_lower_rms_gets_the_higher_crmse():
    everything = [0.10, 0.12, 0.15, 0.20]  # matches all four
    easiest_only = [0.02, None, None, None]  # matches one, closely
    published_rmse = lambda rms: np.mean([r for r in rms if r is not None])  # noqa: E731
    assert published_rmse(easiest_only) < published_rmse(everything)
    assert corrected_rmse(easiest_only, STOL) > corrected_rmse(everything, STOL)
    assert corrected_rmse(easiest_only, STOL) == pytest.approx((0.02 + 3 * STOL) / 4)


def test_crmse_counts_none_and_nan_alike_and_refuses_an_rms_the_matcher_never_gives():
    assert corrected_rmse([0.1, None], STOL) == corrected_rmse([0.1, math.nan], STOL) == pytest.approx((0.1 + STOL) / 2)
    assert math.isnan(corrected_rmse([], STOL))
    with pytest.raises(ValueError, match="outside"):
        corrected_rmse([0.6], STOL)


rms_lists = st.lists(st.one_of(st.none(), st.floats(0, STOL, exclude_max=True)), min_size=1, max_size=50)


@given(rms_lists)
def test_crmse_is_the_match_rate_weighing_the_rmse_against_stol(rms):
    matched = [r for r in rms if r is not None]
    rate = len(matched) / len(rms)
    rmse = np.mean(matched) if matched else 0.0
    assert corrected_rmse(rms, STOL) == pytest.approx(rate * rmse + (1 - rate) * STOL)
    assert (np.mean(matched) if matched else 0.0) - 1e-12 <= corrected_rmse(rms, STOL) <= STOL + 1e-12


@given(rms_lists, st.data())
def test_losing_a_match_never_lowers_the_crmse(rms, data):
    i = data.draw(st.integers(0, len(rms) - 1))
    assert corrected_rmse(rms[:i] + [None] + rms[i + 1:], STOL) >= corrected_rmse(rms, STOL) - 1e-12


@pytest.fixture(scope="module")
def crystals():
    carbon, perov = read_structures("carbon_tiny.csv"), read_structures("perov_tiny.csv")
    return carbon, perov


def one_to_one_rate(matcher, references, generated) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.mean([matcher.get_rms_dist(g, r) is not None for r, g in zip(references, generated)])


def test_two_polymorphs_found_in_the_other_order_count_for_metre_and_not_for_the_one_to_one_rate(crystals):
    carbon, perov = crystals
    a, b = carbon[0], carbon[1]  # two carbon polymorphs: one composition asked twice
    matcher = StructureMatcher(**TOLERANCES)
    assert composition_key(a) == composition_key(b) and matcher.get_rms_dist(a, b) is None
    rng = np.random.default_rng(0)
    references = [a, b, perov[0], perov[1]]
    generated = [perturbed(s, rng, 0.01, 0.005) for s in (b, a, perov[0], perov[1])]  # the polymorphs swapped
    assert one_to_one_rate(matcher, references, generated) == 0.5
    scores = metre(references, generated, matcher)
    assert scores.rate == 1.0 and scores.best == (1, 0, 2, 3)
    assert scores.crmse == pytest.approx(scores.rmse) and scores.rmse < STOL


def brute_force_metre(references, generated, matcher) -> Metre:
    """OMatG's metre_rmsds written out: every pair of the same reduced composition, get_rms_dist(generated, reference)."""
    rms, best = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for reference in references:
            found = [(matcher.get_rms_dist(g, reference), j) for j, g in enumerate(generated)
                     if reference is not None and g is not None and composition_key(g) == composition_key(reference)]
            found = [(answer[0], j) for answer, j in found if answer is not None]
            value, j = min(found, key=lambda pair: pair[0]) if found else (math.nan, -1)
            rms.append(value)
            best.append(j)
    matched = [r for r in rms if not math.isnan(r)]
    return Metre(len(matched) / len(references), float(np.mean(matched)) if matched else math.nan,
                 corrected_rmse(rms, matcher.stol), tuple(rms), tuple(best))


def test_metre_is_omatgs_match_of_every_reference_against_every_generated_crystal(crystals):
    carbon, perov = crystals
    rng = np.random.default_rng(1)
    references = carbon[:5] + perov[:5] + [None]  # None: a test crystal the caller found invalid
    generated = [perturbed(s, rng, level, level / 2) for s in carbon[:6] + perov[2:7] for level in (0.01, 0.12)]
    generated[0] = None  # an invalid sample
    matcher = StructureMatcher(**TOLERANCES)
    scores = metre(references, generated, matcher)
    expected = brute_force_metre(references, generated, matcher)
    np.testing.assert_array_equal(scores.rms, expected.rms)
    assert scores.best == expected.best
    assert (scores.rate, scores.crmse) == (expected.rate, expected.crmse)
    assert scores.rmse == pytest.approx(expected.rmse)
    assert 0 < scores.rate < 1 and scores.best[-1] == -1


def test_metre_is_at_least_the_one_to_one_rate_and_each_best_rms_at_most_the_own_samples(crystals):
    carbon, perov = crystals
    rng = np.random.default_rng(2)
    references = carbon[:4] + perov[:4]
    generated = [perturbed(s, rng, level, level / 2) for s, level in zip(references, (0.01, 0.2, 0.03, 0.01) * 2)]
    matcher = StructureMatcher(**TOLERANCES)
    scores = metre(references, generated, matcher)
    assert scores.rate >= one_to_one_rate(matcher, references, generated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for best, reference, own in zip(scores.rms, references, generated):
            answer = matcher.get_rms_dist(own, reference)
            assert answer is None or best <= answer[0]


def test_metre_asks_the_matcher_only_about_crystals_of_one_composition(crystals):
    carbon, perov = crystals

    class Counting(StructureMatcher):
        calls = 0

        def _match(self, *args, **kwargs):
            Counting.calls += 1
            return super()._match(*args, **kwargs)

    same_size = [s for s in carbon if len(s) == len(carbon[0])]
    scores = metre(perov[:3] + same_size[:1], perov[3:6] + same_size, Counting(**TOLERANCES))
    assert Counting.calls == len(same_size)  # no perovskite pair; carbon only against carbon cells of its size
    assert scores.rate == 0.25 and scores.best[-1] == 3  # the carbon crystal itself, after the three perovskites
