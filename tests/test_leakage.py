"""Leakage: a test crystal that a training crystal of the same reduced composition matches."""

import math

import torch

from equicsp.evaluation.leakage import leaked_test_crystals, reduced_composition, summarise_leakage
from equicsp.evaluation.metrics import CrystalResult


def shifted_supercell(dataset, index):
    """The crystal translated and doubled along a: the same structure, twice the formula units."""
    from equicsp.data.crystals import CrystalDataset, stack_crystals

    item = dataset[index]
    coords = (item.frac_coords + torch.tensor([0.31, 0.12, 0.77])) % 1.0
    doubled = torch.cat([coords * torch.tensor([0.5, 1, 1]), (coords + torch.tensor([1.0, 0, 0])) * torch.tensor([0.5, 1, 1])])
    item.frac_coords, item.atom_types = doubled, item.atom_types.repeat(2)
    item.lengths = item.lengths * torch.tensor([2.0, 1, 1])
    return CrystalDataset(stack_crystals([item]), [{}], dataset.report)


def test_reduced_composition_ignores_formula_units():
    assert reduced_composition([38, 22, 8, 8, 8]) == reduced_composition([8, 38, 8, 22, 8] * 2) == ((8, 3), (22, 1), (38, 1))
    assert reduced_composition([6, 6]) == ((6, 1),)


def test_copies_and_supercells_of_training_crystals_are_leaked_and_others_not(tiny_dataset):
    train = tiny_dataset.subset([0, 1, 2, 3])
    test = tiny_dataset.subset([2, 3, 4, 5])
    assert leaked_test_crystals(train, test, processes=1, show_progress=False) == [True, True, False, False]
    supercell = shifted_supercell(tiny_dataset, 1)
    assert leaked_test_crystals(train, supercell, processes=1, show_progress=False) == [True]
    # A different structure of the same composition (crystal 1's atoms, its cell stretched to c / a = 2) is not leaked.
    twin = tiny_dataset.subset([1])
    twin.frac_coords = torch.rand(twin.frac_coords.shape, generator=torch.Generator().manual_seed(0))
    twin.lengths = twin.lengths * torch.tensor([1.0, 1.0, 2.0])
    assert leaked_test_crystals(train, twin, processes=1, show_progress=False) == [False]


def test_the_answer_is_cached_per_content(tiny_dataset, monkeypatch):
    train, test = tiny_dataset.subset([0, 1]), tiny_dataset.subset([1, 6])
    first = leaked_test_crystals(train, test, processes=1, show_progress=False)
    monkeypatch.setattr("equicsp.evaluation.leakage.parallel_map", lambda *args, **kwargs: (_ for _ in ()).throw(AssertionError))
    assert leaked_test_crystals(train, test, processes=1, show_progress=False) == first == [True, False]


def test_unleaked_scores_leave_out_the_leaked_crystals():
    def result(index, rms):
        return CrystalResult(index, "X", 5, not math.isnan(rms), rms, 0, 1, 1, "")

    results = [result(0, 0.1), result(1, 0.3), result(2, math.nan), result(3, 0.2), result(-1, math.nan)]
    summary = summarise_leakage(results, [True, False, False, True])
    assert summary.leaked_fraction == 0.5
    assert summary.num_unleaked == 3  # crystals 1 and 2 and the unreadable row
    assert summary.unleaked_match_rate == 1 / 3 and summary.unleaked_rmse == 0.3


def test_a_leak_is_what_the_csp_score_calls_a_match(tiny_dataset):
    """The same question as the match rate's, get_rms_dist: one atom moved 1.5 A is within its rms tolerance, though
    beyond fit's per-site one, and is leaked."""
    from equicsp.evaluation.metrics import CrystalArrays, evaluate_matches

    train = tiny_dataset.subset([0])
    moved = tiny_dataset.subset([0])
    moved.frac_coords[1] += torch.tensor([1.5, 0.0, 0.0]) / moved.lengths[0]
    truth, prediction = (CrystalArrays.of(d[0].atom_types, d[0].frac_coords % 1, d[0].lengths[0], d[0].angles[0])
                         for d in (moved, train))
    [scored] = evaluate_matches([truth], [[prediction]], processes=1, show_progress=False)
    assert scored.matched
    assert leaked_test_crystals(train, moved, processes=1, show_progress=False) == [True]


def test_the_leaked_fraction_is_of_the_evaluated_crystals():
    """With --limit only the first crystals are scored: the leaked fraction is theirs, not the whole test set's."""
    results = [CrystalResult(0, "X", 5, True, 0.1, 0, 1, 1, ""), CrystalResult(1, "X", 5, False, math.nan, -1, 1, 1, "")]
    summary = summarise_leakage(results, [True, False, False, False, False, False])
    assert summary.leaked_fraction == 0.5
