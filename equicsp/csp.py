"""Crystal structure prediction on a dataset: sample each composition k times, then score."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from equicsp.config import Config
from equicsp.data import CrystalDataset, DataReport
from equicsp.diffusion import Diffusion
from equicsp.metrics import CrystalArrays, CrystalResult, MatchSummary, evaluate_matches, summarise
from equicsp.sampler import SampledCrystal, Sampler


@dataclass
class CSPResult:
    summary: MatchSummary
    per_crystal: list[CrystalResult]
    predictions: list[SampledCrystal]


def ground_truth(dataset: CrystalDataset, indices: list[int]) -> list[CrystalArrays]:
    items = [dataset[i] for i in indices]
    return [CrystalArrays.of(d.atom_types, d.frac_coords, d.lengths[0], d.angles[0]) for d in items]


def predict(model: nn.Module, config: Config, dataset: CrystalDataset, indices: list[int], num_samples: int,
            seed: int, device: torch.device | str = "cpu", precision: str = "fp32",
            diffusion: Diffusion | None = None, show_progress: bool = True) -> list[SampledCrystal]:
    """Samples for dataset[indices]; each crystal's noise is keyed by its dataset index."""
    diffusion = diffusion or Diffusion(config, device)
    sampler = Sampler(model, diffusion, config, device, precision)
    compositions = [dataset[i].atom_types for i in indices]
    return sampler.sample(compositions, num_samples, seed, indices=indices, show_progress=show_progress)


MatchJob = tuple[int, CrystalArrays, list[CrystalArrays]]  # (dataset index, ground truth, its k predictions)


def matching_jobs(dataset: CrystalDataset, indices: list[int], predictions: list[SampledCrystal]) -> list[MatchJob]:
    """One job per ground truth: its predictions in sample order."""
    grouped: dict[int, list[CrystalArrays]] = {i: [] for i in indices}
    for crystal in sorted(predictions, key=lambda c: (c.composition_index, c.sample_index)):
        grouped[crystal.composition_index].append(
            CrystalArrays.of(crystal.atom_types, crystal.frac_coords, crystal.lengths, crystal.angles))
    return list(zip(indices, ground_truth(dataset, indices), [grouped[i] for i in indices]))


def unusable_rows(report: DataReport, num_samples: int) -> list[CrystalResult]:
    """Rows of the test file that could not be read: not matched, with the reason, in the denominator."""
    return [CrystalResult(-1, "", 0, False, math.nan, -1, 0, num_samples, f"unusable {row.source}: {row.reason}")
            for row in report.skipped]


def score(dataset: CrystalDataset, indices: list[int], predictions: list[SampledCrystal], num_samples: int,
          processes: int | None = None, show_progress: bool = True) -> tuple[MatchSummary, list[CrystalResult]]:
    indices_, truths, grouped = zip(*matching_jobs(dataset, indices, predictions)) if indices else ((), (), ())
    results = evaluate_matches(list(truths), list(grouped), processes, indices=list(indices_),
                               show_progress=show_progress)
    return summarise(results), results


def run_csp(model: nn.Module, config: Config, dataset: CrystalDataset, num_samples: int = 1, seed: int = 0,
            limit: int | None = None, device: torch.device | str = "cpu", precision: str = "fp32",
            processes: int | None = None, show_progress: bool = True) -> CSPResult:
    indices = list(range(len(dataset) if limit is None else min(limit, len(dataset))))
    predictions = predict(model, config, dataset, indices, num_samples, seed, device, precision,
                          show_progress=show_progress)
    summary, per_crystal = score(dataset, indices, predictions, num_samples, processes, show_progress)
    return CSPResult(summary, per_crystal, predictions)
