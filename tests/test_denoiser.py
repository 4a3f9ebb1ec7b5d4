import math
from dataclasses import replace

import pytest
import torch
from conftest import random_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_geometric.utils import scatter

from equicsp.config import ModelConfig
from equicsp.model.denoiser import CrystalGraph, CSPNet, FrameAveraged, sinusoidal_embedding
from equicsp.model.lattice import (
    LATTICE_REPRESENTATIONS,
    lattice_matrix,
    matrix_lengths_angles,
    permute_columns,
    permute_lattice,
    project_lattice,
)
from equicsp.model.schedules import wrap

SMALL = ModelConfig(num_layers=2, hidden_dim=32, num_freqs=8, time_dim=16)


def inputs(counts, seed=0):
    batch = random_batch(counts, seed, dtype=torch.float64)
    lattice = project_lattice(batch.lengths, batch.angles)
    timesteps = torch.randint(1, 1000, (len(counts),), generator=torch.Generator().manual_seed(seed))
    return batch, lattice, timesteps


def run(model, batch, lattice, timesteps, coords=None, types=None):
    return model(batch.atom_types if types is None else types, batch.frac_coords if coords is None else coords,
                 lattice, timesteps, batch.batch, batch.num_atoms)


def network(seed=0, config=SMALL):
    torch.manual_seed(seed)
    return CSPNet(config).double()


def test_edges_are_all_ordered_pairs_of_each_crystal():
    counts = torch.tensor([1, 3, 2])
    graph = CrystalGraph.fully_connected(counts)
    expected = {(i, j) for start, n in ((0, 1), (1, 3), (4, 2)) for i in range(start, start + n) for j in range(start, start + n)}
    assert set(zip(graph.source.tolist(), graph.target.tolist())) == expected
    assert len(graph.source) == len(expected)
    assert set(zip(graph.pair_source.tolist(), graph.pair_target.tolist())) == {(i, j) for i, j in expected if i < j}


def naive_forward(model: CSPNet, atom_types, frac_coords, lattice, timesteps, batch, num_atoms):
    """The CSPNet of docs/method.md#denoiser written the direct way: per-edge features and one concatenated Linear."""
    graph = CrystalGraph.fully_connected(num_atoms)
    k = torch.arange(model.config.num_freqs, dtype=frac_coords.dtype)
    time = sinusoidal_embedding(timesteps, model.config.time_dim).to(frac_coords.dtype)[batch]
    h = model.input_mlp(torch.cat([model.atom_embedding(atom_types), time], -1))
    distance = wrap(frac_coords[graph.target] - frac_coords[graph.source])
    angles = (2 * math.pi * distance[:, :, None] * k).flatten(1)
    fourier = torch.cat([angles.sin(), angles.cos()], -1)
    for layer in model.layers:
        normed = layer.norm(h)
        weight = torch.cat([layer.edge_source.weight, layer.edge_target.weight, layer.edge_lattice.weight,
                            layer.edge_fourier.weight], 1)
        edge_in = torch.cat([normed[graph.source], normed[graph.target], lattice[graph.edge_crystal], fourier], -1)
        messages = layer.edge_out(edge_in @ weight.T + layer.edge_source.bias)
        aggregated = scatter(messages, graph.source, 0, dim_size=h.shape[0], reduce="mean")
        node_weight = torch.cat([layer.node_self.weight, layer.node_messages.weight], 1)
        h = h + layer.node_out(torch.cat([normed, aggregated], -1) @ node_weight.T + layer.node_self.bias)
    h = model.final_norm(h)
    pooled = scatter(h, batch, 0, dim_size=num_atoms.shape[0], reduce="mean")
    return model.lattice_head(pooled), model.coord_head(h), model.score_head(h)


@pytest.mark.parametrize("counts", [[1, 4, 7, 2], [5, 5, 5]])  # mixed sizes, and the equal-size fast path
def test_fast_forward_equals_the_direct_formula(counts):
    model = network()
    batch, lattice, timesteps = inputs(counts)
    fast = run(model, batch, lattice, timesteps)
    lattice_out, coord_out, score_out = naive_forward(model, batch.atom_types, batch.frac_coords, lattice, timesteps,
                                                      batch.batch, batch.num_atoms)
    torch.testing.assert_close(fast.lattice_noise, lattice_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.coord_noise, coord_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.coord_score, score_out, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(1, 7), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_output_follows_the_atom_order(counts, seed):
    """Reordering atoms inside crystals reorders the per-atom outputs and leaves the lattice output."""
    model = network()
    batch, lattice, timesteps = inputs(counts, seed)
    out = run(model, batch, lattice, timesteps)
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(seed + i)) + start
                       for i, (start, n) in enumerate(zip(torch.cumsum(batch.num_atoms, 0) - batch.num_atoms, counts))])
    shuffled = run(model, batch, lattice, timesteps, coords=batch.frac_coords[order], types=batch.atom_types[order])
    torch.testing.assert_close(shuffled.lattice_noise, out.lattice_noise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled.coord_score, out.coord_score[order], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled.coord_noise, out.coord_noise[order], rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000))
def test_output_is_invariant_to_periodic_translation(seed):
    model = network()
    batch, lattice, timesteps = inputs([3, 5], seed)
    shift = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))[batch.batch]
    out = run(model, batch, lattice, timesteps)
    moved = run(model, batch, lattice, timesteps, coords=wrap(batch.frac_coords + shift))
    torch.testing.assert_close(moved.coord_score, out.coord_score, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved.lattice_noise, out.lattice_noise, rtol=1e-4, atol=1e-5)


def permuted_outputs(model, batch, lattice, timesteps, permutation):
    per_crystal = permutation.expand(batch.num_atoms.shape[0])
    out = run(model, batch, lattice, timesteps)
    moved = run(model, batch, permute_lattice(lattice, per_crystal), timesteps,
                coords=permute_columns(batch.frac_coords, per_crystal, batch.batch))
    expected_lattice = permute_lattice(out.lattice_noise, per_crystal)
    expected_score = permute_columns(out.coord_score, per_crystal, batch.batch)
    return moved, expected_lattice, expected_score


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), permutation=st.integers(1, 5))
def test_frame_average_is_exactly_permutation_equivariant(seed, permutation):
    model = FrameAveraged(network(seed))
    batch, lattice, timesteps = inputs([2, 5, 3], seed)
    moved, expected_lattice, expected_score = permuted_outputs(model, batch, lattice, timesteps, torch.tensor(permutation))
    torch.testing.assert_close(moved.lattice_noise, expected_lattice, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved.coord_score, expected_score, rtol=1e-4, atol=1e-5)


def test_plain_cspnet_is_not_permutation_equivariant():
    model = network()
    batch, lattice, timesteps = inputs([2, 5, 3])
    for permutation in range(1, 6):
        moved, expected_lattice, _ = permuted_outputs(model, batch, lattice, timesteps, torch.tensor(permutation))
        assert (moved.lattice_noise - expected_lattice).abs().max() > 1e-3


def random_orthogonal(seed: int) -> torch.Tensor:
    """(3, 3) a random rotation, or a rotation and a reflection, in float64."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=generator))
    return q * torch.sign(torch.diagonal(r))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000))
def test_the_matrix_lattice_branch_is_o3_invariant_and_equivariant(seed):
    """DiffCSP's branch: rotating or reflecting the cell (L -> L Q) leaves the coordinate outputs and rotates eps_hat_L."""
    torch.manual_seed(seed)
    matrix = LATTICE_REPRESENTATIONS["matrix"]
    model = CSPNet(SMALL, matrix).double()
    batch, _, timesteps = inputs([2, 4, 1], seed)
    lattice = matrix.encode(batch.lengths, batch.angles)
    q = random_orthogonal(seed)
    rotated = (lattice.view(-1, 3, 3) @ q).flatten(1)
    out, moved = run(model, batch, lattice, timesteps), run(model, batch, rotated, timesteps)
    torch.testing.assert_close(moved.coord_score, out.coord_score, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(moved.coord_noise, out.coord_noise, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(moved.lattice_noise.view(-1, 3, 3), out.lattice_noise.view(-1, 3, 3) @ q,
                               rtol=1e-6, atol=1e-8)


def test_the_projected_branch_sees_the_cell_through_its_parameters_only():
    """Rotating a cell does not change its projected parameters, so the EquiCSP branch is O(3)-invariant by construction."""
    batch, _, _ = inputs([3])
    projected = LATTICE_REPRESENTATIONS["projected"]
    matrix = lattice_matrix(batch.lengths, batch.angles) @ random_orthogonal(0)
    lengths, angles = matrix_lengths_angles(matrix)
    torch.testing.assert_close(projected.encode(lengths, angles), projected.encode(batch.lengths, batch.angles))


def test_context_mean_adds_each_crystals_mean_to_the_coordinate_heads():
    """The MPTS-52 network: the same weights give the plain outputs plus their per-crystal mean."""
    plain = network(3)
    with_mean = network(3, replace(SMALL, context_mean=True))
    batch, lattice, timesteps = inputs([2, 5, 1], 3)
    out, mean_out = run(plain, batch, lattice, timesteps), run(with_mean, batch, lattice, timesteps)
    for name in ("coord_noise", "coord_score"):
        value = getattr(out, name)
        expected = value + scatter(value, batch.batch, dim=0, reduce="mean")[batch.batch]
        torch.testing.assert_close(getattr(mean_out, name), expected)
    torch.testing.assert_close(mean_out.lattice_noise, out.lattice_noise)


@pytest.mark.parametrize("lattice", ["projected", "matrix"])
def test_split_linears_start_as_the_reference_codes_one_linear_on_the_concatenation(lattice):
    """phi_m's first Linear (h_i, h_j, f(l), FT) and phi_h's (h_i, mean m) are split here, but initialised as one
    Linear on the concatenated input is: uniform in +-1/sqrt(whole fan-in), weights and biases alike."""
    representation = LATTICE_REPRESENTATIONS[lattice]
    config = ModelConfig(num_layers=1, hidden_dim=256, num_freqs=128, time_dim=16)
    torch.manual_seed(0)
    layer = CSPNet(config, representation).layers[0]
    edge_fan_in = 2 * 256 + representation.feature_dim + 6 * 128
    groups = {edge_fan_in: (layer.edge_source, layer.edge_target, layer.edge_lattice, layer.edge_fourier),
              2 * 256: (layer.node_self, layer.node_messages)}
    for fan_in, parts in groups.items():
        bound = 1 / math.sqrt(fan_in)
        for part in parts:
            for values in (part.weight, part.bias) if part.bias is not None else (part.weight,):
                assert values.abs().max() <= bound
                # uniform on +-bound: standard deviation bound / sqrt(3), within sampling error
                assert abs(values.std().item() * math.sqrt(3) / bound - 1) < 0.15
