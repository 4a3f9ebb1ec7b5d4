import numpy as np
import torch
from conftest import random_batch
from pymatgen.core import Lattice, Structure

from equicsp.model.lattice import (
    AXIS_PERMUTATIONS,
    LATTICE_REPRESENTATIONS,
    inverse_permutation_index,
    lattice_matrix,
    matrix_lengths_angles,
    permute_columns,
    permute_lattice,
    project_lattice,
    unproject_lattice,
)


def test_projection_round_trip_and_any_point_is_a_valid_lattice():
    batch = random_batch([3, 4, 5])
    lengths, angles = unproject_lattice(project_lattice(batch.lengths, batch.angles))
    torch.testing.assert_close(lengths, batch.lengths)
    torch.testing.assert_close(angles, batch.angles)
    anywhere = 5 * torch.randn(100, 6, dtype=torch.float64)
    lengths, angles = unproject_lattice(anywhere)
    assert (lengths > 0).all() and (angles > 0).all() and (angles < 180).all()


def test_inverse_permutation_undoes_each_permutation():
    index = torch.arange(6)
    lattice = torch.randn(6, 6)
    back = permute_lattice(permute_lattice(lattice, index), inverse_permutation_index(index))
    torch.testing.assert_close(back, lattice)


def test_a_permuted_crystal_is_the_same_crystal():
    """(a, b, c), (alpha, beta, gamma) and the X columns permuted together keep every distance."""
    batch = random_batch([4] * 6, seed=3)
    permutation = torch.arange(6)
    lattice = project_lattice(batch.lengths, batch.angles)
    lengths, angles = unproject_lattice(permute_lattice(lattice, permutation))
    coords = permute_columns(batch.frac_coords, permutation, batch.batch)
    for crystal in range(6):
        atoms = batch.batch == crystal
        original = Structure(Lattice.from_parameters(*batch.lengths[crystal].tolist(), *batch.angles[crystal].tolist()),
                             ["Si"] * 4, batch.frac_coords[atoms].numpy())
        permuted = Structure(Lattice.from_parameters(*lengths[crystal].tolist(), *angles[crystal].tolist()),
                             ["Si"] * 4, coords[atoms].numpy())
        np.testing.assert_allclose(permuted.distance_matrix, original.distance_matrix, atol=1e-8)


def test_identity_comes_first_and_all_six_orders_are_distinct():
    assert AXIS_PERMUTATIONS[0].tolist() == [0, 1, 2]
    assert len({tuple(p) for p in AXIS_PERMUTATIONS.tolist()}) == 6


def test_lattice_matrix_has_the_cells_metric_and_reads_back():
    batch = random_batch([1] * 64, seed=3)
    matrix = lattice_matrix(batch.lengths, batch.angles)
    for row in range(64):
        reference = Lattice.from_parameters(*batch.lengths[row].tolist(), *batch.angles[row].tolist()).matrix
        np.testing.assert_allclose((matrix[row] @ matrix[row].T).numpy(), reference @ reference.T, rtol=1e-9, atol=1e-9)
    lengths, angles = matrix_lengths_angles(matrix)
    torch.testing.assert_close(lengths, batch.lengths)
    torch.testing.assert_close(angles, batch.angles)


def test_representations_encode_and_decode_the_same_cell():
    batch = random_batch([1] * 16, seed=4)
    for representation in LATTICE_REPRESENTATIONS.values():
        encoded = representation.encode(batch.lengths, batch.angles)
        assert encoded.shape == (16, representation.dim)
        lengths, angles = representation.decode(encoded)
        torch.testing.assert_close(lengths, batch.lengths)
        torch.testing.assert_close(angles, batch.angles)


def test_physical_clamp_leaves_physical_cells_and_bounds_the_rest():
    batch = random_batch([1] * 16, seed=5)
    for representation in LATTICE_REPRESENTATIONS.values():
        encoded = representation.encode(batch.lengths, batch.angles)
        torch.testing.assert_close(representation.clamp_physical(encoded), encoded)
        wild = 1e3 * torch.randn(16, representation.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        lengths, _ = representation.decode(representation.clamp_physical(wild))
        assert (lengths >= 1 - 1e-9).all() and (lengths <= 100 + 1e-9).all(), representation.name
