import numpy as np
import torch
from conftest import random_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import circmean

from equicsp.config import make_config
from equicsp.model.diffusion import Diffusion
from equicsp.model.periodic import circular_mean, circular_mean_last_axis, com_free_noise, pm_corrected_score
from equicsp.model.schedules import wrap, wrap_centered

atom_counts = st.lists(st.integers(1, 8), min_size=1, max_size=5)


def test_circular_mean_matches_scipy():
    batch = random_batch([5, 2, 7])
    mean = circular_mean(batch.frac_coords, batch.batch, 3)
    for crystal in range(3):
        values = batch.frac_coords[batch.batch == crystal].numpy()
        expected = circmean(values, high=1.0, low=0.0, axis=0)
        np.testing.assert_allclose(np.cos(2 * np.pi * (mean[crystal].numpy() - expected)), 1.0, atol=1e-10)


def test_the_dense_circular_mean_is_the_same_mean():
    x = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # 4 crystals of 6 atoms, one axis
    flat = circular_mean(x.reshape(-1, 1), torch.arange(4).repeat_interleave(6), 4)  # (4, 1) in [0, 1)
    np.testing.assert_allclose(wrap(circular_mean_last_axis(x)).numpy(), flat.numpy(), atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(counts=atom_counts, seed=st.integers(0, 10_000))
def test_com_free_noise_is_invariant_to_a_periodic_shift(counts, seed):
    batch = random_batch(counts, seed)
    noise = 0.3 * torch.randn(batch.frac_coords.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    shift = torch.rand(len(counts), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    before = com_free_noise(noise, batch.batch, len(counts))
    after = com_free_noise(noise + 5 * shift[batch.batch], batch.batch, len(counts))
    torch.testing.assert_close(wrap_centered(after - before), torch.zeros_like(before), atol=1e-9, rtol=0)


def test_single_atom_noise_is_exactly_zero():
    batch = random_batch([1, 1, 3])
    noise = torch.randn(batch.frac_coords.shape, dtype=torch.float64)
    result = com_free_noise(noise, batch.batch, 3)
    assert torch.isfinite(result).all()
    assert (result[:2] == 0).all() and (result[2:] != 0).any()


def _com_free_jacobian(noise: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """d n~_i / d n_j for one crystal and one axis, by central differences in float64."""
    def centred(n):
        tensor = torch.tensor(n)[:, None].repeat(1, 3)
        out = com_free_noise(tensor, torch.zeros(len(n), dtype=torch.long), 1)[:, 0].numpy()
        return out
    base = centred(noise)
    jacobian = np.zeros((len(noise), len(noise)))
    for j in range(len(noise)):
        up, down = noise.copy(), noise.copy()
        up[j] += step
        down[j] -= step
        difference = (centred(up) - centred(down) + 0.5) % 1.0 - 0.5  # differences across the wrap
        jacobian[:, j] = difference / (2 * step)
    del base
    return jacobian


@settings(max_examples=25, deadline=None)
@given(num_atoms=st.integers(2, 9), seed=st.integers(0, 10_000))
def test_pm_correction_is_the_chain_rule_through_the_com_removal(num_atoms, seed):
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 0.15, num_atoms)
    score_in_centred = rng.normal(0, 1, num_atoms)
    reference = _com_free_jacobian(noise).T @ score_in_centred  # d/dn of f(n~(n))
    centred = com_free_noise(torch.tensor(noise)[:, None].repeat(1, 3), torch.zeros(num_atoms, dtype=torch.long), 1)
    corrected = pm_corrected_score(torch.tensor(score_in_centred)[:, None].repeat(1, 3), wrap_centered(centred),
                                   torch.zeros(num_atoms, dtype=torch.long), 1)[:, 0].numpy()
    np.testing.assert_allclose(corrected, reference, rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_targets_are_translation_invariant_only_with_com_free_noise(seed):
    """Holding X_t fixed and translating X_0 by tau changes the noise by -tau per crystal."""
    batch = random_batch([4, 6, 3], seed, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    noise = 0.1 * torch.randn(batch.frac_coords.shape, generator=generator)
    tau = torch.rand(3, 3, generator=generator)[batch.batch]
    atom_counts, timesteps = batch.num_atoms[batch.batch], torch.full_like(batch.batch, 50)
    shifted_noise = wrap(noise - tau)
    for preset, invariant in (("equicsp", True), ("no_pm_vm", True), ("diffcsp", False)):
        target = Diffusion(make_config("smoke", preset)).target
        before = target.targets(noise, batch.batch, 3, atom_counts, timesteps)
        after = target.targets(shifted_noise, batch.batch, 3, atom_counts, timesteps)
        same = torch.allclose(before.coord_score, after.coord_score, atol=1e-3) and torch.allclose(
            wrap_centered(before.coord_noise - after.coord_noise), torch.zeros_like(before.coord_noise), atol=1e-3)
        assert same == invariant, preset
