import math

import numpy as np

from equicsp.evaluation.metrics import (
    CrystalArrays,
    composition_valid,
    evaluate_matches,
    extreme_lattice_problem,
    summarise,
    write_results_csv,
)


def crystals_of(dataset, count=4):
    return [CrystalArrays.of(d.atom_types, d.frac_coords, d.lengths[0], d.angles[0])
            for d in (dataset[i] for i in range(count))]


def perturbed(crystal: CrystalArrays, scale: float, seed: int = 0) -> CrystalArrays:
    rng = np.random.default_rng(seed)
    coords = (np.array(crystal.frac_coords) + rng.normal(0, scale, (len(crystal.atom_types), 3))) % 1
    return CrystalArrays.of(crystal.atom_types, coords, crystal.lengths, crystal.angles)


def test_a_crystal_matches_itself_and_a_slightly_perturbed_copy(tiny_dataset):
    truths = crystals_of(tiny_dataset)
    results = evaluate_matches(truths, [[t] for t in truths], processes=1, show_progress=False)
    assert all(r.matched for r in results) and max(r.rms for r in results) < 1e-6
    results = evaluate_matches(truths, [[perturbed(t, 0.01)] for t in truths], processes=1, show_progress=False)
    assert all(r.matched for r in results) and all(0 < r.rms < 0.1 for r in results)


def test_a_random_structure_does_not_match(tiny_dataset):
    truths = crystals_of(tiny_dataset)
    rng = np.random.default_rng(0)
    randoms = [CrystalArrays.of(t.atom_types, rng.random((len(t.atom_types), 3)), (4.0, 6.5, 9.0), (70.0, 100.0, 115.0))
               for t in truths]
    results = evaluate_matches(truths, [[r] for r in randoms], processes=1, show_progress=False)
    assert not any(r.matched for r in results)
    summary = summarise(results)
    assert summary.match_rate == 0 and math.isnan(summary.rmse)


def test_best_of_k_takes_the_closest_valid_sample(tiny_dataset):
    truth = crystals_of(tiny_dataset, 1)[0]
    samples = [perturbed(truth, 0.03, 1), perturbed(truth, 0.005, 2), perturbed(truth, 0.02, 3)]
    [result] = evaluate_matches([truth], [samples], processes=1, show_progress=False)
    assert result.best_sample == 1 and result.num_samples == 3


def test_an_smact_invalid_composition_never_counts():
    assert composition_valid((8, 8, 8, 22, 38))  # SrTiO3
    assert not composition_valid((11, 11, 17))  # Na2Cl
    na2cl = CrystalArrays.of([11, 11, 17], [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]], (5.0, 5.0, 5.0), (90.0, 90.0, 90.0))
    [result] = evaluate_matches([na2cl], [[na2cl]], processes=1, show_progress=False)
    assert not result.matched and "SMACT" in result.reason


def test_overlapping_atoms_and_extreme_cells_are_reported(tiny_dataset):
    truth = crystals_of(tiny_dataset, 1)[0]
    coords = np.array(truth.frac_coords)
    coords[1] = coords[0] + 0.001
    crushed = CrystalArrays.of(truth.atom_types, coords, truth.lengths, truth.angles)
    [result] = evaluate_matches([truth], [[crushed]], processes=1, show_progress=False)
    assert not result.matched and "apart" in result.reason
    needle = CrystalArrays.of(truth.atom_types, truth.frac_coords, (3.9, 3.9, 5e6), (90.0, 90.0, 90.0))
    assert "cell length" in extreme_lattice_problem(needle)


def test_parallel_and_serial_matching_agree(tiny_dataset, tmp_path):
    truths = crystals_of(tiny_dataset, 8)
    predictions = [[perturbed(t, 0.02, i), perturbed(t, 0.2, i)] for i, t in enumerate(truths)]
    serial = evaluate_matches(truths, predictions, processes=1, show_progress=False)
    parallel = evaluate_matches(truths, predictions, processes=2, show_progress=False)
    assert [(r.matched, r.best_sample) for r in serial] == [(r.matched, r.best_sample) for r in parallel]
    np.testing.assert_allclose([r.rms for r in serial], [r.rms for r in parallel])
    write_results_csv(serial, tmp_path / "per_crystal.csv")
    header = (tmp_path / "per_crystal.csv").read_text().splitlines()[0]
    assert header.startswith("index,formula,num_atoms,matched,rms")


def test_a_non_finite_sample_is_invalid_and_not_written_as_a_cif(tiny_dataset, tmp_path):
    import zipfile

    import torch

    from equicsp.engine.sampler import SampledCrystal
    from equicsp.evaluation.metrics import validity_problem
    from equicsp.evaluation.report import write_predictions

    truth = crystals_of(tiny_dataset, 1)[0]
    coords = np.array(truth.frac_coords)
    coords[0] = np.nan
    assert "non-finite" in validity_problem(CrystalArrays.of(truth.atom_types, coords, truth.lengths, truth.angles))
    assert "non-finite" in validity_problem(CrystalArrays.of(truth.atom_types, truth.frac_coords,
                                                             (np.nan, 4.0, 4.0), truth.angles))
    sampled = [SampledCrystal(0, 0, torch.tensor(truth.atom_types), torch.tensor(coords), torch.tensor(truth.lengths),
                              torch.tensor(truth.angles))]
    with zipfile.ZipFile(write_predictions(sampled, {0: "SrTiO3"}, tmp_path / "p.zip")) as archive:
        assert archive.read(archive.namelist()[0]).decode().startswith("# not writable")


def test_smact_validity_follows_the_published_evaluation():
    """CDVAE's smact_validity on SMACT 2.2: a cation-anion pair with no Pauling electronegativity (Pm) passes the
    test, another pair without one fails it, and more than 10^7 oxidation-state combinations are not searched."""
    assert composition_valid((7, 61))  # PmN: Pm(+3) N(-3), Pm has no electronegativity
    assert composition_valid((8, 8, 8, 61, 61))  # Pm2O3
    assert not composition_valid((11, 53, 53, 53, 53, 61))  # NaPmI4: Na(+1) and Pm(+3) compared, Pm has none
    # Mn Os Ir Tc Ru Re C N Si O: 3.7e8 combinations (today's SMACT would search them all)
    assert not composition_valid(tuple(sorted((25, 76, 77, 43, 44, 75, 6, 7, 14, 8))))
    assert composition_valid((26, 26))  # one element
    assert composition_valid((11, 17))  # NaCl
    assert not composition_valid((11, 17, 17)) and not composition_valid((8, 11, 11, 11))  # NaCl2, Na3O


def test_atoms_exactly_half_an_angstrom_apart_are_valid():
    """The published cut-offs are strict: distances below 0.5 A and volumes below 0.1 A^3 are invalid."""
    from equicsp.evaluation.metrics import structure_problem

    edge = CrystalArrays.of([6, 6], [[0, 0, 0], [0.0625, 0, 0]], (8.0, 8.0, 8.0), (90.0, 90.0, 90.0))
    assert edge.to_structure().distance_matrix[0, 1] == 0.5 and structure_problem(edge.to_structure()) == ""
    closer = CrystalArrays.of([6, 6], [[0, 0, 0], [0.06, 0, 0]], (8.0, 8.0, 8.0), (90.0, 90.0, 90.0))
    assert "apart" in structure_problem(closer.to_structure())


def test_best_of_k_does_not_ask_the_ground_truth_to_be_valid_but_one_sample_does(tiny_dataset):
    """The published evaluation's RecEval (k = 1) skips an invalid ground truth; RecEvalBatch (k > 1) does not."""
    truth = crystals_of(tiny_dataset, 1)[0]  # a cubic cell

    def with_atoms_apart(distance):  # the second atom moved to `distance` A along x from the first
        coords = np.array(truth.frac_coords)
        coords[1] = coords[0] + np.array([distance, 0, 0]) / np.array(truth.lengths)
        return CrystalArrays.of(truth.atom_types, coords % 1, truth.lengths, truth.angles)

    crowded, valid = with_atoms_apart(0.45), with_atoms_apart(0.55)
    [one] = evaluate_matches([crowded], [[crowded]], processes=1, show_progress=False)
    assert not one.matched and one.reason.startswith("ground truth invalid")
    [several] = evaluate_matches([crowded], [[crowded, valid]], processes=1, show_progress=False)
    assert several.matched and several.best_sample == 1 and several.valid_samples == 1


def test_a_skewed_basis_of_the_right_lattice_is_matched_by_its_reduced_cell(tiny_dataset):
    """A cell that only looks extreme (c' = c + 60 a, 300 A long) is the same lattice: its LLL basis is matched."""
    truth = crystals_of(tiny_dataset, 1)[0]
    structure = truth.to_structure()
    skew = np.array([[1, 0, 0], [0, 1, 0], [60, 0, 1]])
    skewed_lattice = type(structure.lattice)(skew @ structure.lattice.matrix)
    coords = structure.frac_coords @ np.linalg.inv(skew)
    skewed = CrystalArrays.of(truth.atom_types, coords % 1, skewed_lattice.abc, skewed_lattice.angles)
    assert extreme_lattice_problem(skewed)
    [result] = evaluate_matches([truth], [[skewed]], processes=1, show_progress=False)
    assert result.matched and result.rms < 1e-4
    needle = CrystalArrays.of(truth.atom_types, truth.frac_coords, (3.9, 3.9, 5e6), (90.0, 90.0, 90.0))
    [result] = evaluate_matches([truth], [[needle]], processes=1, show_progress=False)
    assert not result.matched and "cell length" in result.reason


def test_the_match_time_limit_counts_cpu_time_not_waiting():
    import time

    import pytest

    from equicsp.evaluation.metrics import MatchTimeout, time_limit

    with time_limit(0.2):
        time.sleep(0.5)  # waiting (a loaded machine) is not the matcher's time
    with pytest.raises(MatchTimeout), time_limit(0.2):
        while True:
            sum(range(1000))


def test_a_matcher_failure_is_counted_and_said_not_lost(tiny_dataset, monkeypatch):
    """A sample StructureMatcher raises on (or runs out of time with) is not matched, and the summary counts it."""
    from equicsp.evaluation import metrics

    truths = crystals_of(tiny_dataset, 2)
    calls = []

    def fails_on_the_first(matcher, generated, reference):
        calls.append(reference)
        if len(calls) == 1:
            raise RuntimeError("Niggli reduction did not converge")
        return (0.0, 0.0)

    monkeypatch.setattr(metrics, "rms_dist", fails_on_the_first)
    results = evaluate_matches(truths, [[t] for t in truths], processes=1, show_progress=False)
    assert [r.matched for r in results] == [False, True]
    assert results[0].matcher_failures == 1 and "matcher failed on 1 of them" in results[0].reason
    assert summarise(results).matcher_failures == 1
