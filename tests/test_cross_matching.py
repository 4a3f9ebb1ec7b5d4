"""METRe in the evaluation: the cross pairs of one reduced composition, with match_one's guards, give scores.metre."""

import math

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from test_matching import TOLERANCES, perturbed, read_structures

from equicsp.evaluation import metrics
from equicsp.evaluation.cross_matching import (
    cross_pairs,
    match_work,
    matching_work,
    metre_tiles,
    reduced_composition,
)
from equicsp.evaluation.metrics import CrystalArrays, parallel_map, summarise
from equicsp.evaluation.scores import metre


def arrays(structure) -> CrystalArrays:
    lattice = structure.lattice
    return CrystalArrays.of([site.specie.Z for site in structure], structure.frac_coords, lattice.abc, lattice.angles)


def evaluate(truths, predictions, metre_pairs=10**6):
    work = matching_work([(i, t, p) for i, (t, p) in enumerate(zip(truths, predictions))], metre_pairs)
    results = work.results(parallel_map(match_work, work.jobs, processes=1, show_progress=False))
    return summarise(results), results


@pytest.fixture(scope="module")
def carbon():
    return read_structures("carbon_tiny.csv")


@pytest.fixture(scope="module")
def perov():
    return read_structures("perov_tiny.csv")


def test_two_polymorphs_sampled_in_the_other_order_score_metre_1_and_match_rate_0(carbon):
    a, b = arrays(carbon[0]), arrays(carbon[1])
    summary, results = evaluate([a, b], [[b], [a]])
    assert summary.match_rate == 0 and math.isnan(summary.rmse)
    assert summary.metre == 1 and summary.metre_rmse < 1e-6
    assert summary.crmse == TOLERANCES["stol"] and summary.metre_crmse == pytest.approx(summary.metre_rmse)
    assert [r.metre_rms < 1e-6 for r in results] == [True, True]


def test_each_crystals_metre_rms_is_scores_metre_on_the_same_structures(carbon, perov):
    rng = np.random.default_rng(0)
    crystals = carbon[:5] + perov[:3]
    truths = [arrays(s) for s in crystals]
    predictions = [[arrays(perturbed(s, rng, level, level / 2)) for level in (0.01, 0.1)] for s in crystals]
    _, results = evaluate(truths, predictions)
    expected = metre([t.to_structure() for t in truths], [p.to_structure() for ps in predictions for p in ps],
                     StructureMatcher(**TOLERANCES))
    np.testing.assert_array_equal([r.metre_rms for r in results], expected.rms)
    assert all(r.metre_rms <= r.rms for r in results if r.matched)


def test_metre_keeps_the_guards_an_invalid_sample_matches_no_one(carbon):
    a, b = arrays(carbon[0]), arrays(carbon[1])
    overlapping = CrystalArrays.of(a.atom_types, np.zeros((len(a.atom_types), 3)), a.lengths, a.angles)
    _, results = evaluate([a, b], [[overlapping], [b]])
    assert math.isnan(results[0].metre_rms) and results[1].metre_rms < 1e-6


def test_tiles_hold_only_cross_pairs_of_one_composition_and_count_them(carbon, perov):
    truths = [arrays(s) for s in carbon[:3] + perov[:1]]
    jobs = [(i, t, [t, t]) for i, t in enumerate(truths)]
    assert cross_pairs(jobs) == 3 * 2 * 2  # each carbon against the two samples of each of the other two
    pairs = sum(1 for tile in metre_tiles(jobs) for reference in tile.references for owner, _ in tile.candidates
                if owner != reference.index)
    assert pairs == 12
    assert reduced_composition((6, 6, 8, 8)) == reduced_composition((6, 8)) != reduced_composition((6, 8, 8))


def test_past_the_pair_limit_metre_is_left_out_and_said(carbon, capsys):
    a, b = arrays(carbon[0]), arrays(carbon[1])
    summary, results = evaluate([a, b], [[b], [a]], metre_pairs=1)
    assert math.isnan(summary.metre) and all(r.metre_rms is None for r in results)
    assert "METRe left out" in capsys.readouterr().err
    summary, _ = evaluate([a, b], [[b], [a]], metre_pairs=0)  # 0: never, and nothing to say
    assert math.isnan(summary.metre) and "METRe" not in capsys.readouterr().err


def test_match_one_reduces_the_ground_truth_once_for_its_k_samples_with_get_rms_dists_answers(perov, monkeypatch):
    rng = np.random.default_rng(3)
    truth = perov[0]
    samples = [perturbed(truth, rng, level, level / 2) for level in (0.005, 0.02, 0.05, 0.2, 0.01)]
    calls = []
    real = metrics.reduce_for_matching
    monkeypatch.setattr(metrics, "reduce_for_matching", lambda matcher, s: calls.append(s) or real(matcher, s))
    result = metrics.match_one((0, arrays(truth), [arrays(s) for s in samples]))
    assert len(calls) == len(samples) + 1
    matcher = StructureMatcher(**TOLERANCES)
    plain = [matcher.get_rms_dist(arrays(s).to_structure(), arrays(truth).to_structure()) for s in samples]
    best = min((answer[0], i) for i, answer in enumerate(plain) if answer is not None)
    assert (result.rms, result.best_sample) == best
