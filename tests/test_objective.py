import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from equicsp.config import OBJECTIVE_PRESETS, make_config
from equicsp.data.batches import DeviceCrystals
from equicsp.data.crystals import random_crystals
from equicsp.model.denoiser import CSPNet, build_denoiser
from equicsp.model.diffusion import Diffusion
from equicsp.model.objective import Objective

SMALL = {"model.num_layers": 2, "model.hidden_dim": 32, "model.num_freqs": 8, "model.time_dim": 16}


def batch_of(dataset, indices: list[int] | None = None):
    return DeviceCrystals(dataset, "cpu").batch(list(range(len(dataset))) if indices is None else indices)


@pytest.mark.parametrize("preset", sorted(OBJECTIVE_PRESETS))
def test_every_table2_row_gives_finite_losses_and_gradients(preset, tiny_dataset):
    config = make_config("smoke", preset, SMALL)
    model = build_denoiser(config)
    diffusion = Diffusion(config)
    assert (diffusion.tables is None) == (not config.objective.com_free_noise)
    loss = Objective(diffusion, model)(batch_of(tiny_dataset), seed=0, step=1)
    loss.total.backward()
    assert torch.isfinite(loss.total)
    assert (float(loss.perm.detach()) > 0) == config.objective.perm_loss
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_frame_averaged_model_has_zero_permutation_loss(tiny_dataset):
    config = make_config("smoke", "frame_average", SMALL)
    torch.manual_seed(0)
    averaged = build_denoiser(config)
    plain = CSPNet(config.model)
    plain.load_state_dict(averaged.network.state_dict())
    with_perm = make_config("smoke", "equicsp", SMALL)
    diffusion = Diffusion(with_perm)
    batch = batch_of(tiny_dataset)
    averaged_loss = Objective(diffusion, averaged)(batch, seed=1, step=1)
    plain_loss = Objective(diffusion, plain)(batch, seed=1, step=1)
    assert float(averaged_loss.perm) < 1e-9
    assert float(plain_loss.perm) > 1e-3


def test_noise_is_keyed_by_crystal_not_by_batch(tiny_dataset):
    """A crystal's t and noise depend on (seed, step, its dataset index): any batch split gives the same."""
    config = make_config("smoke", "equicsp", SMALL)
    diffusion = Diffusion(config)
    whole = diffusion.noise(batch_of(tiny_dataset), seed=5, step=3)
    half = diffusion.noise(batch_of(tiny_dataset, list(range(4, 8))), seed=5, step=3)
    torch.testing.assert_close(half.timesteps, whole.timesteps[4:])
    torch.testing.assert_close(half.targets.coord_score, whole.targets.coord_score[20:])
    assert whole.frac_coords.min() >= 0 and whole.frac_coords.max() < 1
    other = diffusion.noise(batch_of(tiny_dataset), seed=5, step=4)
    assert not torch.equal(other.targets.coord_score, whole.targets.coord_score)


@pytest.mark.parametrize("trained, sampled", [("equicsp", "no_pm"), ("no_vm", "no_pm_vm")])
def test_arms_differing_only_in_the_pm_correction_train_identically(trained, sampled, tiny_dataset):
    """What lets a sweep train such arms once: the same losses and gradients, bit for bit."""
    losses = []
    for preset in (trained, sampled):
        config = make_config("smoke", preset, SMALL)
        torch.manual_seed(0)
        model = build_denoiser(config)
        loss = Objective(Diffusion(config), model)(batch_of(tiny_dataset), seed=2, step=3)
        loss.total.backward()
        losses.append((loss.as_floats(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert losses[0][0] == losses[1][0]
    assert all(torch.equal(a, b) for a, b in zip(losses[0][1], losses[1][1]))


@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4), arm=st.sampled_from(["equicsp", "frame_average"]))
def test_a_training_steps_matmul_work_grows_in_proportion_to_the_batch(sizes, arm):
    """benchmarks/gpu.py counts a step's FLOPs on a few crystals and scales the count to the batch."""
    config = make_config("smoke", arm, SMALL)
    torch.manual_seed(0)
    model = build_denoiser(config)
    objective = Objective(Diffusion(config), model)

    def work(counts):
        batch = DeviceCrystals(random_crystals(counts), torch.device("cpu")).batch(list(range(len(counts))))
        with FlopCounterMode(display=False) as counter:
            objective(batch, seed=0, step=1).total.backward()
        return counter.get_total_flops()

    assert work(sizes + sizes) == 2 * work(sizes) > 0
