"""Crystal structure prediction on a dataset: sample each composition k times, match, summarise.

One pipeline, the `Evaluator`, with two parts chosen by where it runs: a sampling backend (a model
in this process, `SamplingHere`, or Ray's sampling actors) and a matching backend (worker processes
of this machine, `MatchingHere`, or Ray). Every backend takes the same settings, cuts the same
sampling batches (`sampler.sampling_batches`), keys every sample's noise by (seed, composition
index, sample number) and gets the same matching jobs, so all give the same predictions and scores.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from equicsp.config import ARMS, Config, with_sampling_switches
from equicsp.data.crystals import CrystalDataset, DataReport
from equicsp.engine.sampler import SampledCrystal, Sampler, with_sampler_options
from equicsp.evaluation.cross_matching import METRE_PAIRS, match_work, matching_work
from equicsp.evaluation.leakage import LeakageSummary, leaked_test_crystals, summarise_leakage
from equicsp.evaluation.metrics import CrystalArrays, CrystalResult, MatchSummary, parallel_map, summarise
from equicsp.model.diffusion import Diffusion


@dataclass(frozen=True)
class EvaluationSettings:
    num_samples: int = 1  # k: best of k per composition
    seed: int = 0
    limit: int | None = None  # the first M test crystals only
    workers: int = 0  # sampling workers; 0: one per GPU, else one per CPU
    threads: int = 1  # CPU threads of a CPU worker (results are bitwise the same for any number of workers
    #                   with the same threads per worker)
    precision: str = "fp32"
    step_lr: float | None = None  # None: the model's own config
    num_steps: int | None = None
    batch_size: int | None = None
    compile: str | None = None  # run.compile for sampling; None: the model's
    sampling_arm: str | None = None  # sample with this arm's sampling-only switches (a model it shares); None: the model's
    leakage: bool = False  # also score the test crystals no training crystal answers (see leakage.py)
    metre_pairs: int = METRE_PAIRS  # METRe's cross pairs at most, else it is left out; 0: never (cross_matching.py)

    def check(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"the number of samples per composition must be >= 1, not {self.num_samples}")
        if self.workers < 0 or self.threads < 1:
            raise ValueError(f"need workers >= 0 and threads >= 1, not {self.workers} and {self.threads}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, not {self.limit}")
        if self.metre_pairs < 0:
            raise ValueError(f"metre_pairs must be >= 0, not {self.metre_pairs}")
        if self.sampling_arm is not None and self.sampling_arm not in ARMS:
            raise ValueError(f"unknown arm {self.sampling_arm!r}; the arms are {list(ARMS)}")

    def sampling_config(self, model_config: Config) -> Config:
        """The model's config with these sampler settings (and the sampling arm's switches)."""
        config = with_sampler_options(model_config, self.step_lr, self.num_steps, self.batch_size, self.compile)
        if self.sampling_arm is not None:
            config = with_sampling_switches(config, ARMS[self.sampling_arm].objective)
        return config

    def indices(self, dataset: CrystalDataset) -> list[int]:
        return list(range(len(dataset) if self.limit is None else min(self.limit, len(dataset))))


@dataclass
class Evaluation:
    summary: MatchSummary
    per_crystal: list[CrystalResult]
    predictions: list[SampledCrystal]
    sampling_s: float  # sampling proper, once the workers hold the model
    matching_s: float
    workers: int
    config: Config  # the model's config with the evaluation's sampler settings
    run_id: str | None = None  # the MLflow evaluation run
    startup_s: float = 0.0  # starting the sampling workers and loading the model into them
    reused: bool = False  # answered from an earlier identical evaluation's run (no predictions kept)
    leakage: LeakageSummary | None = None  # with settings.leakage


MatchJob = tuple[int, CrystalArrays, list[CrystalArrays]]  # (dataset index, ground truth, its k predictions)


def ground_truth(dataset: CrystalDataset, indices: list[int]) -> list[CrystalArrays]:
    items = [dataset[i] for i in indices]
    return [CrystalArrays.of(d.atom_types, d.frac_coords, d.lengths[0], d.angles[0]) for d in items]


def matching_jobs(dataset: CrystalDataset, indices: list[int], predictions: list[SampledCrystal]) -> list[MatchJob]:
    """One job per ground truth: its predictions in sample order."""
    grouped: dict[int, list[CrystalArrays]] = {i: [] for i in indices}
    for crystal in sorted(predictions, key=lambda c: (c.composition_index, c.sample_index)):
        grouped[crystal.composition_index].append(
            CrystalArrays.of(crystal.atom_types, crystal.frac_coords, crystal.lengths, crystal.angles))
    return list(zip(indices, ground_truth(dataset, indices), [grouped[i] for i in indices]))


def unusable_rows(report: DataReport, num_samples: int) -> list[CrystalResult]:
    """Rows of the test file that could not be read: not matched, with the reason, in the denominator."""
    return [CrystalResult(index=-1, formula="", num_atoms=0, matched=False, rms=math.nan, best_sample=-1, valid_samples=0,
                          num_samples=num_samples, reason=f"unusable {row.source}: {row.reason}")
            for row in report.skipped]


class SamplingBackend(Protocol):
    """Where the samples are drawn: k of each composition, with the config's sampler settings."""

    workers: int  # how many sample at once (reported with the timings)
    precision: str

    def sample(self, config: Config, compositions: list[torch.Tensor], indices: list[int], num_samples: int,
               seed: int, show_progress: bool = True, label: str = "") -> list[SampledCrystal]: ...


class MatchingBackend(Protocol):
    """Where StructureMatcher runs: one answer per job, in job order."""

    def match(self, jobs: list, show_progress: bool = True, label: str = "") -> list: ...


@dataclass
class SamplingHere:
    """A model in this process, sampling on `device`."""

    model: nn.Module
    device: torch.device | str = "cpu"
    precision: str = "fp32"
    workers: int = 1

    def sample(self, config: Config, compositions: list[torch.Tensor], indices: list[int], num_samples: int,
               seed: int, show_progress: bool = True, label: str = "") -> list[SampledCrystal]:
        sampler = Sampler(self.model, Diffusion(config, self.device), config, self.device, self.precision)
        return sampler.sample(compositions, num_samples, seed, indices=indices, show_progress=show_progress)


@dataclass
class MatchingHere:
    """Worker processes of this machine (None: one per CPU)."""

    processes: int | None = None

    def match(self, jobs: list, show_progress: bool = True, label: str = "") -> list:
        return parallel_map(match_work, jobs, self.processes, f"{label}: matching" if label else "matching",
                            show_progress)


@dataclass
class Evaluator:
    """Sample a dataset's compositions, match the samples to the dataset's structures, summarise."""

    sampling: SamplingBackend
    matching: MatchingBackend

    @classmethod
    def here(cls, model: nn.Module, device: torch.device | str = "cpu", precision: str = "fp32",
             processes: int | None = None) -> Evaluator:
        """Sampling and matching in this process (matching in `processes` worker processes)."""
        return cls(SamplingHere(model, device, precision), MatchingHere(processes))

    def evaluate(self, model_config: Config, dataset: CrystalDataset, settings: EvaluationSettings,
                 show_progress: bool = True, label: str = "") -> Evaluation:
        """k samples of each of dataset's compositions (the first settings.limit), matched and summarised.

        Rows of the test file that could not be read count as not matched (when no limit is set).
        label names the progress bars (e.g. the arm)."""
        settings.check()
        if self.sampling.precision != settings.precision:
            raise ValueError(f"the sampling pool samples in {self.sampling.precision}, the evaluation asks for "
                             f"{settings.precision}")
        config = settings.sampling_config(model_config)
        indices = settings.indices(dataset)
        start = time.perf_counter()
        predictions = self.sampling.sample(config, [dataset[i].atom_types for i in indices], indices,
                                           settings.num_samples, settings.seed, show_progress, label)
        sampled = time.perf_counter()
        per_crystal = match_predictions(self.matching, dataset, indices, predictions, settings.metre_pairs,
                                        show_progress, label)
        if settings.limit is None:
            per_crystal += unusable_rows(dataset.report, settings.num_samples)
        return Evaluation(summary=summarise(per_crystal), per_crystal=per_crystal, predictions=predictions,
                          sampling_s=sampled - start, matching_s=time.perf_counter() - sampled,
                          workers=self.sampling.workers, config=config)


def score(dataset: CrystalDataset, indices: list[int], predictions: list[SampledCrystal], num_samples: int,
          processes: int | None = None, show_progress: bool = True,
          metre_pairs: int = METRE_PAIRS) -> tuple[MatchSummary, list[CrystalResult]]:
    """Match predictions of dataset[indices] sampled elsewhere (e.g. on a GPU machine without pymatgen), in
    worker processes, METRe's cross pairs among them when there are at most metre_pairs."""
    results = match_predictions(MatchingHere(processes), dataset, indices, predictions, metre_pairs, show_progress)
    return summarise(results), results


def match_predictions(matching: MatchingBackend, dataset: CrystalDataset, indices: list[int],
                      predictions: list[SampledCrystal], metre_pairs: int, show_progress: bool = True,
                      label: str = "") -> list[CrystalResult]:
    """Each of dataset[indices] matched against its predictions on `matching`, METRe's cross pairs among them
    when there are at most metre_pairs."""
    work = matching_work(matching_jobs(dataset, indices, predictions), metre_pairs)
    return work.results(matching.match(work.jobs, show_progress, label))


def add_leakage(evaluation: Evaluation, train: CrystalDataset, test: CrystalDataset, processes: int | None = None,
                show_progress: bool = True) -> Evaluation:
    """Mark each test crystal leaked or not (a training crystal answers it) and score the unleaked ones."""
    leaked = leaked_test_crystals(train, test, processes, show_progress)
    for result in evaluation.per_crystal:
        if result.index >= 0:
            result.leaked = leaked[result.index]
    evaluation.leakage = summarise_leakage(evaluation.per_crystal, leaked)
    return evaluation
