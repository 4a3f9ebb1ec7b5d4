"""A denoiser that knows the answer: it returns the exact targets for one known crystal batch.

Sampling with it must recover the crystals, which tests the sampler's arithmetic apart from
any learning.
"""

from __future__ import annotations

import torch
from torch import nn

from equicsp.model.denoiser import DenoiserOutput
from equicsp.model.diffusion import Diffusion
from equicsp.model.schedules import wrap_centered


class OracleDenoiser(nn.Module):
    def __init__(self, diffusion: Diffusion, clean_coords: torch.Tensor, clean_lattice: torch.Tensor):
        super().__init__()
        self.diffusion = diffusion
        self.clean_coords = clean_coords  # (N, 3)
        self.clean_lattice = clean_lattice  # (B, D) in the diffusion's lattice representation

    def forward(self, atom_types, frac_coords, lattice, timesteps, batch, num_atoms, sizes=None,
                real=None) -> DenoiserOutput:
        schedule = self.diffusion.schedule
        alpha_bar = schedule.alpha_bars[timesteps][:, None]
        lattice_noise = (lattice - alpha_bar.sqrt() * self.clean_lattice) / (1 - alpha_bar).sqrt()
        noise = wrap_centered(frac_coords - self.clean_coords)
        targets = self.diffusion.target.targets(noise, batch, num_atoms.shape[0], num_atoms[batch], timesteps[batch])
        return DenoiserOutput(lattice_noise, targets.coord_noise, targets.coord_score)
