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


def axis_order(permutation_index: torch.Tensor) -> torch.Tensor:
    """(..., 3) the rows of AXIS_PERMUTATIONS at these indices, by arithmetic on the indices' device.

    itertools.permutations orders the six by first axis (index // 2), the other two ascending
    for an even index and swapped for an odd one. No (6, 3) table is copied to the device, so a
    captured step holds no host tensor.
    """
    first = permutation_index // 2
    low = (first == 0).long()  # the smaller of the two axes that are not `first`
    high = 2 - (first == 2).long()
    odd = permutation_index % 2 == 1
    second, third = torch.where(odd, high, low), torch.where(odd, low, high)
    return torch.stack([first, second, third], dim=-1)


def inverse_permutation_index(permutation_index: torch.Tensor) -> torch.Tensor:
    """Index into AXIS_PERMUTATIONS of the inverse of each permutation (same shape as the input).

    The two 3-cycles (rows 3 and 4) are each other's inverse; the identity and the swaps are their own.
    """
    p = permutation_index
    return torch.where(p == 3, torch.full_like(p, 4), torch.where(p == 4, torch.full_like(p, 3), p))


def permute_lattice(projected: torch.Tensor, permutation_index: torch.Tensor) -> torch.Tensor:
    """Permute (a, b, c) and (alpha, beta, gamma) together, one permutation per crystal.

    projected: (B, 6); permutation_index: (B,) rows of AXIS_PERMUTATIONS. Alpha is the
    angle opposite a, so it moves with a.
    """
    order = axis_order(permutation_index)  # (B, 3)
    lengths = torch.gather(projected[:, :3], 1, order)
    angles = torch.gather(projected[:, 3:], 1, order)
    return torch.cat([lengths, angles], dim=-1)


def permute_columns(per_atom: torch.Tensor, permutation_index: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Permute the three columns of a per-atom (N, 3) tensor with its crystal's permutation."""
    order = axis_order(permutation_index[batch])  # (N, 3)
    return torch.gather(per_atom, 1, order)


def lattice_matrix(lengths: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """(B, 3) lengths and (B, 3) angles in degrees -> (B, 3, 3) matrices with rows a, b, c.

    a lies along x and b in the xy-plane; any orientation would do, since everything that
    uses the matrix is rotation-invariant or -equivariant.
    """
    alpha, beta, gamma = torch.deg2rad(angles_deg).unbind(-1)
    a, b, c = lengths.unbind(-1)
    zero = torch.zeros_like(a)
    c_x = c * torch.cos(beta)
    c_y = c * (torch.cos(alpha) - torch.cos(beta) * torch.cos(gamma)) / torch.sin(gamma)
    c_z = (c * c - c_x * c_x - c_y * c_y).clamp_min(0).sqrt()
    rows = [torch.stack([a, zero, zero], -1),
            torch.stack([b * torch.cos(gamma), b * torch.sin(gamma), zero], -1),
            torch.stack([c_x, c_y, c_z], -1)]
    return torch.stack(rows, dim=-2)


def matrix_lengths_angles(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, 3) rows a, b, c -> ((B, 3) lengths, (B, 3) angles in degrees: alpha = angle(b, c), ...)."""
    lengths = matrix.norm(dim=-1)
    unit = matrix / lengths.clamp_min(torch.finfo(matrix.dtype).tiny)[..., None]
    cosines = torch.stack([(unit[:, 1] * unit[:, 2]).sum(-1), (unit[:, 0] * unit[:, 2]).sum(-1),
                           (unit[:, 0] * unit[:, 1]).sum(-1)], -1)
    return lengths, torch.rad2deg(torch.arccos(cosines.clamp(-1, 1)))


class LatticeRepresentation:
    """What the lattice DDPM diffuses and what the network sees of it (docs/method.md#lattice).

    `dim` is the width of the diffused vector l, `feature_dim` that of the network's lattice
    input; `network_noise` turns the network's per-crystal output (B, dim) into its
    prediction of the lattice noise.
    """

    name: str
    dim: int
    feature_dim: int
    permutable: bool  # whether the six axis permutations act on l (the permutation loss, Frame Average)

    def encode(self, lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, lattice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def features(self, lattice: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def network_noise(self, output: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def clamp_physical(self, lattice: torch.Tensor) -> torch.Tensor:
        """The lattice moved into physical cells (lengths 1 .. 100 A; angles 10 .. 170 degrees where l has them)."""
        raise NotImplementedError


MIN_LENGTH, MAX_LENGTH = 1.0, 100.0  # Angstrom
MIN_ANGLE, MAX_ANGLE = 10.0, 170.0  # degrees


def _projected_angle(degrees: float) -> float:
    return math.tan(math.radians(degrees) - math.pi / 2)


class ProjectedLattice(LatticeRepresentation):
    """EquiCSP: l = (log a, log b, log c, tan(alpha - pi/2), ...); the network sees l and predicts eps_l."""

    name, dim, feature_dim, permutable = "projected", 6, 6, True

    def encode(self, lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        return project_lattice(lengths, angles)

    def decode(self, lattice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return unproject_lattice(lattice)

    def features(self, lattice: torch.Tensor) -> torch.Tensor:
        return lattice

    def network_noise(self, output: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        return output

    def clamp_physical(self, lattice: torch.Tensor) -> torch.Tensor:
        # Scalar bounds per half (the projection is monotonic): no bound tensor is built per step.
        lengths = lattice[:, :3].clamp(math.log(MIN_LENGTH), math.log(MAX_LENGTH))
        angles = lattice[:, 3:].clamp(_projected_angle(MIN_ANGLE), _projected_angle(MAX_ANGLE))
        return torch.cat([lengths, angles], dim=-1)


class MatrixLattice(LatticeRepresentation):
    """DiffCSP: the 3x3 matrix L (rows a, b, c) flattened to 9.

    The network sees the inner products L L^T, which a rotation of the crystal leaves
    unchanged, and predicts the noise as its invariant 3x3 output times L, which rotates
    with the crystal: eps_hat(L Q) = eps_hat(L) Q for any orthogonal Q.
    """

    name, dim, feature_dim, permutable = "matrix", 9, 9, False

    def encode(self, lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        return lattice_matrix(lengths, angles).flatten(1)

    def decode(self, lattice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return matrix_lengths_angles(lattice.view(-1, 3, 3))

    def features(self, lattice: torch.Tensor) -> torch.Tensor:
        matrix = lattice.view(-1, 3, 3)
        return (matrix @ matrix.transpose(1, 2)).flatten(1)

    def network_noise(self, output: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        return (output.view(-1, 3, 3) @ lattice.view(-1, 3, 3).to(output.dtype)).flatten(1)

    def clamp_physical(self, lattice: torch.Tensor) -> torch.Tensor:
        # Each cell vector rescaled into the length range; angles are left to the matcher's degenerate-cell guard.
        matrix = lattice.view(-1, 3, 3)
        lengths = matrix.norm(dim=-1, keepdim=True)
        scale = lengths.clamp(MIN_LENGTH, MAX_LENGTH) / lengths.clamp_min(torch.finfo(lattice.dtype).tiny)
        return (matrix * scale).flatten(1)


LATTICE_REPRESENTATIONS: dict[str, LatticeRepresentation] = {
    representation.name: representation for representation in (ProjectedLattice(), MatrixLattice())}
