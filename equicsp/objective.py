"""The training loss: L_l + cost_coord L_x + L_score + lambda_perm L_perm (docs/method.md#loss-terms)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from equicsp.devices import autocast
from equicsp.diffusion import Diffusion, NoisedBatch, keyed_permutations
from equicsp.lattice import permute_columns, permute_lattice


@dataclass
class LossTerms:
    total: torch.Tensor
    lattice: torch.Tensor
    coord: torch.Tensor  # the n~ head
    score: torch.Tensor
    perm: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("total", "lattice", "coord", "score", "perm")}


def _stack_two(batch, permuted_coords: torch.Tensor, permuted_lattice: torch.Tensor, noised: NoisedBatch):
    """The batch and its permuted copy as one 2B-crystal input, so both passes share one forward."""
    num_crystals = batch.num_atoms.shape[0]
    return dict(atom_types=batch.atom_types.repeat(2),
                frac_coords=torch.cat([noised.frac_coords, permuted_coords]),
                lattice=torch.cat([noised.lattice, permuted_lattice]),
                timesteps=noised.timesteps.repeat(2),
                batch=torch.cat([batch.batch, batch.batch + num_crystals]),
                num_atoms=batch.num_atoms.repeat(2))


class Objective:
    def __init__(self, diffusion: Diffusion, denoiser: nn.Module, precision: str = "fp32"):
        self.diffusion = diffusion
        self.denoiser = denoiser
        self.objective = diffusion.config.objective
        self.precision = precision

    def __call__(self, batch, seed: int = 0, step: int = 0) -> LossTerms:
        """The loss terms for one batch; its noise is keyed by (seed, step, crystal index)."""
        noised = self.diffusion.noise(batch, seed, step)
        num_crystals, device = batch.num_atoms.shape[0], noised.lattice.device
        use_perm = self.objective.perm_loss and self.objective.perm_loss_weight > 0
        with autocast(device, self.precision):
            if use_perm:
                permutation = keyed_permutations(batch, seed, step)
                inputs = _stack_two(batch, permute_columns(noised.frac_coords, permutation, batch.batch),
                                    permute_lattice(noised.lattice, permutation), noised)
                both = self.denoiser(**inputs)
                total_atoms = batch.atom_types.shape[0]
                plain_lattice, perm_lattice = both.lattice_noise.split(num_crystals)
                plain_coord, perm_coord = both.coord_noise.split(total_atoms)
                plain_score, perm_score = both.coord_score.split(total_atoms)
            else:
                out = self.denoiser(batch.atom_types, noised.frac_coords, noised.lattice, noised.timesteps,
                                    batch.batch, batch.num_atoms)
                plain_lattice, plain_coord, plain_score = out.lattice_noise, out.coord_noise, out.coord_score
        mse = nn.functional.mse_loss
        lattice_loss = mse(plain_lattice, noised.lattice_noise)
        coord_loss = mse(plain_coord, noised.targets.noise)
        score_loss = mse(plain_score, noised.targets.score)
        zero = lattice_loss.new_zeros(())
        perm_loss = zero
        if use_perm:
            # docs/method.md#permutation-loss: phi(P M_t) should equal P phi(M_t); gradients flow through both passes.
            perm_loss = (mse(perm_lattice, permute_lattice(plain_lattice, permutation))
                         + mse(perm_coord, permute_columns(plain_coord, permutation, batch.batch))
                         + mse(perm_score, permute_columns(plain_score, permutation, batch.batch)))
        total = (lattice_loss + self.objective.cost_coord * coord_loss + score_loss
                 + self.objective.perm_loss_weight * perm_loss)
        return LossTerms(total, lattice_loss, coord_loss, score_loss, perm_loss)
