"""Predictor-corrector sampling (docs/method.md#predictor-corrector), batched, seeded per crystal.

The sampler follows the pieces the config chose: the coordinate target turns the network's
outputs into the score in X (PM-corrected or not), and the lattice representation says what
the lattice DDPM runs on and how to read lengths and angles back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from equicsp.config import CompileSetting, Config
from equicsp.data.batches import GraphSizes, Layout, atom_counts, filled, upload
from equicsp.devices import autocast
from equicsp.engine.compiled import (
    ShapeLog,
    begin_step,
    compile_enabled,
    compile_step,
    configure_precision,
    keep_tables_in_place,
)
from equicsp.model.atom_types import NUM_TYPE_CLASSES, decode
from equicsp.model.diffusion import Diffusion
from equicsp.model.noise import atom_keys, keyed_normal, keyed_uniform, sample_keys
from equicsp.model.schedules import at_last_step, entry, wrap
from equicsp.task import task_of

# Noise streams of one step, so corrector, predictor and lattice never share a draw.
_CORRECTOR, _PREDICTOR, _LATTICE, _INITIAL_COORDS, _INITIAL_LATTICE, _TYPES, _INITIAL_TYPES = range(7)


@dataclass
class SampledCrystal:
    composition_index: int
    sample_index: int
    atom_types: torch.Tensor  # (n,)
    frac_coords: torch.Tensor  # (n, 3)
    lengths: torch.Tensor  # (3,)
    angles: torch.Tensor  # (3,) degrees

    def non_finite_part(self) -> str:
        """"" when every number is finite, else which part is not (a diverged model samples nan)."""
        if not (torch.isfinite(self.lengths).all() and torch.isfinite(self.angles).all()):
            return "lattice"
        if not torch.isfinite(self.frac_coords).all():
            return "coordinates"
        return ""


def with_sampler_options(config: Config, step_lr: float | None = None, num_steps: int | None = None,
                         batch_size: int | None = None, compile: str | None = None) -> Config:
    """The config with the sampler settings that are given (None keeps the config's own), and run.compile."""
    sampler = replace(config.sampler, step_lr=config.sampler.step_lr if step_lr is None else step_lr,
                      num_steps=config.sampler.num_steps if num_steps is None else num_steps,
                      batch_size=config.sampler.batch_size if batch_size is None else batch_size)
    # Any other string than auto, on or off is refused by validate() below.
    run = config.run if compile is None else replace(config.run, compile=cast(CompileSetting, compile))
    return replace(config, sampler=sampler, run=run).validate()


COMPILE_HELP = ("compile the sampling step: auto (on CUDA), on, off; default: the model's run.compile. Compiling "
                "takes a while once per batch size, so a few samples on a GPU may come sooner with off")


def timestep_sequence(timesteps: int, num_steps: int) -> list[int]:
    """T .. 1 descending; num_steps < T picks evenly spaced timesteps (always T and 1)."""
    if num_steps in (0, timesteps):
        return list(range(timesteps, 0, -1))
    chosen = torch.linspace(timesteps, 1, num_steps).round().long().unique(sorted=True).flip(0)
    return [int(t) for t in chosen]


class Sampler:
    """Runs the predictor-corrector loop; each step is compiled (compiled.py) when config.run.compile says so on
    this device, and then the batch is padded to a size bucket."""

    def __init__(self, denoiser: nn.Module, diffusion: Diffusion, config: Config,
                 device: torch.device | str = "cpu", precision: str = "fp32", compile_backend: str = "inductor"):
        self.denoiser = denoiser.eval()
        self.diffusion = diffusion
        self.schedule = diffusion.schedule
        self.config = config
        self.device = torch.device(device)
        self.precision = precision
        self.lattice = diffusion.lattice
        self.compiled = compile_enabled(config.run.compile, self.device)
        configure_precision(precision, self.device, self.compiled)
        # A tensor, not a float the compiled step would bake in: a step-size search reuses one graph for every value.
        self._step_lr = torch.tensor(config.sampler.step_lr, dtype=torch.float32, device=self.device)
        self._step = compile_step(self._pc_step, self.device, compile_backend) if self.compiled else self._pc_step
        self._shapes = ShapeLog("sampling step")
        if self.compiled:
            keep_tables_in_place(diffusion)

    def score(self, atom_types: torch.Tensor, frac_coords: torch.Tensor, lattice: torch.Tensor, t: int | torch.Tensor,
              layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        """eps_hat_l and the coordinate score in X (unnormalised; PM-corrected when the target has it)."""
        lattice_noise, score, _ = self.predict(atom_types, frac_coords, lattice, t, layout)
        return lattice_noise, score

    def predict(self, atom_types: torch.Tensor, frac_coords: torch.Tensor, lattice: torch.Tensor, t: int | torch.Tensor,
                layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """score's outputs and the atom types' eps_hat ((N, 100) for generation, else None)."""
        num_crystals = layout.sizes.crystals
        timesteps = (t.expand(num_crystals) if isinstance(t, torch.Tensor)
                     else torch.full((num_crystals,), t, device=self.device, dtype=torch.long))
        with autocast(self.device, self.precision):
            out = self.denoiser(atom_types, frac_coords, lattice, timesteps, layout.batch, layout.num_atoms,
                                layout.sizes, layout.real)
        counts = atom_counts(layout.num_atoms, layout.batch, layout.real_atoms)
        score = self.diffusion.target.coordinate_score(out.coord_score, out.coord_noise, layout.batch, num_crystals,
                                                       counts, timesteps[layout.batch])
        return out.lattice_noise, score, out.type_noise

    def lattice_step(self, lattice: torch.Tensor, lattice_noise: torch.Tensor, t: int | torch.Tensor, s: int | torch.Tensor,
                     z: torch.Tensor) -> torch.Tensor:
        """DDPM from t to s < t: the step of docs/method.md#lattice-step for s = t - 1, its strided form otherwise.

        Written through the implied clean lattice l0_hat = (l_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
        and the Gaussian posterior q(l_s | l_t, l0_hat), which is the same step algebraically.
        With sampler.clip_lattice, l0_hat is first clamped to physical cells (DDPM's
        clip-denoised): at t = T the step multiplies any error in eps_hat by 1 / sqrt(1 - 0.9999)
        = 100, and an imperfect model's lattice would otherwise leave every physical range.
        """
        alpha_bar_t, alpha_bar_s = entry(self.schedule.alpha_bars, t), entry(self.schedule.alpha_bars, s)
        alpha_ts = alpha_bar_t / alpha_bar_s
        beta_ts = 1 - alpha_ts
        clean = (lattice - (1 - alpha_bar_t).sqrt() * lattice_noise) / alpha_bar_t.sqrt()
        if self.config.sampler.clip_lattice:
            clean = self.lattice.clamp_physical(clean)
        mean = (alpha_bar_s.sqrt() * beta_ts * clean + alpha_ts.sqrt() * (1 - alpha_bar_s) * lattice) / (1 - alpha_bar_t)
        std = (beta_ts * (1 - alpha_bar_s) / (1 - alpha_bar_t)).sqrt()
        return at_last_step(s, mean, mean + std * z)

    @torch.no_grad()  # not inference_mode: compiled steps under it have failed in torch 2.11
    def sample_batch(self, atom_types: torch.Tensor, num_atoms: torch.Tensor | list[int], keys: torch.Tensor, seed: int,
                     progress: tqdm | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) atom types, (B,) atom counts, (B,) keys -> ((N, 3) X_0, (B, D) lattice in the representation).

        The atom counts are read on the host (a list, or a CPU tensor), so no step asks the device for a size.
        """
        task_of(self.config).check_predicts_structures()
        layout, real = self._layout(num_atoms)
        atom_types = atom_types.to(self.device)
        if layout.real is not None:
            atom_types = filled(atom_types, layout.sizes.atoms - real.atoms, 1)
        _, x, lattice = self._run(atom_types, layout, self._keys(keys, layout), seed, progress)
        return x[:real.atoms], lattice[:real.crystals]

    @torch.no_grad()  # not inference_mode: compiled steps under it have failed in torch 2.11
    def generate_batch(self, num_atoms: torch.Tensor | list[int], keys: torch.Tensor, seed: int,
                       progress: tqdm | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generation: (B,) atom counts (on the host), (B,) keys -> ((N,) atomic numbers, (N, 3) X_0, (B, D) lattice).

        The types start from N(0, I) in R^100 and follow the DDPM (docs/method.md#generation).
        """
        task_of(self.config).check_generates()
        layout, real = self._layout(num_atoms)
        keys = self._keys(keys, layout)
        types = keyed_normal(atom_keys(keys, layout.batch, layout.num_atoms), NUM_TYPE_CLASSES, seed, 0,
                             _INITIAL_TYPES)
        types, x, lattice = self._run(types, layout, keys, seed, progress)
        return decode(types[:real.atoms]), x[:real.atoms], lattice[:real.crystals]

    def _layout(self, num_atoms: torch.Tensor | list[int]) -> tuple[Layout, GraphSizes]:
        """The batch's layout on the device (padded to a bucket when the step is compiled) and its real sizes."""
        counts = num_atoms.tolist() if isinstance(num_atoms, torch.Tensor) else list(num_atoms)
        self.diffusion.check_atom_counts(counts)
        # A fixed crystal capacity, so every batch of up to sampler.batch_size crystals can share a graph.
        capacity = max(self.config.sampler.batch_size, len(counts)) + 1 if self.compiled else None
        return Layout.of(counts, self.device, capacity), GraphSizes.of(counts)

    def _keys(self, keys: torch.Tensor, layout: Layout) -> torch.Tensor:
        keys = keys.to(self.device)
        return keys if layout.real is None else filled(keys, layout.sizes.crystals - keys.shape[0], 0)

    def _run(self, atom_types: torch.Tensor, layout: Layout, keys: torch.Tensor, seed: int,
             progress: tqdm | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The predictor-corrector loop; the types follow their DDPM when they are (N, 100) vectors."""
        dtype = torch.float32
        per_atom = atom_keys(keys, layout.batch, layout.num_atoms)
        x = keyed_uniform(per_atom, 3, seed, 0, _INITIAL_COORDS, dtype)
        lattice = keyed_normal(keys, self.lattice.dim, seed, 0, _INITIAL_LATTICE, dtype)
        sequence = timestep_sequence(self.diffusion.timesteps, self.config.sampler.num_steps)
        # Every step's t and s as device scalars: one step function (and one compiled graph) serves them all.
        steps = upload(sequence + [0], self.device)
        if self.compiled:
            self._shapes.see(layout.sizes)
        for index in range(len(sequence)):
            if self.compiled:
                begin_step(self.device)
            out = self._step(atom_types, x, lattice, steps[index], steps[index + 1], layout, per_atom, keys, seed)
            # Clones when compiled: a CUDA-graph replay overwrites its outputs, which the next step reads.
            atom_types, x, lattice = (value.clone() for value in out) if self.compiled else out
            if progress is not None:
                progress.update(1)
        return atom_types, x, lattice

    def _pc_step(self, atom_types: torch.Tensor, x: torch.Tensor, lattice: torch.Tensor, t: torch.Tensor,
                 s: torch.Tensor, layout: Layout, per_atom: torch.Tensor, keys: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One predictor-corrector step from t to s (0-d device tensors) -> (types, x, lattice)."""
        dtype = torch.float32
        sigmas = self.schedule.sigmas
        sigma_t, sigma_s = entry(sigmas, t), entry(sigmas, s)
        # Corrector: Langevin at sigma_t; the lattice stays. The last step (t = 1) adds no noise,
        # as in both reference codes: its jitter would be left in the final structure.
        _, score = self.score(atom_types, x, lattice, t, layout)
        step = self._step_lr * (sigma_t / sigmas[1]) ** 2
        jitter = torch.where(t > 1, (2 * step).sqrt(), 0) * keyed_normal(per_atom, 3, seed, t, _CORRECTOR, dtype)
        x = wrap(x - step * score + jitter)
        # Predictor: reverse-diffusion step for X, DDPM step for l (and the types, when diffused).
        lattice_noise, score, type_noise = self.predict(atom_types, x, lattice, t, layout)
        variance_drop = sigma_t**2 - sigma_s**2
        z = keyed_normal(per_atom, 3, seed, t, _PREDICTOR, dtype)
        x = wrap(x - variance_drop * score + (sigma_s**2 * variance_drop / sigma_t**2).sqrt() * z)
        z = keyed_normal(keys, self.lattice.dim, seed, t, _LATTICE, dtype)
        lattice = self.lattice_step(lattice, lattice_noise, t, s, z)
        if self.diffusion.types is not None:  # generation: the types follow their DDPM too
            z = keyed_normal(per_atom, NUM_TYPE_CLASSES, seed, t, _TYPES, dtype)
            assert type_noise is not None  # a diffusion of the atom types goes with a denoiser that has a type head
            atom_types = self.diffusion.types.step(atom_types, type_noise.to(dtype), t, s, z,
                                                    self.config.sampler.clip_types)
        return atom_types, x, lattice

    def sample_jobs(self, jobs: list[SamplingJob], seed: int, progress: tqdm | None = None) -> list[SampledCrystal]:
        """One batch of (composition index, sample number, (n,) atom types) -> its sampled crystals."""
        types = [atoms.long() for _, _, atoms in jobs]
        num_atoms = torch.tensor([len(t) for t in types], dtype=torch.long)
        keys = sample_keys(torch.tensor([index for index, _, _ in jobs], dtype=torch.long),
                           torch.tensor([sample for _, sample, _ in jobs], dtype=torch.long))
        x, lattice = self.sample_batch(torch.cat(types), num_atoms, keys, seed, progress)
        lengths, angles = self.lattice.decode(lattice.float().cpu())
        return [SampledCrystal(composition_index=index, sample_index=sample, atom_types=atoms, frac_coords=coords,
                               lengths=length, angles=angle)
                for (index, sample, atoms), coords, length, angle
                in zip(jobs, x.cpu().split(num_atoms.tolist()), lengths, angles)]

    def num_steps(self) -> int:
        return len(timestep_sequence(self.diffusion.timesteps, self.config.sampler.num_steps))

    def sample(self, compositions: list[torch.Tensor], num_samples: int = 1, seed: int = 0,
               indices: list[int] | None = None, show_progress: bool = True) -> list[SampledCrystal]:
        """num_samples crystals per composition (a (n,) tensor of atomic numbers).

        indices are the compositions' positions in the whole set (default 0 .. len - 1): a
        crystal's noise depends on (seed, index, sample number) only, never on batching.
        """
        batches = sampling_batches(compositions, num_samples, self.config.sampler.batch_size, indices)
        results: list[SampledCrystal] = []
        with tqdm(total=self.num_steps() * len(batches), desc="sampling", unit="step",
                  disable=not show_progress) as progress:
            for jobs in batches:
                results.extend(self.sample_jobs(jobs, seed, progress))
        return results


SamplingJob = tuple[int, int, torch.Tensor]  # (composition index, sample number, (n,) atom types)


def sampling_batches(compositions: list[torch.Tensor], num_samples: int, batch_size: int,
                     indices: list[int] | None = None) -> list[list[SamplingJob]]:
    """Every (composition, sample) job in order, cut into batches of batch_size.

    The cut depends on the set and the batch size only, so any worker that samples a batch
    computes exactly what a single process would.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, not {num_samples}")
    indices = list(range(len(compositions))) if indices is None else list(indices)
    jobs = [(indices[position], sample, atoms) for position, atoms in enumerate(compositions)
            for sample in range(num_samples)]
    return [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]
