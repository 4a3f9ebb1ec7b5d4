"""Reducing each crystal once gives StructureMatcher.get_rms_dist's decisions and rms exactly."""

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from equicsp.evaluation.matching import best_of_k, reduce_for_matching, rms_dist

FIXTURES = Path(__file__).parent / "fixtures"
TOLERANCES = dict(stol=0.5, angle_tol=10, ltol=0.3)  # matching.MATCHER_TOLERANCES


def read_structures(name: str) -> list[Structure]:
    with open(FIXTURES / name, newline="") as handle:
        return [Structure.from_str(row["cif"], fmt="cif") for row in csv.DictReader(handle)]


def perturbed(structure: Structure, rng: np.random.Generator, coords: float, cell: float) -> Structure:
    """Noise on the fractional coordinates and the cell, atoms in a random order."""
    lengths = np.array(structure.lattice.abc) * (1 + cell * rng.standard_normal(3))
    angles = np.array(structure.lattice.angles) + 100 * cell * rng.standard_normal(3)
    order = rng.permutation(len(structure))
    frac = (structure.frac_coords + coords * rng.standard_normal(structure.frac_coords.shape)) % 1.0
    return Structure(Lattice.from_parameters(*lengths, *angles), [structure.species[i] for i in order], frac[order])


def samples_for(truth: Structure, others: list[Structure], rng: np.random.Generator) -> list[Structure]:
    """Near and far copies, the same crystal in another cell and a supercell, and the other crystals of the file."""
    near_and_far = [perturbed(truth, rng, level, level / 2) for level in (0.0, 0.01, 0.03, 0.08, 0.15) for _ in range(2)]
    other_cell = truth.copy()
    other_cell.make_supercell([[1, 1, 0], [0, 1, 0], [0, 0, 1]])  # the same lattice, another basis
    supercell = perturbed(truth, rng, 0.01, 0.005)
    supercell.make_supercell([2, 1, 1])
    return near_and_far + [other_cell, supercell] + others


@pytest.fixture(scope="module")
def pairs() -> list[tuple[Structure, Structure]]:
    """(sample, ground truth) pairs: 19 for each of 8 Carbon-24 and 8 Perov-5 crystals."""
    rng = np.random.default_rng(0)
    pairs = []
    for name in ("carbon_tiny.csv", "perov_tiny.csv"):
        crystals = read_structures(name)
        for i, truth in enumerate(crystals):
            pairs += [(sample, truth) for sample in samples_for(truth, crystals[:i] + crystals[i + 1:], rng)]
    return pairs


def test_reducing_each_crystal_once_gives_get_rms_dists_decisions_and_rms_bit_for_bit(pairs):
    matcher = StructureMatcher(**TOLERANCES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = [matcher.get_rms_dist(sample, truth) for sample, truth in pairs]
        reduced_truths = {}
        once = []
        for sample, truth in pairs:
            target = reduced_truths.setdefault(id(truth), reduce_for_matching(matcher, truth))
            once.append(rms_dist(matcher, reduce_for_matching(matcher, sample), target))
    assert len(pairs) >= 300
    matched = sum(answer is not None for answer in plain)
    assert 0.3 * len(pairs) < matched < 0.7 * len(pairs), "the pairs should exercise both decisions"
    assert once == plain


def test_a_matcher_that_tries_supercells_still_agrees(pairs):
    matcher = StructureMatcher(**TOLERANCES, attempt_supercell=True)
    some = pairs[:19] + pairs[-19:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = [matcher.get_rms_dist(sample, truth) for sample, truth in some]
        once = [rms_dist(matcher, reduce_for_matching(matcher, sample), reduce_for_matching(matcher, truth))
                for sample, truth in some]
    assert once == plain


def test_best_of_k_keeps_the_smallest_rms_and_the_first_of_equals_and_skips_missing_samples():
    truth = read_structures("perov_tiny.csv")[0]
    rng = np.random.default_rng(1)
    far, near = perturbed(truth, rng, 0.03, 0.01), perturbed(truth, rng, 0.005, 0.0)
    matcher = StructureMatcher(**TOLERANCES)
    rms, index = best_of_k(matcher, truth, [None, far, near, near.copy()])
    assert index == 2 and rms == matcher.get_rms_dist(near, truth)[0] < matcher.get_rms_dist(far, truth)[0]
    assert best_of_k(matcher, truth, [None, read_structures("perov_tiny.csv")[1]]) == (None, -1)
