"""Atom types as continuous one-hot vectors under a DDPM: the generation task's extra variable
(docs/method.md#generation; the paper's Appendix E, after DiffCSP's ab initio model).

Element Z is the one-hot vector e_{Z-1} in R^100; it is noised with the lattice's cosine
schedule, A_t = sqrt(abar_t) A_0 + sqrt(1 - abar_t) eps, and the denoiser's type head
predicts eps. Sampling starts from N(0, I) and the final type is argmax + 1.
"""

from __future__ import annotations

import torch

from equicsp.data.crystals import MAX_ATOMIC_NUMBER
from equicsp.model.schedules import NoiseSchedule, at_last_step, entry

NUM_TYPE_CLASSES = MAX_ATOMIC_NUMBER  # one class per Z = 1 .. 100


def one_hot(atom_types: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) atomic numbers -> (N, 100) one-hot vectors."""
    return torch.nn.functional.one_hot(atom_types.long() - 1, NUM_TYPE_CLASSES).to(dtype)


def decode(types: torch.Tensor) -> torch.Tensor:
    """(N, 100) continuous type vectors -> (N,) atomic numbers (the largest entry)."""
    return types.argmax(dim=-1) + 1


class AtomTypeDiffusion:
    """The DDPM on one-hot atom types, sharing the lattice's cosine schedule."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def noise(self, atom_types: torch.Tensor, timesteps: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(N,) atomic numbers, (N,) each atom's t, (N, 100) eps -> (N, 100) noisy types A_t."""
        alpha_bar = self.schedule.alpha_bars[timesteps][:, None]
        return alpha_bar.sqrt() * one_hot(atom_types, eps.dtype) + (1 - alpha_bar).sqrt() * eps

    def step(self, types: torch.Tensor, predicted_noise: torch.Tensor, t: int | torch.Tensor, s: int | torch.Tensor,
             z: torch.Tensor, clip: bool = False) -> torch.Tensor:
        """Ancestral DDPM step from t to s < t (s = t - 1 is DDPM's own step; s = 0 adds no noise).

        Written, like the lattice's, through the implied clean types A0_hat = (A_t - sqrt(1 - abar_t) eps_hat)
        / sqrt(abar_t) and the Gaussian posterior q(A_s | A_t, A0_hat); unclipped it is DiffCSP's step,
        A_s = (A_t - (1 - alpha_ts) / sqrt(1 - abar_t) eps_hat) / sqrt(alpha_ts) + std z, with alpha_ts = abar_t / abar_s.
        With clip (sampler.clip_types), A0_hat is first clamped into [0, 1], the range of a one-hot
        (DDPM's clip-denoised): at t = T the step multiplies any error in eps_hat by 1 / sqrt(1 - beta_T) = 100,
        and the network would next see type vectors far outside those it was trained on. The last step
        (s = 0) returns A0_hat unclipped, so argmax never meets a tie at the bound.
        """
        alpha_bar_t, alpha_bar_s = entry(self.schedule.alpha_bars, t), entry(self.schedule.alpha_bars, s)
        alpha_ts = alpha_bar_t / alpha_bar_s
        beta_ts = 1 - alpha_ts
        clean = (types - (1 - alpha_bar_t).sqrt() * predicted_noise) / alpha_bar_t.sqrt()
        bounded = clean.clamp(0, 1) if clip else clean
        mean = (alpha_bar_s.sqrt() * beta_ts * bounded + alpha_ts.sqrt() * (1 - alpha_bar_s) * types) / (1 - alpha_bar_t)
        std = (beta_ts * (1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt()
        return at_last_step(s, clean, mean + std * z)
