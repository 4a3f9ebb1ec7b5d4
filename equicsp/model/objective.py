"""The training loss: L_l + w_x L_x + L_score + lambda_perm L_perm (docs/method.md#loss-terms),
plus w_type L_type when the atom types are diffused too (docs/method.md#generation).

Each loss term is named after the head it trains (DenoiserOutput): lattice_noise, coord_noise (the
n~ head, weighted by objective.coord_noise_weight), coord_score, type_noise (weighted by
objective.type_noise_weight), and perm for the permutation term; these are also the metric names.

The pieces are chosen once, when the objective is built from a config: the forward process
(`Diffusion`, which owns the coordinate target and the lattice representation), the denoiser
(Frame-Averaged or not) and, when the config has it, the permutation-loss term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from equicsp.config import ObjectiveConfig
from equicsp.data.batches import CrystalBatch
from equicsp.devices import autocast
from equicsp.model.diffusion import Diffusion, NoisedBatch, keyed_permutations
from equicsp.model.lattice import permute_columns, permute_lattice
from equicsp.model.noise import Step


def mse(output: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the rows marked in `rows` (the real crystals or atoms of a padded batch), or all."""
    if rows is None:
        return nn.functional.mse_loss(output, target)
    squared = torch.where(rows.unsqueeze(-1), output - target, 0).square()
    return squared.sum() / (rows.sum() * output.shape[-1]).to(squared.dtype)


@dataclass
class LossTerms:
    total: torch.Tensor
    lattice_noise: torch.Tensor
    coord_noise: torch.Tensor  # the n~ head
    coord_score: torch.Tensor
    perm: torch.Tensor
    type_noise: torch.Tensor | None = None  # generation only

    @property
    def names(self) -> tuple[str, ...]:
        return CSP_LOSS_NAMES if self.type_noise is None else GENERATION_LOSS_NAMES

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in self.names}


CSP_LOSS_NAMES = ("total", "lattice_noise", "coord_noise", "coord_score", "perm")
GENERATION_LOSS_NAMES = CSP_LOSS_NAMES + ("type_noise",)


# The denoiser's four outputs (DenoiserOutput's fields): lattice noise, coordinate noise, coordinate score, type noise.
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


def _stack_two(batch: CrystalBatch, permuted_coords: torch.Tensor, permuted_lattice: torch.Tensor,
               noised: NoisedBatch) -> dict[str, object]:
    """The batch and its permuted copy as one 2B-crystal input, so both passes share one forward."""
    num_crystals = batch.num_atoms.shape[0]
    types = noised.atom_types
    return dict(atom_types=types.repeat(2, *[1] * (types.dim() - 1)),
                frac_coords=torch.cat([noised.frac_coords, permuted_coords]),
                lattice=torch.cat([noised.lattice, permuted_lattice]),
                timesteps=noised.timesteps.repeat(2),
                batch=torch.cat([batch.batch, batch.batch + num_crystals]),
                num_atoms=batch.num_atoms.repeat(2),
                sizes=batch.sizes.repeated(2),
                real=None if batch.real is None else batch.real.repeat(2))


class PermutationLoss:
    """L_perm: phi(P M_t) should equal P phi(M_t) for an axis permutation P (docs/method.md#permutation-loss).

    One random non-identity permutation per crystal, keyed like the noise; the plain and the
    permuted input go through the denoiser as one batch, and gradients flow through both.
    The atom-type head (generation) should be invariant, P acting as the identity on types; its
    term is weighted like the type loss (type_weight), as the public EquiCSP code weights it
    (its cost_replace_type, 20 like cost_type).
    """

    def __init__(self, type_weight: float = 1.0):
        self.type_weight = type_weight

    def forward_with_loss(self, denoiser: nn.Module, batch: CrystalBatch, noised: NoisedBatch, seed: int,
                          step: Step) -> tuple[Outputs, torch.Tensor]:
        """(the plain pass's DenoiserOutput fields, L_perm)."""
        num_crystals, total_atoms = batch.num_atoms.shape[0], batch.atom_types.shape[0]
        permutation = keyed_permutations(batch, seed, step)
        inputs = _stack_two(batch, permute_columns(noised.frac_coords, permutation, batch.batch),
                            permute_lattice(noised.lattice, permutation), noised)
        both = denoiser(**inputs)
        plain_lattice, perm_lattice = both.lattice_noise.split(num_crystals)
        plain_coord, perm_coord = both.coord_noise.split(total_atoms)
        plain_score, perm_score = both.coord_score.split(total_atoms)
        crystals, atoms = batch.real, batch.real_atoms
        loss = (mse(perm_lattice, permute_lattice(plain_lattice, permutation), crystals)
                + mse(perm_coord, permute_columns(plain_coord, permutation, batch.batch), atoms)
                + mse(perm_score, permute_columns(plain_score, permutation, batch.batch), atoms))
        plain_types = None
        if both.type_noise is not None:
            plain_types, perm_types = both.type_noise.split(total_atoms)
            loss = loss + self.type_weight * mse(perm_types, plain_types, atoms)
        return (plain_lattice, plain_coord, plain_score, plain_types), loss


class Objective:
    def __init__(self, diffusion: Diffusion, denoiser: nn.Module, precision: str = "fp32"):
        self.diffusion = diffusion
        self.denoiser = denoiser
        self.precision = precision
        weights: ObjectiveConfig = diffusion.config.objective
        self.coord_noise_weight = weights.coord_noise_weight
        self.perm_weight = weights.perm_loss_weight
        self.type_noise_weight = weights.type_noise_weight
        self.permutation_loss = (PermutationLoss(self.type_noise_weight)
                                 if weights.perm_loss and weights.perm_loss_weight > 0 else None)
        self.loss_names = GENERATION_LOSS_NAMES if diffusion.types is not None else CSP_LOSS_NAMES

    def __call__(self, batch: CrystalBatch, seed: int = 0, step: Step = 0) -> LossTerms:
        """The loss terms for one batch; its noise is keyed by (seed, step, crystal index)."""
        noised = self.diffusion.noise(batch, seed, step)
        with autocast(noised.lattice.device, self.precision):
            if self.permutation_loss is not None:
                outputs, perm_loss = self.permutation_loss.forward_with_loss(self.denoiser, batch, noised, seed, step)
            else:
                out = self.denoiser(noised.atom_types, noised.frac_coords, noised.lattice, noised.timesteps,
                                    batch.batch, batch.num_atoms, batch.sizes, batch.real)
                outputs, perm_loss = (out.lattice_noise, out.coord_noise, out.coord_score, out.type_noise), None
        lattice_out, coord_out, score_out, type_out = outputs
        crystals, atoms = batch.real, batch.real_atoms
        lattice_loss = mse(lattice_out, noised.lattice_noise, crystals)
        coord_loss = mse(coord_out, noised.targets.coord_noise, atoms)
        score_loss = mse(score_out, noised.targets.coord_score, atoms)
        perm_loss = lattice_loss.new_zeros(()) if perm_loss is None else perm_loss
        total = lattice_loss + self.coord_noise_weight * coord_loss + score_loss + self.perm_weight * perm_loss
        if noised.type_noise is None:
            return LossTerms(total, lattice_loss, coord_loss, score_loss, perm_loss)
        assert type_out is not None  # a diffusion of the atom types goes with a denoiser that has a type head
        type_loss = mse(type_out, noised.type_noise, atoms)
        return LossTerms(total + self.type_noise_weight * type_loss, lattice_loss, coord_loss, score_loss, perm_loss, type_loss)
