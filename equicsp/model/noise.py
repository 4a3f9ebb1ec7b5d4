"""Counter-based Gaussian noise: a draw depends on (seed, key, step, stream, element) only.

The sampler keys every crystal by its composition index and sample number, so a crystal's
noise is the same whichever batch, shard, worker or device samples it. A 32-bit integer
hash (murmur3's finaliser) on int64 tensors gives the uniform bits; Box-Muller the normals.
"""

from __future__ import annotations

import functools
import math

import torch
from torch._guards import detect_fake_mode

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


def _int64_table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A small int64 constant. Eager: made on the device once, since building it per call is a host-to-device
    copy that waits for the device. Compiled, or under fake tensors (which must not be kept): made each time,
    a constant of the graph. As a table rather than `arange * c`, a compiler cannot fold it into 32-bit index
    arithmetic (inductor made `2654435769 * x` of a counter, out of int32's range)."""
    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return torch.tensor(values, dtype=torch.int64, device=device)
    return _device_int64_table(values, device)


@functools.lru_cache(maxsize=256)
def _device_int64_table(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _counters(width: int, device: torch.device) -> torch.Tensor:
    """(width,) the element counters i * golden ratio that spread a row's key over its elements."""
    return _int64_table(tuple(index * _GOLDEN for index in range(width)), device)


Step = int | torch.Tensor  # a Python int, or a 0-d int64 tensor on the keys' device (a captured step's input)


def row_keys(keys: torch.Tensor, seed: int, step: Step, stream: int) -> torch.Tensor:
    """(R,) int64 keys -> (R,) hashed keys for one (seed, step, stream).

    A compiled step takes `step` as a device tensor, so one captured graph serves every step.
    """
    if isinstance(step, torch.Tensor):
        parts = _int64_table((seed & _MASK, (seed >> 32) & _MASK, 0, stream), keys.device)
        salt = mix32(parts + _int64_table((0, 0, 1, 0), keys.device) * step)
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
    bits = mix32(base[:, None] + _counters(2 * width, keys.device)[None, :])  # (R, 2 * width)
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
    bits = mix32(base[:, None] + _counters(width, keys.device)[None, :])
    return ((bits >> 8).to(torch.float64) / (1 << 24)).to(dtype)


def sample_keys(composition_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """A crystal's key from its composition's index in the whole set and its sample number."""
    return mix32(mix32(composition_index) + sample_index + 1)
