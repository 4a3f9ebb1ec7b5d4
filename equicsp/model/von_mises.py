"""Von Mises tables: kappa(N, sigma_t) and the target normalisers, computed and cached.

docs/method.md#von-mises. For every atom count N and noise level sigma_t we draw
CoM-free noise n~ by Monte Carlo and fit VM(0, kappa) to theta = 2 pi n~ by maximum
likelihood, which with known mean 0 solves A1(kappa) = mean cos theta. Draws for one N
share their standard normals across t (common random numbers), so each table is smooth in t,
and a table for N <= M is a prefix of the one for N <= M' > M.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import i0e, i1e

from equicsp.data.cache import cache_dir, cache_key, load_cached, store_cached
from equicsp.model.periodic import TWO_PI, circular_mean_last_axis
from equicsp.model.schedules import images_needed, wrap, wrap_centered, wrapped_normal_score

TABLE_VERSION = 1


def mean_resultant_to_kappa(mean_cos: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Solve A1(kappa) = I1(kappa) / I0(kappa) = R elementwise (float64, Newton from Best-Fisher).

    R <= 0 gives kappa = 0 (the likelihood is maximal at the uniform distribution).
    """
    r = np.clip(np.asarray(mean_cos, dtype=np.float64), 0.0, 1 - 1e-15)
    kappa = np.where(r < 0.53, 2 * r + r**3 + 5 * r**5 / 6,
                     np.where(r < 0.85, -0.4 + 1.39 * r + 0.43 / (1 - r), 1 / (r**3 - 4 * r**2 + 3 * r)))
    kappa = np.maximum(kappa, 1e-12)
    for _ in range(iterations):
        a1 = i1e(kappa) / i0e(kappa)
        slope = np.maximum(1 - a1 / kappa - a1 * a1, 1e-300)
        kappa = np.maximum(kappa - (a1 - r) / slope, kappa / 10)
    return np.where(r > 0, kappa, 0.0)


def draw_com_free_noise(num_atoms: int, sigmas: torch.Tensor, num_samples: int,
                        generator: torch.Generator) -> torch.Tensor:
    """(S, D, N) CoM-free noise w(n - mu) for D = ceil(num_samples / N) crystals of N atoms, per sigma.

    One axis is enough: axes are independent and identically distributed.
    """
    crystals = math.ceil(num_samples / num_atoms)
    eps = torch.randn(crystals, num_atoms, generator=generator, dtype=sigmas.dtype)
    noise = sigmas.reshape(-1, 1, 1) * eps  # (S, D, N)
    return wrap(noise - circular_mean_last_axis(noise))


@dataclass(frozen=True)
class VonMisesTables:
    """Per (N, t) statistics of CoM-free noise; rows are N = 0 .. max_atoms, columns t = 0 .. T.

    Row 0, row 1 (n~ = 0) and column 0 hold kappa = 0 and normalisers 1, so a lookup never
    divides by zero; their targets are zero anyway.
    """

    kappa: torch.Tensor  # von Mises concentration of 2 pi n~
    von_mises_score_norm: torch.Tensor  # E[(kappa sin(2 pi n~) 2 pi)^2]
    wrapped_normal_score_norm: torch.Tensor  # E[wrapped_normal_score(n~, sigma_t)^2] (VM switched off)
    noise_norm: torch.Tensor  # E[n~^2], n~ wrapped into [-0.5, 0.5)
    key: str

    @property
    def max_atoms(self) -> int:
        return self.kappa.shape[0] - 1

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> VonMisesTables:
        tensors = {name: getattr(self, name).to(device=device, dtype=dtype)
                   for name in ("kappa", "von_mises_score_norm", "wrapped_normal_score_norm", "noise_norm")}
        return VonMisesTables(**tensors, key=self.key)


def _statistics_for(num_atoms: int, sigmas: torch.Tensor, num_samples: int, seed: int,
                    chunk_elements: int = 1_000_000) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + num_atoms)
    crystals = math.ceil(num_samples / num_atoms)
    chunk = max(1, chunk_elements // (crystals * num_atoms))
    generator_state = generator.get_state()
    stats: dict[str, list[torch.Tensor]] = {"one_minus_cos": [], "sin_sq": [], "noise_sq": [], "wn_score_sq": []}
    for start in range(0, sigmas.shape[0], chunk):
        generator.set_state(generator_state)  # the same standard normals for every sigma
        # float32 draws; the means below accumulate in float64.
        sigma_chunk = sigmas[start:start + chunk].float()
        centred = wrap_centered(draw_com_free_noise(num_atoms, sigma_chunk, num_samples, generator))
        theta = TWO_PI * centred
        flat = centred.flatten(1)  # (S, D * N)
        # 1 - cos(theta) = 2 sin^2(theta / 2): exact where theta is tiny and cos rounds to 1.
        stats["one_minus_cos"].append((2 * torch.sin(theta / 2) ** 2).flatten(1).mean(-1, dtype=torch.float64))
        stats["sin_sq"].append((torch.sin(theta) ** 2).flatten(1).mean(-1, dtype=torch.float64))
        stats["noise_sq"].append((flat * flat).mean(-1, dtype=torch.float64))
        # Few images suffice for sigma <= 0.5; the weights are a softmax, so extra ones cost time only.
        images = images_needed(float(sigma_chunk.max()))
        score = wrapped_normal_score(flat, sigma_chunk[:, None].expand_as(flat), images=images)
        stats["wn_score_sq"].append((score * score).mean(-1, dtype=torch.float64))
    return {name: torch.cat(values).numpy() for name, values in stats.items()}


def build_tables(max_atoms: int, sigmas: torch.Tensor, num_samples: int = 10_000, seed: int = 0) -> VonMisesTables:
    """Compute the tables for N = 1 .. max_atoms and sigmas = (T,) (sigma_1 .. sigma_T). No cache."""
    sigmas = sigmas.double()
    steps = sigmas.shape[0]
    shape = (max_atoms + 1, steps + 1)
    kappa, vm_norm = np.zeros(shape), np.ones(shape)
    wn_norm, noise_norm = np.ones(shape), np.ones(shape)
    for num_atoms in range(2, max_atoms + 1):
        stats = _statistics_for(num_atoms, sigmas, num_samples, seed)
        fitted = mean_resultant_to_kappa(1 - stats["one_minus_cos"])
        kappa[num_atoms, 1:] = fitted
        vm_norm[num_atoms, 1:] = np.maximum(fitted**2 * TWO_PI**2 * stats["sin_sq"], 1e-30)
        wn_norm[num_atoms, 1:] = stats["wn_score_sq"]
        noise_norm[num_atoms, 1:] = stats["noise_sq"]
    key = table_key(max_atoms, sigmas, num_samples, seed)
    as_tensor = lambda array: torch.from_numpy(array)  # noqa: E731
    return VonMisesTables(as_tensor(kappa), as_tensor(vm_norm), as_tensor(wn_norm), as_tensor(noise_norm), key)


def table_key(max_atoms: int, sigmas: torch.Tensor, num_samples: int, seed: int) -> str:
    return cache_key("von_mises", TABLE_VERSION, max_atoms, num_samples, seed, sigmas.double())


TABLE_NAMES = ("kappa", "von_mises_score_norm", "wrapped_normal_score_norm", "noise_norm")


def _tables_from_cache(stored: dict, key: str, max_atoms: int, steps: int) -> VonMisesTables:
    tables = VonMisesTables(**{name: stored[name] for name in TABLE_NAMES}, key=key)
    shapes = {tuple(getattr(tables, name).shape) for name in TABLE_NAMES}
    if shapes != {(max_atoms + 1, steps + 1)}:
        raise ValueError(f"tables of shape {shapes}, expected {(max_atoms + 1, steps + 1)}")
    return tables


def load_or_build_tables(max_atoms: int, sigmas: torch.Tensor, num_samples: int = 10_000, seed: int = 0,
                         announce: Callable[[str], None] | None = None) -> VonMisesTables:
    """The tables for these inputs from the cache, computing and caching them on a miss (announced first: with the
    paper's 1000 steps they take minutes on a CPU)."""
    key = table_key(max_atoms, sigmas, num_samples, seed)
    path = cache_dir() / "von_mises" / f"{key}.pt"
    cached = load_cached(path, lambda stored: _tables_from_cache(stored, key, max_atoms, sigmas.shape[0]))
    if cached is not None:
        return cached
    if announce is not None:
        announce(f"building von Mises tables (atom counts up to {max_atoms} x {sigmas.shape[0]} noise levels, "
                 f"{num_samples:,} draws each; cached for the next run)...")
    tables = build_tables(max_atoms, sigmas, num_samples, seed)
    store_cached({name: getattr(tables, name) for name in TABLE_NAMES}, path)
    return tables
