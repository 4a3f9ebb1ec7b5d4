"""Padded batches (static shapes for compiled steps) give the eager path's losses, gradients and samples."""

import pytest
import torch
from conftest import FAST
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from equicsp.config import make_config
from equicsp.data.batches import DeviceCrystals, GraphSizes, round_down, round_up
from equicsp.data.crystals import random_crystals
from equicsp.engine.sampler import Sampler
from equicsp.engine.training import TrainingLoop
from equicsp.model.denoiser import CrystalGraph, build_denoiser
from equicsp.model.diffusion import Diffusion
from equicsp.model.noise import sample_keys
from equicsp.model.objective import Objective

ARMS = [("equicsp", "csp"), ("diffcsp", "csp"), ("frame_average", "csp"), ("no_com_free", "csp"),
        ("no_perm_loss", "csp"), ("equicsp", "generation")]


def small_config(preset: str, task: str = "csp", **overrides):
    return make_config("smoke", preset, {**FAST, "data.max_atoms": 12, "diffusion.task": task, **overrides})


@given(value=st.integers(1, 10**7), bits=st.integers(2, 6))
def test_buckets_round_up_by_at_most_their_granularity(value, bits):
    bucket = round_up(value, bits)
    assert value <= bucket <= value * (1 + 2 ** (1 - bits))
    assert round_up(bucket, bits) == bucket


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=300), spare=st.integers(1, 4))
def test_a_bucket_holds_its_batch(sizes, spare):
    exact, shape = GraphSizes.of(sizes), GraphSizes.bucket(sizes, len(sizes) + spare)
    assert shape.crystals > exact.crystals and shape.atoms > exact.atoms
    assert shape.edges >= exact.edges and shape.pairs >= exact.pairs
    assert shape.atoms <= (exact.atoms + 1) * 1.0625 and shape.edges <= exact.edges * 1.125


@given(value=st.integers(1, 10**7), bits=st.integers(2, 6))
def test_rounding_down_finds_the_grid_point_below(value, bits):
    below = round_down(value, bits)
    assert below <= value and round_up(below, bits) == below
    assert round_up(below + 1, bits) >= value


def test_batches_of_similar_sizes_share_a_bucket():
    shapes = {GraphSizes.bucket([5] * 250 + [4] * 6, 257), GraphSizes.bucket([5] * 251 + [4] * 4 + [6], 257)}
    assert len(shapes) == 1
    with pytest.raises(ValueError, match="room for more"):
        GraphSizes.bucket([5, 5], 2)


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=7), spare=st.integers(1, 3),
       seed=st.integers(0, 1000))
def test_a_padded_graph_holds_the_same_edges_and_pairs(sizes, spare, seed):
    data = random_crystals(sizes, seed)
    crystals = DeviceCrystals(data, "cpu")
    indices = list(range(len(sizes)))
    exact, padded = crystals.batch(indices), crystals.batch(indices, capacity=len(sizes) + spare)
    plain = CrystalGraph.fully_connected(exact.num_atoms, exact.sizes)
    graph = CrystalGraph.fully_connected(padded.num_atoms, padded.sizes, padded.real)
    edges, pairs = exact.sizes.edges, exact.sizes.pairs
    for name in ("source", "target"):
        assert torch.equal(getattr(graph, name)[:edges], getattr(plain, name))
        assert (getattr(graph, name)[edges:] == padded.sizes.atoms - 1).all()
    for name in ("pair_source", "pair_target"):
        assert torch.equal(getattr(graph, name)[:pairs], getattr(plain, name))
    # The slots point into a table of 2 P' + 1 rows instead of 2 P + 1: the same pair, sign and self edge.
    slots, padded_slots = plain.edge_slot, graph.edge_slot[:edges]
    moved = torch.where(slots >= pairs, slots - pairs + padded.sizes.pairs, slots)
    moved = torch.where(slots == 2 * pairs, 2 * padded.sizes.pairs, moved)
    assert torch.equal(padded_slots, moved)
    assert padded.real.sum() == len(sizes) and padded.real_atoms.sum() == sum(sizes)
    assert padded.atom_types.shape[0] == padded.sizes.atoms and padded.lengths.shape[0] == padded.sizes.crystals


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6), spare=st.integers(1, 3),
       arm=st.sampled_from(ARMS), seed=st.integers(0, 1000), step=st.integers(0, 50))
def test_a_padded_batch_gives_the_same_losses_and_gradients(sizes, spare, arm, seed, step):
    config = small_config(*arm)
    torch.manual_seed(seed)
    model = build_denoiser(config)
    objective = Objective(Diffusion(config), model)
    crystals = DeviceCrystals(random_crystals(sizes, seed), "cpu")
    indices = list(range(len(sizes)))
    results = []
    for batch in (crystals.batch(indices), crystals.batch(indices, capacity=len(sizes) + spare)):
        model.zero_grad(set_to_none=True)
        loss = objective(batch, seed=seed, step=step)
        loss.total.backward()
        results.append(({name: getattr(loss, name).detach() for name in loss.names},
                        {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (exact_loss, exact_grads), (padded_loss, padded_grads) = results
    for name, value in exact_loss.items():
        torch.testing.assert_close(padded_loss[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert exact_grads.keys() == padded_grads.keys()
    for name, grad in exact_grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
        assert torch.isfinite(padded_grads[name]).all()


def test_a_step_given_as_a_tensor_draws_the_same_noise():
    config = small_config("equicsp")
    diffusion = Diffusion(config)
    batch = DeviceCrystals(random_crystals([3, 7, 1]), "cpu").batch([0, 1, 2])
    as_int, as_tensor = diffusion.noise(batch, 5, 17), diffusion.noise(batch, 5, torch.tensor(17))
    for name in ("timesteps", "lattice", "lattice_noise", "frac_coords"):
        assert torch.equal(getattr(as_int, name), getattr(as_tensor, name)), name


class RecordedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.integers(1, 4))
def test_padding_a_batch_makes_no_tensor_from_host_values(sizes, spare):
    """A tensor made from host values (`counts[-1] = n` was one) is a host-to-device copy that waits for the GPU:
    on an H100 it cost a sync per training batch, and the training loop ran at 29 % of its step's rate."""
    crystals = DeviceCrystals(random_crystals(sizes), "cpu")
    indices = list(range(len(sizes)))[::-1]
    index = torch.tensor(indices)
    with RecordedOps() as ops:
        padded = crystals.batch(indices, len(sizes) + spare, index)
    assert "lift_fresh" not in ops.names and "copy_" not in ops.names
    assert padded.num_atoms.tolist()[:len(sizes)] == [sizes[i] for i in indices]
    assert padded.num_atoms.sum() == padded.sizes.atoms and padded.num_atoms[len(sizes):-1].eq(0).all()


def test_a_padded_training_epoch_makes_tensors_from_host_values_once(monkeypatch):
    """The compiled path's epoch (padded batches, the step as a device tensor), with eager kernels: besides the
    epoch's index upload (page-locked, not waited for), any tensor made from host values is a copy that waits for
    the GPU (the crystal count in the read-back was one; it is filled on the device now)."""
    monkeypatch.setattr("equicsp.engine.compiled.compile_step", lambda function, *args, **kwargs: function)
    config = make_config("smoke", "equicsp", {**FAST, "optim.batch_size": 3, "run.compile": "on"})
    loop = TrainingLoop(config, random_crystals([3, 5, 2, 7, 4, 6, 1, 2, 3, 4]), random_crystals([3, 4], seed=1),
                        torch.device("cpu"), show_progress=False)
    assert loop.capacity == 4 and loop.losses.compiled
    loop.train_epoch()
    with RecordedOps() as ops:
        loop.train_epoch()
    assert ops.names.count("lift_fresh") == 1


def loop_of(seed: int = 0) -> TrainingLoop:
    config = make_config("smoke", "equicsp", {**FAST, "optim.batch_size": 3, "run.seed": seed})
    return TrainingLoop(config, random_crystals([3, 5, 2, 7, 4, 6, 1]), random_crystals([3, 4, 2, 5], seed=1),
                        torch.device("cpu"), show_progress=False)


def test_an_epoch_reads_its_losses_back_once(monkeypatch):
    """Each read-back waits for the GPU to finish its queue, which then idles while the host prepares the next
    work: training and validation losses come back together (they came back apart)."""
    loop = loop_of()
    copies = []
    to_host = torch.Tensor.cpu

    def counted(tensor, *args, **kwargs):
        copies.append(tuple(tensor.shape))
        return to_host(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    loop.step_epoch()
    assert len(copies) == 1


class HostSyncs(TorchDispatchMode):
    """What would wait for a GPU, counted on a CPU: a tensor made from host values (a blocking copy from pageable
    memory) outside `batches.upload` (page-locked, queued behind the work), a value read back (`.item()`, `float(t)`,
    `bool(t)`), an op whose output size depends on values, and a copy to the host (`.cpu()`, patched in).
    Paused in the optimiser's step: on a GPU the loop's Adam is fused (the CPU one reads its step counts back), and
    the benchmark's bare-step check covers it there."""

    SYNCING = {"lift_fresh", "_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
               "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if not self.paused and name in self.SYNCING:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    def paused_in(self, function):
        def paused(*args, **kwargs):
            was, self.paused = self.paused, True
            try:
                return function(*args, **kwargs)
            finally:
                self.paused = was
        return paused


def test_an_epoch_with_validation_makes_at_most_two_host_syncs(monkeypatch):
    """At most 2 an epoch (benchmarks/gpu.py counts them on a GPU with torch.cuda.set_sync_debug_mode): an epoch of
    the loop, training and validation, on the compiled path's padded batches (here with eager kernels; the eager
    path passes the step as a Python int: the keyed noise makes its salt from it, 4 tensors a batch). One is needed:
    the losses' read-back."""
    import equicsp.data.batches as batches

    monkeypatch.setattr("equicsp.engine.compiled.compile_step", lambda function, *args, **kwargs: function)
    config = make_config("smoke", "equicsp", {**FAST, "optim.batch_size": 3, "run.compile": "on"})
    loop = TrainingLoop(config, random_crystals([3, 5, 2, 7, 4, 6, 1, 2, 3, 4]), random_crystals([3, 4, 5], seed=1),
                        torch.device("cpu"), show_progress=False)
    assert loop.losses.compiled
    loop.step_epoch()
    syncs = HostSyncs()
    monkeypatch.setattr(batches, "upload", syncs.paused_in(batches.upload))
    monkeypatch.setattr(loop.optimizer, "step", syncs.paused_in(loop.optimizer.step))
    to_host = torch.Tensor.cpu

    def copied(tensor, *args, **kwargs):
        syncs.seen.append("cpu")
        return to_host(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", copied)
    with syncs:
        loop.step_epoch()
    assert len(syncs.seen) <= 2, syncs.seen
    assert syncs.seen.count("cpu") == 1


def test_one_read_back_gives_each_pass_its_own_metrics():
    together, apart = loop_of(), loop_of()
    epoch = together.step_epoch()
    passes = {**apart.train_epoch(), **apart.validate()}
    for name in together.objective.loss_names:
        for prefix in ("train", "val"):
            assert epoch[f"{prefix}_{name}"] == passes[f"{prefix}_{name}"], (prefix, name)
    assert epoch["train_total"] != epoch["val_total"]
    assert epoch["crystals_per_s"] > 0 and epoch["epoch_time_s"] > 0


def test_a_sampling_run_makes_tensors_from_host_values_only_to_start():
    """Its layout, keys and timesteps go to the device once; a step that made a tensor from host values (the keyed
    noise's salt did, three times a step) would wait for the GPU each time."""
    made = {}
    for steps in (2, 5):
        config = make_config("smoke", "equicsp", {**FAST, "diffusion.timesteps": 5, "sampler.num_steps": steps})
        sampler = Sampler(build_denoiser(config), Diffusion(config), config)
        sampler.compiled = True  # the compiled path's padding, with eager kernels
        keys = sample_keys(torch.tensor([0, 1]), torch.tensor([0, 0]))
        sampler.sample_batch(torch.tensor([8, 8, 8, 22, 38, 6, 6]), [5, 2], keys, seed=0)  # constants made once
        with RecordedOps() as ops:
            sampler.sample_batch(torch.tensor([8, 8, 8, 22, 38, 6, 6]), [5, 2], keys, seed=0)
        made[steps] = ops.names.count("lift_fresh")
    assert made[2] == made[5]
