"""The forward process: the pieces a config chooses (lattice representation, schedules, coordinate
target, von Mises tables when the target needs them), and noising a batch with them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from equicsp.config import Config
from equicsp.data.batches import CrystalBatch, atom_counts
from equicsp.model.atom_types import NUM_TYPE_CLASSES, AtomTypeDiffusion
from equicsp.model.lattice import LATTICE_REPRESENTATIONS, NUM_PERMUTATIONS, LatticeRepresentation
from equicsp.model.noise import Step, atom_keys, keyed_normal, keyed_uniform
from equicsp.model.schedules import NoiseSchedule, wrap
from equicsp.model.targets import CoordinateTargets, build_target, target_class
from equicsp.model.von_mises import VonMisesTables, load_or_build_tables
from equicsp.task import task_of

# Noise streams of one training step.
_TIMESTEP, _LATTICE_NOISE, _COORD_NOISE, _PERMUTATION, _TYPE_NOISE = range(5)


@dataclass
class NoisedBatch:
    timesteps: torch.Tensor  # (B,) in 1 .. T
    lattice: torch.Tensor  # (B, D) l_t in the lattice representation (D = 6 projected, 9 matrix)
    lattice_noise: torch.Tensor  # (B, D) eps_l
    frac_coords: torch.Tensor  # (N, 3) X_t = w(X_0 + n)
    targets: CoordinateTargets
    atom_types: torch.Tensor  # the denoiser's type input: (N,) atomic numbers (csp), (N, 100) noisy one-hots (generation)
    type_noise: torch.Tensor | None = None  # (N, 100) eps of the types (generation), else None


class Diffusion:
    """Schedules, von Mises tables (when the target needs them), the coordinate target and the lattice representation."""

    def __init__(self, config: Config, device: torch.device | str = "cpu",
                 announce: Callable[[str], None] | None = None):
        """announce: told what takes long while it happens (building the von Mises tables on a cache miss)."""
        d = config.diffusion
        self.config = config
        schedule = NoiseSchedule.build(d.timesteps, d.sigma_begin, d.sigma_end, d.cosine_offset)
        self.lattice: LatticeRepresentation = LATTICE_REPRESENTATIONS[config.objective.lattice]
        tables = None
        if target_class(config.objective).needs_tables:
            tables = load_or_build_tables(config.data.max_atoms, schedule.sigmas[1:], d.von_mises_samples,
                                          d.von_mises_seed, announce).to(device)
        self.tables: VonMisesTables | None = tables
        self.schedule = schedule.to(device)
        self.target = build_target(config.objective, self.schedule, tables)
        # Generation diffuses the atom types too; CSP keeps them given.
        self.types = AtomTypeDiffusion(self.schedule) if task_of(config).diffuses_types else None

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    @property
    def tables_key(self) -> str | None:
        return self.tables.key if self.tables is not None else None

    def check_atom_counts(self, num_atoms: torch.Tensor | list[int]) -> None:
        """Fails when a crystal is larger than the von Mises tables cover (counts on the host: no device read)."""
        largest = max(num_atoms.tolist() if isinstance(num_atoms, torch.Tensor) else num_atoms)
        if self.tables is not None and largest > self.tables.max_atoms:
            raise ValueError(f"a crystal has {largest} atoms but data.max_atoms is {self.tables.max_atoms}")

    def noise(self, batch: CrystalBatch, seed: int, step: Step) -> NoisedBatch:
        """Sample t per crystal and noise lattice and coordinates (docs/method.md#lattice, docs/method.md#coordinates).

        The draws are keyed by each crystal's dataset index (batch.crystal_id), the seed and the
        step (the epoch), so a crystal gets the same noise however the data is batched or
        sharded across workers.
        """
        num_crystals = batch.num_atoms.shape[0]
        keys = crystal_keys(batch)
        t = (keyed_uniform(keys, 1, seed, step, _TIMESTEP)[:, 0] * self.timesteps).long().clamp(max=self.timesteps - 1) + 1
        lattice_0 = self.lattice.encode(batch.lengths, batch.angles)
        lattice_noise = keyed_normal(keys, self.lattice.dim, seed, step, _LATTICE_NOISE, lattice_0.dtype)
        alpha_bar = self.schedule.alpha_bars[t][:, None]
        lattice_t = alpha_bar.sqrt() * lattice_0 + (1 - alpha_bar).sqrt() * lattice_noise
        t_atom = t[batch.batch]
        per_atom = atom_keys(keys, batch.batch, batch.num_atoms)
        eps = keyed_normal(per_atom, 3, seed, step, _COORD_NOISE, batch.frac_coords.dtype)
        noise = self.schedule.sigmas[t_atom][:, None] * eps
        counts = atom_counts(batch.num_atoms, batch.batch, batch.real_atoms)
        targets = self.target.targets(noise, batch.batch, num_crystals, counts, t_atom)
        noised = NoisedBatch(t, lattice_t, lattice_noise, wrap(batch.frac_coords + noise), targets, batch.atom_types)
        if self.types is not None:
            noised.type_noise = keyed_normal(per_atom, NUM_TYPE_CLASSES, seed, step, _TYPE_NOISE, lattice_0.dtype)
            noised.atom_types = self.types.noise(batch.atom_types, t_atom, noised.type_noise)
        return noised


def crystal_keys(batch: CrystalBatch) -> torch.Tensor:
    """(B,) the crystals' dataset indices, which key their noise."""
    return batch.crystal_id.long()


def keyed_permutations(batch: CrystalBatch, seed: int, step: Step) -> torch.Tensor:
    """(B,) one of the five non-identity axis permutations per crystal, keyed like the noise."""
    u = keyed_uniform(crystal_keys(batch), 1, seed, step, _PERMUTATION)[:, 0]
    return (u * (NUM_PERMUTATIONS - 1)).long().clamp(max=NUM_PERMUTATIONS - 2) + 1
