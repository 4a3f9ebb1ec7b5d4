"""Coordinate targets, one class per choice of the paper's Table 2 (docs/method.md#coordinates).

A target is chosen once from the config and carries its own choices: it maps the sampled
noise n to the two normalised targets (the score head's and the n~ head's), says whether it
needs the von Mises tables, and turns the network's normalised outputs back into the score
in X that the sampler follows (with the probabilistic-model correction when that is on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from equicsp.config import ObjectiveConfig
from equicsp.model.periodic import TWO_PI, com_free_noise, pm_corrected_score
from equicsp.model.schedules import NoiseSchedule, wrap_centered, wrapped_normal_score
from equicsp.model.von_mises import VonMisesTables


@dataclass
class CoordinateTargets:
    coord_score: torch.Tensor  # (N, 3) for the score head
    coord_noise: torch.Tensor  # (N, 3) for the n~ head


class RawNoiseTarget:
    """DiffCSP: the wrapped-normal score of the noise itself, normalised by E[s^2](t)."""

    needs_tables = False

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def coordinate_score(self, score_output: torch.Tensor, noise_output: torch.Tensor, batch: torch.Tensor,
                         num_crystals: int, atom_counts: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(N, 3) the score in X from the score head's normalised output."""
        return score_output * self.score_scale(atom_counts, timesteps)[:, None]

    def targets(self, noise: torch.Tensor, batch: torch.Tensor, num_crystals: int, atom_counts: torch.Tensor,
                timesteps: torch.Tensor) -> CoordinateTargets:
        sigma = self.schedule.sigmas[timesteps][:, None]
        return CoordinateTargets(
            coord_score=wrapped_normal_score(noise, sigma) / self.score_scale(atom_counts, timesteps)[:, None],
            coord_noise=wrap_centered(noise) / self.noise_scale(atom_counts, timesteps)[:, None])

    def score_scale(self, atom_counts: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(N,) sqrt(E[s^2]) per atom, given each atom's crystal size and timestep."""
        return self.schedule.score_norms[timesteps].sqrt()

    def noise_scale(self, atom_counts: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.schedule.noise_norms[timesteps].sqrt()


class ComFreeTarget:
    """EquiCSP: targets from n~ = w(n - mu); von Mises score, or the wrapped-normal one without VM.

    With prob_model, the score the network gives in n~ is carried over to X by the chain rule
    through the circular mean (docs/method.md#pm-correction), using the n~ head's output.
    """

    needs_tables = True

    def __init__(self, schedule: NoiseSchedule, tables: VonMisesTables, von_mises: bool, prob_model: bool):
        self.schedule = schedule
        self.tables = tables
        self.von_mises = von_mises
        self.prob_model = prob_model
        self.score_norms = tables.von_mises_score_norm if von_mises else tables.wrapped_normal_score_norm

    def coordinate_score(self, score_output: torch.Tensor, noise_output: torch.Tensor, batch: torch.Tensor,
                         num_crystals: int, atom_counts: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(N, 3) the score in X from the heads' normalised outputs."""
        score = score_output * self.score_scale(atom_counts, timesteps)[:, None]
        if not self.prob_model:
            return score
        predicted_noise = noise_output * self.noise_scale(atom_counts, timesteps)[:, None]
        return pm_corrected_score(score, predicted_noise, batch, num_crystals, atom_counts)

    def targets(self, noise: torch.Tensor, batch: torch.Tensor, num_crystals: int, atom_counts: torch.Tensor,
                timesteps: torch.Tensor) -> CoordinateTargets:
        centred = wrap_centered(com_free_noise(noise, batch, num_crystals, atom_counts))  # (N, 3) in [-0.5, 0.5)
        if self.von_mises:
            kappa = self.tables.kappa[atom_counts, timesteps][:, None]
            raw_score = kappa * torch.sin(TWO_PI * centred) * TWO_PI  # docs/method.md#von-mises: minus the VM score
        else:
            raw_score = wrapped_normal_score(centred, self.schedule.sigmas[timesteps][:, None])
        return CoordinateTargets(coord_score=raw_score / self.score_scale(atom_counts, timesteps)[:, None],
                                 coord_noise=centred / self.noise_scale(atom_counts, timesteps)[:, None])

    def score_scale(self, atom_counts: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.score_norms[atom_counts, timesteps].sqrt()

    def noise_scale(self, atom_counts: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.tables.noise_norm[atom_counts, timesteps].sqrt()


def target_class(objective: ObjectiveConfig) -> type[RawNoiseTarget] | type[ComFreeTarget]:
    return ComFreeTarget if objective.com_free_noise else RawNoiseTarget


def build_target(objective: ObjectiveConfig, schedule: NoiseSchedule,
                 tables: VonMisesTables | None) -> RawNoiseTarget | ComFreeTarget:
    if target_class(objective) is RawNoiseTarget:
        return RawNoiseTarget(schedule)
    if tables is None:
        raise ValueError("CoM-free targets need von Mises tables")
    return ComFreeTarget(schedule, tables, objective.von_mises, objective.prob_model)
