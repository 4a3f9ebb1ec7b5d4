"""Noise schedules: the lattice DDPM (cosine) and the coordinate sigmas (geometric).

Every table is indexed by the timestep t = 0 .. T, entry 0 being the clean data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Images k = -10 .. 10 of the wrapped normal, as DiffCSP sums them.
WRAPPED_NORMAL_IMAGES = 10


def cosine_betas(timesteps: int, offset: float = 0.008) -> torch.Tensor:
    """(T,) betas of the cosine schedule, clipped to [1e-4, 0.9999] (docs/method.md#lattice-ddpm)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(1e-4, 0.9999)


def geometric_sigmas(timesteps: int, sigma_begin: float, sigma_end: float) -> torch.Tensor:
    """(T,) sigmas from sigma_1 = sigma_begin to sigma_T = sigma_end, geometrically spaced."""
    return torch.exp(torch.linspace(math.log(sigma_begin), math.log(sigma_end), timesteps, dtype=torch.float64))


def wrap(x: torch.Tensor) -> torch.Tensor:
    """Fractional part, into [0, 1)."""
    return x - torch.floor(x)


def wrap_centered(x: torch.Tensor) -> torch.Tensor:
    """Into [-0.5, 0.5): the shortest signed periodic displacement."""
    return x - torch.round(x)


def images_needed(sigma_max: float) -> int:
    """Images beyond 6 sigma + 1 carry weight below exp(-18): enough for float64 targets."""
    return min(WRAPPED_NORMAL_IMAGES, int(math.ceil(6 * sigma_max)) + 1)


def wrapped_normal_score(x: torch.Tensor, sigma: torch.Tensor, images: int = WRAPPED_NORMAL_IMAGES) -> torch.Tensor:
    """Minus the score of the wrapped normal WN(0, sigma^2) on the unit circle, elementwise.

    sum_k (x + k) / sigma^2 N(x + k) / sum_k N(x + k) over k = -images .. images; the sign is
    DiffCSP's (positive for a small positive displacement), so the sampler steps
    X <- X - step * score. With x centred into [-0.5, 0.5) the k = 0 image has the largest
    density, so every other weight relative to it, exp(-(k^2 +- 2 k x) / (2 sigma^2)), is <= 1:
    no overflow for any sigma, and no (..., 2 * images + 1) intermediate.
    """
    x = wrap_centered(x)
    scale = 1 / (2 * sigma * sigma)
    numerator = torch.zeros_like(x)
    denominator = torch.ones_like(x)
    for k in range(1, images + 1):
        above = torch.exp(-(k * k + 2 * k * x) * scale)
        below = torch.exp(-(k * k - 2 * k * x) * scale)
        numerator = numerator + k * (above - below)
        denominator = denominator + above + below
    return (x + numerator / denominator) * (2 * scale)


def _gaussian_expectation(function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sigmas: torch.Tensor,
                          points: int = 2001) -> torch.Tensor:
    """E[f(sigma z)] for z ~ N(0, 1), per sigma, by the trapezoid rule on z in [-8, 8] (float64)."""
    z = torch.linspace(-8.0, 8.0, points, dtype=torch.float64)
    density = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    values = function(sigmas[:, None] * z[None, :], sigmas[:, None])  # (S, points)
    return torch.trapezoid(values * density, z, dim=-1)


def wrapped_normal_score_norm(sigmas: torch.Tensor) -> torch.Tensor:
    """E[score^2] under WN(0, sigma^2): DiffCSP's normaliser of the raw-noise score target."""
    images = images_needed(float(sigmas.max()))
    return _gaussian_expectation(lambda y, s: wrapped_normal_score(y, s.expand_as(y), images) ** 2, sigmas.double())


def wrapped_noise_norm(sigmas: torch.Tensor) -> torch.Tensor:
    """E[w(n)^2] with n ~ N(0, sigma^2) wrapped into [-0.5, 0.5): normaliser of the raw-noise x target."""
    return _gaussian_expectation(lambda y, s: wrap_centered(y) ** 2, sigmas.double())


@dataclass(frozen=True)
class NoiseSchedule:
    """Both schedules as float64 tables of length T + 1 (index 0 = clean)."""

    betas: torch.Tensor  # lattice DDPM beta_t
    alphas: torch.Tensor
    alpha_bars: torch.Tensor
    sigmas: torch.Tensor  # coordinate noise level sigma_t, sigma_0 = 0
    score_norms: torch.Tensor  # E[s^2] of the raw wrapped-normal target, per t
    noise_norms: torch.Tensor  # E[w(n)^2] of the raw wrapped noise, per t

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0] - 1

    @classmethod
    def build(cls, timesteps: int, sigma_begin: float, sigma_end: float, cosine_offset: float = 0.008) -> NoiseSchedule:
        zero = torch.zeros(1, dtype=torch.float64)
        betas = torch.cat([zero, cosine_betas(timesteps, cosine_offset)])
        alphas = 1 - betas
        sigmas = geometric_sigmas(timesteps, sigma_begin, sigma_end)
        one = torch.ones(1, dtype=torch.float64)
        return cls(
            betas=betas,
            alphas=alphas,
            alpha_bars=torch.cumprod(alphas, 0),
            sigmas=torch.cat([zero, sigmas]),
            score_norms=torch.cat([one, wrapped_normal_score_norm(sigmas)]),
            noise_norms=torch.cat([one, wrapped_noise_norm(sigmas)]),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        return NoiseSchedule(**{name: getattr(self, name).to(device=device, dtype=dtype)
                                for name in self.__dataclass_fields__})


def at_last_step(s: int | torch.Tensor, last: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`last` when the step goes to s = 0, else `other`; s is a Python int, or a 0-d tensor in a compiled step
    (where a Python branch would bake one case into the graph)."""
    if isinstance(s, torch.Tensor):
        return torch.where(s == 0, last, other)
    return last if s == 0 else other


def entry(table: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """table[t] for a Python int or a 0-d device tensor (plain indexing with a 0-d tensor reads it back to the host)."""
    if isinstance(t, torch.Tensor):
        return table.index_select(0, t.reshape(1)).squeeze(0)
    return table[t]
