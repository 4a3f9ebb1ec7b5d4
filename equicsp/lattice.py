"""Projected lattice parameters and the six permutations of the lattice axes.

docs/method.md#projected-parameters: diffusion runs on
l = (log a, log b, log c, tan(alpha - pi/2), tan(beta - pi/2), tan(gamma - pi/2)),
so every point of R^6 maps back to valid lengths and angles in (0, pi).
"""

from __future__ import annotations

import itertools
import math

import torch

# All orderings of the axes (0, 1, 2), identity first. Row p says: new axis k is old axis p[k].
AXIS_PERMUTATIONS = torch.tensor(list(itertools.permutations(range(3))), dtype=torch.long)  # (6, 3)
NUM_PERMUTATIONS = AXIS_PERMUTATIONS.shape[0]


def project_lattice(lengths: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """(B, 3) lengths in Angstrom and (B, 3) angles in degrees -> (B, 6) projected parameters."""
    angles = torch.deg2rad(angles_deg)
    return torch.cat([lengths.log(), torch.tan(angles - math.pi / 2)], dim=-1)


def unproject_lattice(projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 6) projected parameters -> ((B, 3) lengths, (B, 3) angles in degrees)."""
    lengths = projected[..., :3].exp()
    angles = torch.rad2deg(torch.atan(projected[..., 3:]) + math.pi / 2)
    return lengths, angles


def inverse_permutation_index(permutation_index: torch.Tensor) -> torch.Tensor:
    """Index into AXIS_PERMUTATIONS of the inverse of each permutation (same shape as the input)."""
    perms = AXIS_PERMUTATIONS.to(permutation_index.device)
    inverse = torch.argsort(perms, dim=-1)  # (6, 3)
    # Each inverse is again one of the six rows: find which.
    matches = (inverse[:, None, :] == perms[None, :, :]).all(-1)  # (6, 6)
    table = matches.float().argmax(-1)
    return table[permutation_index]


def permute_lattice(projected: torch.Tensor, permutation_index: torch.Tensor) -> torch.Tensor:
    """Permute (a, b, c) and (alpha, beta, gamma) together, one permutation per crystal.

    projected: (B, 6); permutation_index: (B,) rows of AXIS_PERMUTATIONS. Alpha is the
    angle opposite a, so it moves with a.
    """
    order = AXIS_PERMUTATIONS.to(projected.device)[permutation_index]  # (B, 3)
    lengths = torch.gather(projected[:, :3], 1, order)
    angles = torch.gather(projected[:, 3:], 1, order)
    return torch.cat([lengths, angles], dim=-1)


def permute_columns(per_atom: torch.Tensor, permutation_index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Permute the three columns of a per-atom (N, 3) tensor with its crystal's permutation."""
    order = AXIS_PERMUTATIONS.to(per_atom.device)[permutation_index][batch]  # (N, 3)
    return torch.gather(per_atom, 1, order)

