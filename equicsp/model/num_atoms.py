"""The number of atoms of a generated crystal: drawn from the training set's empirical distribution
(docs/method.md#generation).

The histogram is stored in a generation checkpoint; the draw for sample i is keyed by
(seed, i) like the sampler's noise, so a sample's size does not depend on the batching.
"""

from __future__ import annotations

import torch

from equicsp.model.noise import keyed_uniform

_NUM_ATOMS_STREAM = 7  # a stream of its own, apart from the training and sampling noise


def atom_count_histogram(num_atoms: torch.Tensor, max_atoms: int) -> list[int]:
    """(M,) atom counts -> counts[n] = crystals with n atoms, n = 0 .. max(max_atoms, largest)."""
    size = max(max_atoms, int(num_atoms.max()) if num_atoms.numel() else 0) + 1
    return torch.bincount(num_atoms.long(), minlength=size).tolist()


def draw_atom_counts(histogram: list[int], sample_indices: torch.Tensor, seed: int) -> torch.Tensor:
    """(S,) sample numbers -> (S,) atom counts, each drawn from the histogram by inverse CDF of a keyed uniform."""
    counts = torch.tensor(histogram, dtype=torch.float64)
    if counts.numel() < 2 or counts[1:].sum() <= 0 or (counts < 0).any():
        raise ValueError("the atom-count distribution has no crystal with at least one atom")
    counts[0] = 0  # an empty crystal is never drawn
    cdf = torch.cumsum(counts, 0) / counts.sum()
    u = keyed_uniform(sample_indices.long(), 1, seed, 0, _NUM_ATOMS_STREAM, torch.float64)[:, 0]
    return torch.searchsorted(cdf, u, right=True).clamp(max=counts.numel() - 1)
