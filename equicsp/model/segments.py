"""Sums and means over each crystal's atoms of flat (N, ...) tensors with a (N,) batch vector.

torch's own index_add, not torch_geometric's scatter: the same numbers, and importing PyG
(which imports torch._dynamo) costs every process that loads the model 2-3 s, paid again by
each Ray worker, sampling actor and matching task of a sweep.
"""

from __future__ import annotations

import torch


def per_crystal_sum(values: torch.Tensor, batch: torch.Tensor, num_crystals: int) -> torch.Tensor:
    """(B, ...) the sum of each crystal's rows of (N, ...) values; 0 for a crystal with no atoms."""
    return torch.index_add(values.new_zeros((num_crystals, *values.shape[1:])), 0, batch, values)


def per_crystal_mean(values: torch.Tensor, batch: torch.Tensor, num_crystals: int) -> torch.Tensor:
    """(B, ...) the mean of each crystal's rows of (N, ...) values; 0 for a crystal with no atoms."""
    counts = torch.index_add(values.new_zeros(num_crystals), 0, batch, values.new_ones(batch.shape[0]))
    return per_crystal_sum(values, batch, num_crystals) / counts.clamp_min(1).view(-1, *[1] * (values.dim() - 1))
