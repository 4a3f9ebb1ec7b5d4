"""Batches cut on the device: the same crystals as PyG's collation, and steps that never ask the device for a size."""

import torch
from conftest import FAST, FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode
from torch_geometric.loader import DataLoader

from equicsp.config import make_config
from equicsp.data.batches import DeviceCrystals, GraphSizes
from equicsp.data.crystals import load_crystals
from equicsp.engine.sampler import Sampler
from equicsp.model.denoiser import CrystalGraph, build_denoiser, triangle_pair
from equicsp.model.diffusion import Diffusion
from equicsp.model.noise import sample_keys
from equicsp.model.objective import Objective


@settings(max_examples=20, deadline=None)
@given(indices=st.lists(st.integers(0, 7), min_size=1, max_size=12))
def test_a_device_batch_holds_what_pyg_collation_gives(indices):
    tiny_dataset = load_crystals(FIXTURES / "perov_tiny.csv", show_progress=False)
    batch = DeviceCrystals(tiny_dataset, "cpu").batch(indices)
    reference = next(iter(DataLoader(torch.utils.data.Subset(tiny_dataset, indices), batch_size=len(indices))))
    for name in ("atom_types", "frac_coords", "lengths", "angles", "num_atoms", "batch", "crystal_id"):
        assert torch.equal(getattr(batch, name), getattr(reference, name)), name
    counts = reference.num_atoms.tolist()
    assert batch.sizes == GraphSizes(len(counts), sum(counts), sum(n * n for n in counts),
                                      sum(n * (n - 1) // 2 for n in counts))


def test_pairs_numbered_by_arithmetic_are_every_pair_once():
    i, j = triangle_pair(torch.arange(60 * 59 // 2))
    pairs = list(zip(i.tolist(), j.tolist()))
    assert pairs == [(a, b) for b in range(60) for a in range(b)]
    counts = torch.tensor([1, 4, 3, 7])
    with_sizes = CrystalGraph.fully_connected(counts, GraphSizes.of(counts))
    without = CrystalGraph.fully_connected(counts)
    for name in ("source", "target", "edge_crystal", "pair_source", "pair_target", "edge_slot"):
        assert torch.equal(getattr(with_sizes, name), getattr(without, name)), name


def data_dependent_ops_are_refused():
    """Under a fake-tensor mode an op whose result's size or value must be read back (.item(), nonzero,
    repeat_interleave without output_size, a mask index) raises: on a GPU each would stall the step."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def test_a_training_step_never_reads_a_size_or_value_back(tiny_dataset):
    for preset, task in (("equicsp", "csp"), ("diffcsp", "csp"), ("frame_average", "csp"), ("no_com_free", "csp"),
                         ("equicsp", "generation")):
        config = make_config("smoke", preset, {**FAST, "diffusion.task": task})
        model = build_denoiser(config)
        objective = Objective(Diffusion(config), model)
        crystals = DeviceCrystals(tiny_dataset, "cpu")
        for capacity, step in ((None, 1), (6, torch.tensor(1))):  # eager, and as a compiled step sees it (padded)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # its step counts live in one fake mode
            with data_dependent_ops_are_refused():
                batch = crystals.batch([0, 3, 5, 6], capacity)
                loss = objective(batch, seed=0, step=step)
                optimizer.zero_grad(set_to_none=True)
                loss.total.backward()
                torch.nn.utils.clip_grad_value_(model.parameters(), 0.5)
                optimizer.step()
                first_bad = torch.where(~torch.isfinite(loss.total.detach()), 1, torch.zeros((), dtype=torch.long))
            assert first_bad.shape == ()


def test_sampling_never_reads_a_size_or_value_back():
    for padded in (False, True):  # eager, and padded to a bucket as a compiled step runs it (here with eager kernels)
        for preset in ("equicsp", "diffcsp"):
            config = make_config("smoke", preset, {**FAST, "diffusion.timesteps": 3})
            sampler = Sampler(build_denoiser(config), Diffusion(config), config)
            sampler.compiled = padded
            keys = sample_keys(torch.tensor([0, 1]), torch.tensor([0, 0]))
            with data_dependent_ops_are_refused():
                x, lattice = sampler.sample_batch(torch.tensor([8, 8, 8, 22, 38, 6, 6]), [5, 2], keys, seed=0)
            assert x.shape == (7, 3) and lattice.shape[0] == 2
        config = make_config("smoke", "equicsp", {**FAST, "diffusion.timesteps": 3, "diffusion.task": "generation"})
        sampler = Sampler(build_denoiser(config), Diffusion(config), config)
        sampler.compiled = padded
        with data_dependent_ops_are_refused():
            types, x, lattice = sampler.generate_batch([5, 2], sample_keys(torch.tensor([0, 1]), torch.tensor([0, 0])), 0)
        assert types.shape == (7,)
    assert types.shape == (7,)
