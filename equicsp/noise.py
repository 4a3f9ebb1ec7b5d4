"""Counter-based Gaussian noise: a draw depends on (seed, key, step, stream, element) only.

The sampler keys every crystal by its composition index and sample number, so a crystal's
noise is the same whichever batch, shard, worker or device samples it. A 32-bit integer
hash (murmur3's finaliser) on int64 tensors gives the uniform bits; Box-Muller the normals.
"""

from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """Bijective avalanche hash of 32-bit values held in int64 (products wrap, then are masked)."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK
    return x ^ (x >> 16)


Step = int | torch.Tensor  # a Python int, or a 0-d int64 tensor on the keys' device (a captured step's input)


def row_keys(keys: torch.Tensor, seed: int, step: Step, stream: int) -> torch.Tensor:
    """(R,) int64 keys -> (R,) hashed keys for one (seed, step, stream).

    A compiled step takes `step` as a device tensor, so one captured graph serves every step.
    """
    if isinstance(step, torch.Tensor):
        parts = torch.tensor([seed & _MASK, (seed >> 32) & _MASK, 0, stream], dtype=torch.int64, device=keys.device)
        salt = mix32(parts + torch.tensor([0, 0, 1, 0], dtype=torch.int64, device=keys.device) * step)
    else:
        salt = mix32(torch.tensor([seed & _MASK, (seed >> 32) & _MASK, step, stream], dtype=torch.int64))
    h = mix32(keys ^ salt[0])
    h = mix32(h ^ salt[1])
    h = mix32(h ^ salt[2])
    return mix32(h ^ salt[3])


def keyed_normal(keys: torch.Tensor, width: int, seed: int, step: Step, stream: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, width) standard normals; row r is a function of keys[r], seed, step, stream only."""
    base = row_keys(keys, seed, step, stream)
    counters = torch.arange(2 * width, device=keys.device, dtype=torch.int64) * _GOLDEN
    bits = mix32(base[:, None] + counters[None, :])  # (R, 2 * width)
    scale = 1.0 / (1 << 24)
    u1 = ((bits[:, :width] >> 8).to(torch.float64) + 0.5) * scale  # in (0, 1)
    u2 = (bits[:, width:] >> 8).to(torch.float64) * scale
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)


def atom_keys(crystal_keys: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor) -> torch.Tensor:
    """(N,) a key per atom from its crystal's key and its index inside the crystal."""
    first_atom = torch.cumsum(num_atoms, 0) - num_atoms
    local = torch.arange(batch.shape[0], device=batch.device) - first_atom[batch]
    return mix32(crystal_keys[batch] * 0x27D4EB2F + local + 1)


def keyed_uniform(keys: torch.Tensor, width: int, seed: int, step: Step, stream: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, width) uniforms in [0, 1), keyed like keyed_normal."""
    base = row_keys(keys, seed, step, stream)
    counters = torch.arange(width, device=keys.device, dtype=torch.int64) * _GOLDEN
    bits = mix32(base[:, None] + counters[None, :])
    return ((bits >> 8).to(torch.float64) / (1 << 24)).to(dtype)


def sample_keys(composition_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """A crystal's key from its composition's index in the whole set and its sample number."""
    return mix32(mix32(composition_index) + sample_index + 1)
