"""The forward process: schedules and coordinate targets built from a config, and noising a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from equicsp.config import Config
from equicsp.lattice import project_lattice
from equicsp.schedules import NoiseSchedule, wrap
from equicsp.targets import CoordinateTargets, build_target
from equicsp.von_mises import VonMisesTables, load_or_build_tables


@dataclass
class NoisedBatch:
    timesteps: torch.Tensor  # (B,) in 1 .. T
    lattice: torch.Tensor  # (B, 6) l_t
    lattice_noise: torch.Tensor  # (B, 6) eps_l
    frac_coords: torch.Tensor  # (N, 3) X_t = w(X_0 + n)
    targets: CoordinateTargets


class Diffusion:
    """Schedules, von Mises tables (when the objective needs them) and the coordinate target, on one device."""

    def __init__(self, config: Config, device: torch.device | str = "cpu"):
        d = config.diffusion
        self.config = config
        schedule = NoiseSchedule.build(d.timesteps, d.sigma_begin, d.sigma_end, d.cosine_offset)
        tables = None
        if config.objective.com_free_noise:
            tables = load_or_build_tables(config.data.max_atoms, schedule.sigmas[1:], d.von_mises_samples,
                                          d.von_mises_seed).to(device)
        self.tables: VonMisesTables | None = tables
        self.schedule = schedule.to(device)
        self.target = build_target(config.objective, self.schedule, tables)

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    @property
    def tables_key(self) -> str | None:
        return self.tables.key if self.tables is not None else None

    def check_atom_counts(self, num_atoms: torch.Tensor) -> None:
        largest = int(num_atoms.max())
        if self.tables is not None and largest > self.tables.max_atoms:
            raise ValueError(f"a crystal has {largest} atoms but data.max_atoms is {self.tables.max_atoms}")

    def noise(self, batch, generator: torch.Generator | None = None) -> NoisedBatch:
        """Sample t per crystal and noise lattice and coordinates (METHOD.md: Lattice, Coordinates)."""
        num_crystals = batch.num_atoms.shape[0]
        device = batch.frac_coords.device
        t = torch.randint(1, self.timesteps + 1, (num_crystals,), generator=generator).to(device)
        lattice_0 = project_lattice(batch.lengths, batch.angles)
        lattice_noise = torch.randn(lattice_0.shape, generator=generator).to(device)
        alpha_bar = self.schedule.alpha_bars[t][:, None]
        lattice_t = alpha_bar.sqrt() * lattice_0 + (1 - alpha_bar).sqrt() * lattice_noise
        t_atom = t[batch.batch]
        noise = self.schedule.sigmas[t_atom][:, None] * torch.randn(batch.frac_coords.shape, generator=generator).to(device)
        targets = self.target.targets(noise, batch.batch, num_crystals, batch.num_atoms[batch.batch], t_atom)
        return NoisedBatch(t, lattice_t, lattice_noise, wrap(batch.frac_coords + noise), targets)
