"""The atom-type DDPM of the generation task: shapes, the step's algebra, invariances of the type head."""

import pytest
import torch
from conftest import FAST, random_batch

from equicsp.config import ConfigError, make_config
from equicsp.model.atom_types import NUM_TYPE_CLASSES, decode, one_hot
from equicsp.model.denoiser import build_denoiser
from equicsp.model.diffusion import Diffusion
from equicsp.model.lattice import permute_columns, permute_lattice
from equicsp.model.num_atoms import atom_count_histogram, draw_atom_counts
from equicsp.model.objective import Objective


def generation_config(arm="equicsp", **overrides):
    return make_config("smoke", arm, {**FAST, "diffusion.task": "generation", **overrides})


def test_one_hot_round_trip():
    types = torch.tensor([1, 8, 22, 100])
    encoded = one_hot(types)
    assert encoded.shape == (4, NUM_TYPE_CLASSES) and torch.equal(decode(encoded), types)


def test_step_with_the_true_noise_recovers_the_clean_types():
    """With eps_hat = eps, the deterministic step to s = 0 returns A_0 exactly (up to float error)."""
    diffusion = Diffusion(generation_config())
    types = torch.tensor([3, 8, 8, 56])
    eps = torch.randn(4, NUM_TYPE_CLASSES, generator=torch.Generator().manual_seed(0))
    for t in (1, 7, diffusion.timesteps):
        noisy = diffusion.types.noise(types, torch.full((4,), t), eps)
        clean = diffusion.types.step(noisy, eps, t, 0, torch.zeros_like(eps))
        assert torch.allclose(clean, one_hot(types), atol=1e-4)


def test_unclipped_step_is_diffcsps_and_the_clip_bounds_a_wrong_noise():
    """Without the clip the step is DiffCSP's c0 (A_t - c1 eps_hat) + sigma_t z; with it, a bad eps_hat at t = T
    cannot throw the types far outside the one-hot range, and a right one is left alone."""
    diffusion = Diffusion(generation_config())
    schedule, T = diffusion.schedule, diffusion.timesteps
    generator = torch.Generator().manual_seed(1)
    types, z = torch.randn(6, NUM_TYPE_CLASSES, generator=generator), torch.randn(6, NUM_TYPE_CLASSES, generator=generator)
    eps_hat = torch.randn(6, NUM_TYPE_CLASSES, generator=generator)
    for t in (2, T // 2, T):
        alpha, alpha_bar = 1 - schedule.betas[t], schedule.alpha_bars[t]
        sigma = (schedule.betas[t] * (1 - schedule.alpha_bars[t - 1]) / (1 - alpha_bar)).sqrt()
        diffcsp = (types - (1 - alpha) / (1 - alpha_bar).sqrt() * eps_hat) / alpha.sqrt() + sigma * z
        torch.testing.assert_close(diffusion.types.step(types, eps_hat, t, t - 1, z), diffcsp, rtol=1e-4, atol=1e-4)
    unclipped = diffusion.types.step(types, eps_hat, T, T - 1, torch.zeros_like(z))
    clipped = diffusion.types.step(types, eps_hat, T, T - 1, torch.zeros_like(z), clip=True)
    assert unclipped.abs().max() > 10 and clipped.abs().max() < 2 * types.abs().max()
    clean = torch.tensor([3, 8, 8, 56, 1, 100])
    noisy = diffusion.types.noise(clean, torch.full((6,), 5), eps_hat)
    torch.testing.assert_close(diffusion.types.step(noisy, eps_hat, 5, 4, z, clip=True),
                               diffusion.types.step(noisy, eps_hat, 5, 4, z), rtol=1e-5, atol=1e-5)


def test_noise_is_keyed_and_types_are_noised_only_for_generation():
    batch = random_batch([3, 4], dtype=torch.float32)
    noised = Diffusion(generation_config()).noise(batch, seed=1, step=2)
    assert noised.atom_types.shape == (7, NUM_TYPE_CLASSES) and noised.type_noise.shape == (7, NUM_TYPE_CLASSES)
    again = Diffusion(generation_config()).noise(batch, seed=1, step=2)
    assert torch.equal(noised.atom_types, again.atom_types)
    csp = Diffusion(make_config("smoke", "equicsp", FAST)).noise(batch, seed=1, step=2)
    assert csp.type_noise is None and torch.equal(csp.atom_types, batch.atom_types)


def test_type_head_is_atom_order_equivariant_and_permutation_invariant():
    config = generation_config()
    torch.manual_seed(0)
    model = build_denoiser(config).double().eval()
    batch = random_batch([4, 3])
    types = torch.randn(7, NUM_TYPE_CLASSES, dtype=torch.float64)
    lattice = torch.randn(2, 6, dtype=torch.float64)
    t = torch.tensor([5, 9])
    out = model(types, batch.frac_coords, lattice, t, batch.batch, batch.num_atoms)
    assert out.type_noise.shape == (7, NUM_TYPE_CLASSES)
    order = torch.tensor([2, 0, 3, 1, 6, 4, 5])  # shuffle atoms within each crystal
    shuffled = model(types[order], batch.frac_coords[order], lattice, t, batch.batch, batch.num_atoms)
    assert torch.allclose(shuffled.type_noise, out.type_noise[order], atol=1e-7)
    # Frame averaging: types are unchanged by an axis permutation of the input.
    averaged = build_denoiser(generation_config("frame_average")).double().eval()
    permutation = torch.tensor([3, 3])
    plain = averaged(types, batch.frac_coords, lattice, t, batch.batch, batch.num_atoms)
    permuted = averaged(types, permute_columns(batch.frac_coords, permutation, batch.batch),
                        permute_lattice(lattice, permutation), t, batch.batch, batch.num_atoms)
    assert torch.allclose(plain.type_noise, permuted.type_noise, atol=1e-8)


@pytest.mark.parametrize("arm", ["equicsp", "frame_average", "diffcsp"])
def test_objective_has_a_type_term(arm):
    config = generation_config(arm)
    diffusion = Diffusion(config)
    objective = Objective(diffusion, build_denoiser(config))
    loss = objective(random_batch([3, 5], dtype=torch.float32), seed=0, step=1)
    assert objective.loss_names[-1] == "type_noise" and set(loss.as_floats()) == set(objective.loss_names)
    o = config.objective
    expected = (loss.lattice_noise + o.coord_noise_weight * loss.coord_noise + loss.coord_score
                + o.perm_loss_weight * loss.perm + o.type_noise_weight * loss.type_noise)
    assert torch.allclose(loss.total, expected)
    loss.total.backward()


def test_the_permutation_losss_type_term_is_weighted_like_the_type_loss():
    """The public EquiCSP code weights L_perm's type term by cost_replace_type, 20 like the type loss's cost_type."""
    config = generation_config("equicsp")
    torch.manual_seed(0)
    objective = Objective(Diffusion(config), build_denoiser(config))
    batch = random_batch([3, 5], dtype=torch.float32)
    as_built = objective(batch, seed=0, step=1).perm

    def perm_with_type_weight(weight):
        objective.permutation_loss.type_weight = weight
        return objective(batch, seed=0, step=1).perm

    without_types = perm_with_type_weight(0.0)
    type_term = perm_with_type_weight(1.0) - without_types
    assert type_term > 0
    assert torch.allclose(as_built, without_types + config.objective.type_noise_weight * type_term)


def test_csp_objective_is_unchanged():
    config = make_config("smoke", "equicsp", FAST)
    loss = Objective(Diffusion(config), build_denoiser(config))(random_batch([3, 5], dtype=torch.float32))
    assert loss.type_noise is None
    assert list(loss.as_floats()) == ["total", "lattice_noise", "coord_noise", "coord_score", "perm"]


def test_generation_needs_a_type_loss():
    with pytest.raises(ConfigError, match="type_noise_weight"):
        generation_config(**{"objective.type_noise_weight": 0})
    with pytest.raises(ConfigError, match="diffusion.task"):
        make_config("smoke", "equicsp", {"diffusion.task": "dream"})


def test_atom_counts_follow_the_histogram_and_do_not_depend_on_batching():
    histogram = atom_count_histogram(torch.tensor([5, 5, 5, 10]), max_atoms=20)
    assert len(histogram) == 21 and histogram[5] == 3 and histogram[10] == 1
    counts = draw_atom_counts(histogram, torch.arange(4000), seed=3)
    assert set(counts.tolist()) == {5, 10}
    assert abs((counts == 5).double().mean().item() - 0.75) < 0.03
    assert torch.equal(draw_atom_counts(histogram, torch.arange(100, 200), seed=3), counts[100:200])
    with pytest.raises(ValueError):
        draw_atom_counts([5], torch.arange(3), seed=0)
