"""Coverage and Wasserstein distances on hand-made sets whose answers are known; real fingerprints of the tiny set."""

import math

import numpy as np
import pytest

from equicsp.evaluation.generation_metrics import (
    CompositionScaler,
    CoverageThresholds,
    CrystalProperties,
    coverage,
    describe,
    generation_metrics,
    property_distances,
    thresholds_for,
    validity_rates,
)
from equicsp.evaluation.metrics import CrystalArrays

THRESHOLDS = CoverageThresholds(0.2, 4.0)


def points(*rows):
    return np.array(rows, dtype=float)


def test_identical_sets_are_fully_covered():
    rng = np.random.default_rng(0)
    structure, composition = rng.random((10, 61)), 10 * rng.random((10, 132))
    result = coverage(structure, composition, structure, composition, THRESHOLDS)
    assert result["cov_recall"] == 1.0 and result["cov_precision"] == 1.0
    assert result["amsd_recall"] == 0.0 and result["amcd_precision"] == 0.0


def test_coverage_counts_crystals_within_both_cutoffs():
    # Reference at 0 and 10 on one axis; generated at 0.1 (near the first), 5 (near neither).
    reference_s, reference_c = points([0.0], [10.0]), points([0.0], [0.0])
    generated_s, generated_c = points([0.1], [5.0]), points([1.0], [1.0])
    result = coverage(generated_s, generated_c, reference_s, reference_c, THRESHOLDS)
    assert result["cov_recall"] == 0.5  # the reference at 10 has nothing near
    assert result["cov_precision"] == 0.5  # the generated at 5 is near nothing
    # Composition too far: nothing covered, though the structures agree.
    far = coverage(generated_s, points([5.0], [5.0]), reference_s, reference_c, THRESHOLDS)
    assert far["cov_recall"] == 0.0 and far["cov_precision"] == 0.0


def test_precision_is_over_every_generated_crystal():
    """A crystal without fingerprints is not covered: COV-P divides by all generated ones."""
    same = points([0.0])
    result = coverage(same, same, same, same, THRESHOLDS, num_generated=4)
    assert result["cov_precision"] == 0.25 and result["cov_recall"] == 1.0


def test_nearest_distances_are_taken_separately_as_in_cdvae():
    """Reference r is recalled when some generated crystal is near in structure and some (maybe another) in composition."""
    reference_s, reference_c = points([0.0]), points([0.0])
    generated_s, generated_c = points([0.0], [9.0]), points([9.0], [0.0])
    assert coverage(generated_s, generated_c, reference_s, reference_c, THRESHOLDS)["cov_recall"] == 1.0


def crystal(index, density, num_elements, valid=True):
    return CrystalProperties(index, "X", 5, num_elements, density, valid, True, "", "")


def test_wasserstein_of_a_shifted_density_is_the_shift():
    reference = [crystal(i, d, 3) for i, d in enumerate([1.0, 2.0, 3.0, 4.0])]
    shifted = [crystal(i, d + 0.5, 3) for i, d in enumerate([1.0, 2.0, 3.0, 4.0])]
    distances = property_distances(shifted, reference)
    assert distances["wdist_density"] == pytest.approx(0.5)
    assert distances["wdist_num_elems"] == 0.0
    assert property_distances(reference, reference)["wdist_density"] == 0.0


def test_wasserstein_uses_valid_generated_crystals_only():
    reference = [crystal(0, 2.0, 2), crystal(1, 2.0, 4)]
    generated = [crystal(0, 2.0, 3), crystal(1, 100.0, 1, valid=False)]
    distances = property_distances(generated, reference)
    assert distances["wdist_density"] == 0.0
    assert distances["wdist_num_elems"] == pytest.approx(1.0)  # 3 against {2, 4}: each unit of mass moves 1


def test_composition_scaler_standardises_and_zeroes_nan():
    scaler = CompositionScaler(np.array([2.0, 5.0, 0.0]), np.array([1.0, 2.0, 1.0]))
    scaled = scaler.transform(points([1.0, 5.0, np.nan], [3.0, 9.0, np.nan]))
    assert np.allclose(scaled, [[-1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])


def test_compositions_are_standardised_with_cdvaes_fixed_statistics():
    """The published cut-offs (4, 10) are distances on CDVAE's scale, the same for every dataset."""
    from matminer.featurizers.composition.composite import ElementProperty
    from pymatgen.core import Composition

    scaler = CompositionScaler.published()
    assert scaler.means.shape == scaler.stds.shape == (132,) and (scaler.stds > 0).all()
    assert scaler.means[0] == pytest.approx(21.194441759304013) and scaler.stds[0] == pytest.approx(16.35781741152948)
    magpie = ElementProperty.from_preset("magpie")
    assert len(magpie.feature_labels()) == 132
    srtio3 = scaler.transform(np.array([magpie.featurize(Composition("SrTiO3"))], dtype=float))
    assert np.isfinite(srtio3).all() and np.abs(srtio3).max() < 10


def test_a_crystal_crystalnn_fails_on_is_not_valid(monkeypatch):
    """As the published evaluation: a structure whose fingerprint cannot be computed counts as invalid."""
    import equicsp.evaluation.generation_metrics as metrics

    class Failing:
        def featurize(self, structure, index):
            raise ValueError("no neighbours")

    srtio3 = CrystalArrays.of([38, 22, 8, 8, 8], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                                   [0, 0.5, 0.5]], [3.9, 3.9, 3.9], [90, 90, 90])
    assert describe((0, srtio3)).valid
    monkeypatch.setattr(metrics, "_featurizers", lambda: (Failing(), None))
    failed = describe((0, srtio3))
    assert failed.struct_valid and failed.comp_valid and not failed.valid
    assert "CrystalNN failed" in failed.fingerprint_problem
    assert validity_rates([failed])["valid"] == 0.0 and validity_rates([failed])["struct_valid"] == 1.0


def test_thresholds_are_cdvaes():
    assert thresholds_for("perov_5") == CoverageThresholds(0.2, 4.0)
    assert thresholds_for("carbon_24") == CoverageThresholds(0.2, 4.0)
    assert thresholds_for("mp_20") == CoverageThresholds(0.4, 10.0)


def test_test_set_against_itself(tiny_dataset):
    """Real CrystalNN and Magpie fingerprints: the tiny set against itself covers everything at distance 0."""
    from equicsp.evaluation.csp import ground_truth

    crystals = ground_truth(tiny_dataset, list(range(len(tiny_dataset))))
    described = [describe((i, c)) for i, c in enumerate(crystals)]
    assert all(d.structure_fp is not None and d.structure_fp.shape == (61,) for d in described)
    assert all(d.composition_fp.shape == (132,) and d.struct_valid for d in described)
    metrics = generation_metrics(described, described, THRESHOLDS)
    assert metrics["cov_recall"] == 1.0 and metrics["cov_precision"] == 1.0
    assert metrics["wdist_density"] == 0.0 and metrics["wdist_num_elems"] == 0.0
    assert metrics["struct_valid"] == 1.0


def test_broken_crystals_are_reported_not_raised():
    overlapping = CrystalArrays.of([8, 8], [[0, 0, 0], [0.01, 0, 0]], [4, 4, 4], [90, 90, 90])
    flat = CrystalArrays.of([8, 22], [[0, 0, 0], [0.5, 0.5, 0.5]], [4, 4, 4], [90, 90, 180])
    nan = CrystalArrays.of([8], [[math.nan, 0, 0]], [4, 4, 4], [90, 90, 90])
    results = [describe((i, c)) for i, c in enumerate((overlapping, flat, nan))]
    assert not any(r.struct_valid for r in results)
    assert "apart" in results[0].problem
    assert all(r.problem for r in results)
    assert results[1].structure_fp is None and results[1].fingerprint_problem
    assert results[2].structure_fp is None and "non-finite" in results[2].problem


def test_a_skewed_basis_is_fingerprinted_as_its_reduced_cell():
    """c' = c + 60 a (234 A) looks extreme but is SrTiO3's lattice: it gets SrTiO3's fingerprint, not none."""
    coords = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    plain = CrystalArrays.of([38, 22, 8, 8, 8], coords, [3.9, 3.9, 3.9], [90, 90, 90])
    skew = np.array([[1, 0, 0], [0, 1, 0], [60, 0, 1]])
    lattice = plain.to_structure().lattice
    skewed_lattice = type(lattice)(skew @ lattice.matrix)
    skewed = CrystalArrays.of(plain.atom_types, (coords @ np.linalg.inv(skew)) % 1, skewed_lattice.abc,
                              skewed_lattice.angles)
    expected, described = describe((0, plain)), describe((0, skewed))
    assert described.fingerprint_problem == "" and described.valid
    np.testing.assert_allclose(described.structure_fp, expected.structure_fp, atol=1e-6)
