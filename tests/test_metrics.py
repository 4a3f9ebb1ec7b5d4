import math

import numpy as np

from equicsp.metrics import (
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

    from equicsp.evaluation_report import write_predictions
    from equicsp.metrics import validity_problem
    from equicsp.sampler import SampledCrystal

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
