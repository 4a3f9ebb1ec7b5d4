"""Periodic statistics of fractional coordinates: circular mean, CoM-free noise, PM derivative.

All functions work per crystal and per axis on flat (N, 3) tensors with a (N,) batch vector.
"""

from __future__ import annotations

import math

import torch

from equicsp.model.schedules import wrap
from equicsp.model.segments import per_crystal_mean, per_crystal_sum

TWO_PI = 2 * math.pi


def _mean_direction(mean_sin: torch.Tensor, mean_cos: torch.Tensor) -> torch.Tensor:
    """The angle of the mean resultant, as a fraction of a turn in [-0.5, 0.5] (paper eq. 15)."""
    return torch.atan2(mean_sin, mean_cos) / TWO_PI


def circular_mean(x: torch.Tensor, batch: torch.Tensor, num_crystals: int) -> torch.Tensor:
    """(B, 3) circular mean in [0, 1) of each crystal's (N, 3) fractional values, per axis."""
    angle = TWO_PI * x
    mean_sin = per_crystal_mean(torch.sin(angle), batch, num_crystals)
    mean_cos = per_crystal_mean(torch.cos(angle), batch, num_crystals)
    return wrap(_mean_direction(mean_sin, mean_cos))


def circular_mean_last_axis(x: torch.Tensor) -> torch.Tensor:
    """(..., 1) circular mean in [-0.5, 0.5] of x along its last axis: dense crystals of equal size, one per row."""
    angle = TWO_PI * x
    return _mean_direction(torch.sin(angle).mean(-1, keepdim=True), torch.cos(angle).mean(-1, keepdim=True))


def atoms_per_atom(batch: torch.Tensor, num_crystals: int) -> torch.Tensor:
    """(N,) the size of each atom's crystal, counted from the batch vector (callers that know it pass it instead:
    counting reads a size back from the device)."""
    return torch.bincount(batch, minlength=num_crystals)[batch]


def com_free_noise(noise: torch.Tensor, batch: torch.Tensor, num_crystals: int,
                   atom_counts: torch.Tensor | None = None) -> torch.Tensor:
    """n~ = w(n - mu): the noise with its periodic centre of mass removed (docs/method.md#periodic-com-free-noise).

    Invariant under n -> n + tau for any per-crystal shift tau, hence under periodic
    translations of X_0. A one-atom crystal has n~ = 0 exactly (set here, not left to
    rounding).
    """
    centred = wrap(noise - circular_mean(noise, batch, num_crystals)[batch])
    atom_counts = atoms_per_atom(batch, num_crystals) if atom_counts is None else atom_counts
    single_atom = (atom_counts == 1).unsqueeze(-1)
    return torch.where(single_atom, torch.zeros_like(centred), centred)


def pm_corrected_score(score: torch.Tensor, predicted_noise: torch.Tensor, batch: torch.Tensor,
                       num_crystals: int, atom_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Chain rule from the score in n~ to the score in X (docs/method.md#pm-correction).

    With theta_i = 2 pi n~_i, u = mean sin, v = mean cos and
    g_i = (v cos theta_i + u sin theta_i) / ((u^2 + v^2) N), returns s_i - g_i sum_j s_j:
    g_i is d mu / d n_i, the derivative of the circular mean that n~ subtracts.
    """
    theta = TWO_PI * predicted_noise.clamp(-0.5, 0.5)
    sin, cos = torch.sin(theta), torch.cos(theta)
    u = per_crystal_mean(sin, batch, num_crystals)
    v = per_crystal_mean(cos, batch, num_crystals)
    atom_counts = atoms_per_atom(batch, num_crystals) if atom_counts is None else atom_counts
    resultant = ((u * u + v * v)[batch] * atom_counts.to(score.dtype).unsqueeze(-1)).clamp_min(torch.finfo(score.dtype).tiny)
    g = (v[batch] * cos + u[batch] * sin) / resultant
    score_sum = per_crystal_sum(score, batch, num_crystals)
    return score - g * score_sum[batch]
