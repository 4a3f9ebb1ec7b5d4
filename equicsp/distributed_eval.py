"""CSP evaluation sharded over Ray, and the evaluation of a logged MLflow run.

Sampling runs on one actor per GPU (or on CPU workers, one core each by default);
matching runs in one-CPU Ray tasks over the whole cluster. The sampling batches are cut
from the whole test set by `sampler.batch_size` alone and every crystal's noise is keyed by
(seed, composition index, sample number), so the predictions are the same whichever worker
samples which batch, and whatever the number of workers.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from equicsp import tracking
from equicsp.cache import cache_key, check_writable_folder
from equicsp.checkpoint import model_from_checkpoint
from equicsp.config import ARMS, Config, config_from_dict, with_sampling_switches
from equicsp.csp import MatchJob, matching_jobs, unusable_rows
from equicsp.data import CrystalDataset, PreprocessOptions, find_data_folder, load_crystals, load_splits
from equicsp.devices import resolve_device
from equicsp.diffusion import Diffusion
from equicsp.distributed import connect_ray
from equicsp.metrics import (
    CrystalResult,
    MatchSummary,
    match_one,
    matching_chunk_size,
    structure_of,
    summarise,
    write_results_csv,
)
from equicsp.plots import evaluation_figure
from equicsp.sampler import SampledCrystal, Sampler, SamplingJob, sampling_batches, with_sampler_options


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
    sampling_arm: str | None = None  # sample with this arm's sampling-only switches (a model it shares); None: the model's

    def check(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"the number of samples per composition must be >= 1, not {self.num_samples}")
        if self.workers < 0 or self.threads < 1:
            raise ValueError(f"need workers >= 0 and threads >= 1, not {self.workers} and {self.threads}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, not {self.limit}")
        if self.sampling_arm is not None and self.sampling_arm not in ARMS:
            raise ValueError(f"unknown arm {self.sampling_arm!r}; the arms are {list(ARMS)}")


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


class SamplingWorker:
    """A Ray actor holding one copy of the model; samples the batches it is handed, with any sampler settings."""

    def __init__(self, checkpoint: dict[str, Any], precision: str, threads: int):

        torch.set_num_threads(threads)
        self.device = resolve_device("auto")  # the GPU Ray assigned to this actor, if any
        _, self.model = model_from_checkpoint(checkpoint, self.device)
        self.precision = precision
        self.diffusions: dict[str, Any] = {}  # one per diffusion config (its von Mises tables)

    def sample(self, config: dict[str, Any], jobs: list[SamplingJob], seed: int) -> list[SampledCrystal]:

        sampling_config = config_from_dict(config)
        key = repr(sampling_config.diffusion) + repr(sampling_config.objective)
        if key not in self.diffusions:
            self.diffusions[key] = Diffusion(sampling_config, self.device)
        sampler = Sampler(self.model, self.diffusions[key], sampling_config, self.device, self.precision)
        return sampler.sample_jobs(jobs, seed)

    def match(self, jobs: list[MatchJob]) -> list[CrystalResult]:
        return _match_chunk(jobs)

    def ready(self) -> bool:
        return True


def _match_chunk(jobs: list[MatchJob]) -> list[CrystalResult]:
    return [match_one(job) for job in jobs]


def sampling_resources(workers: int, threads: int = 1) -> tuple[int, bool, int]:
    """(workers, use_gpu, threads per worker) for this Ray cluster; fails before anything starts."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        workers = workers or gpus
        if workers > gpus:
            raise ValueError(f"{workers} sampling workers asked for, but the cluster has {gpus} GPUs")
        return workers, True, 1
    workers = workers or max(1, cpus // threads)
    if workers * threads > cpus:
        raise ValueError(f"{workers} sampling workers x {threads} threads asked for, but the cluster has {cpus} CPUs")
    return workers, False, threads


class SamplingPool:
    """Sampling actors holding the model, kept across evaluations (a step-size search reuses them)."""

    def __init__(self, checkpoint: dict[str, Any], workers: int = 0, threads: int = 1, precision: str = "fp32"):
        import ray

        self.workers, use_gpu, threads = sampling_resources(workers, threads)
        # "DEFAULT": outside the caller's placement group (a Tune trial holds almost no resources of its own).
        actor = ray.remote(SamplingWorker).options(num_cpus=threads, num_gpus=1 if use_gpu else 0,
                                                   scheduling_strategy="DEFAULT")
        checkpoint_ref = ray.put(checkpoint)
        self.actors = [actor.remote(checkpoint_ref, precision, threads) for _ in range(self.workers)]

    def wait_ready(self) -> None:
        """Until every actor has started and loaded the model."""
        import ray

        ray.get([worker.ready.remote() for worker in self.actors])

    def sample(self, config: Config, compositions: list[torch.Tensor], indices: list[int], num_samples: int,
               seed: int, show_progress: bool = True, label: str = "") -> list[SampledCrystal]:
        """k samples of every composition, the batches spread over the actors; label names the bar (e.g. the arm)."""
        from ray.util import ActorPool

        batches = sampling_batches(compositions, num_samples, config.sampler.batch_size, indices)
        settings = config.to_dict()
        outputs = ActorPool(self.actors).map_unordered(
            lambda worker, jobs: worker.sample.remote(settings, jobs, seed), batches)
        predictions: list[SampledCrystal] = []
        for crystals in tqdm(outputs, total=len(batches), desc=_bar(label, f"sampling ({self.workers} workers)"),
                             unit="batch",
                             disable=not show_progress):
            predictions.extend(crystals)
        return predictions

    def match(self, jobs: list[MatchJob], show_progress: bool = True, label: str = "") -> list[CrystalResult]:
        """StructureMatcher on the pool's own actors (which hold their CPUs for as long as the pool lives)."""
        from ray.util import ActorPool

        size = matching_chunk_size(len(jobs), len(self.actors))
        chunks = [jobs[start:start + size] for start in range(0, len(jobs), size)]
        outputs = ActorPool(self.actors).map_unordered(lambda worker, chunk: worker.match.remote(chunk), chunks)
        results = [result for part in tqdm(outputs, total=len(chunks), desc=_bar(label, "matching"), unit="chunk",
                                           disable=not show_progress) for result in part]
        return in_job_order(results, jobs)

    def close(self) -> None:
        import ray

        for worker in self.actors:
            ray.kill(worker)
        self.actors = []

    def __enter__(self) -> "SamplingPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _bar(label: str, what: str) -> str:
    return f"{label}: {what}" if label else what


def match_on_ray(jobs: list[MatchJob], show_progress: bool = True, label: str = "") -> list[CrystalResult]:
    """StructureMatcher over every job in one-CPU Ray tasks; results in the jobs' order."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    chunk = matching_chunk_size(len(jobs), cpus)
    task = ray.remote(num_cpus=1, scheduling_strategy="DEFAULT")(_match_chunk)
    pending = [task.remote(jobs[start:start + chunk]) for start in range(0, len(jobs), chunk)]
    results: list[CrystalResult] = []
    with tqdm(total=len(jobs), desc=_bar(label, "matching"), unit="crystal", disable=not show_progress) as progress:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            part = ray.get(done[0])
            results.extend(part)
            progress.update(len(part))
    return in_job_order(results, jobs)


def in_job_order(results: list[CrystalResult], jobs: list[MatchJob]) -> list[CrystalResult]:
    order = {job[0]: position for position, job in enumerate(jobs)}
    return sorted(results, key=lambda result: order[result.index])


def evaluate_checkpoint(checkpoint: dict[str, Any], dataset: CrystalDataset, settings: EvaluationSettings,
                        show_progress: bool = True, pool: SamplingPool | None = None, label: str = "") -> Evaluation:
    """Sample and score dataset (the first settings.limit crystals) with a checkpoint read into memory.

    Rows of the test file that could not be read count as not matched (when no limit is set).
    A pool made for this checkpoint can be passed in to keep its actors between evaluations;
    it then matches too (its actors hold their CPUs, so Ray tasks might wait on them forever).
    Without one, a pool samples and goes, and matching spreads over the cluster in Ray tasks.
    """

    settings.check()
    config = with_sampler_options(config_from_dict(checkpoint["config"]), settings.step_lr, settings.num_steps,
                                  settings.batch_size)
    if settings.sampling_arm is not None:
        config = with_sampling_switches(config, ARMS[settings.sampling_arm].objective)
    connect_ray()
    own_pool = pool is None
    indices = list(range(len(dataset) if settings.limit is None else min(settings.limit, len(dataset))))
    begin = time.perf_counter()
    pool = pool or SamplingPool(checkpoint, settings.workers, settings.threads, settings.precision)
    try:
        pool.wait_ready()
        start = time.perf_counter()
        predictions = pool.sample(config, [dataset[i].atom_types for i in indices], indices, settings.num_samples,
                                  settings.seed, show_progress, label)
    finally:
        if own_pool:
            pool.close()
    sampled = time.perf_counter()
    jobs = matching_jobs(dataset, indices, predictions)
    per_crystal = match_on_ray(jobs, show_progress, label) if own_pool else pool.match(jobs, show_progress, label)
    matching_s = time.perf_counter() - sampled
    if settings.limit is None:
        per_crystal += unusable_rows(dataset.report, settings.num_samples)
    return Evaluation(summarise(per_crystal), per_crystal, predictions, sampled - start, matching_s, pool.workers,
                      config, startup_s=start - begin)


def write_predictions(predictions: list[SampledCrystal], formulas: dict[int, str], path: Path) -> Path:
    """Every predicted structure as a CIF, in one zip archive (INDEX_FORMULA_SAMPLE.cif)."""
    from pymatgen.io.cif import CifWriter


    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for crystal in sorted(predictions, key=lambda c: (c.composition_index, c.sample_index)):
            name = f"{crystal.composition_index:06d}_{formulas.get(crystal.composition_index, 'x')}_" \
                   f"{crystal.sample_index}.cif"
            part = crystal.non_finite_part()
            try:
                text = f"# not writable as a structure: non-finite {part}\n" if part else str(CifWriter(structure_of(crystal)))
            except Exception as error:  # a sampled lattice pymatgen cannot build
                text = f"# not writable as a structure: {error}\n"
            archive.writestr(name, text)
    return path


def write_report(evaluation: Evaluation, dataset: CrystalDataset, out: Path) -> dict[str, Path]:
    """The per-crystal CSV, the CIF archive, the summary, the data report and the figure, in out/."""

    out.mkdir(parents=True, exist_ok=True)
    formulas = {r.index: r.formula for r in evaluation.per_crystal if r.index >= 0}
    files = {"per_crystal": out / "per_crystal.csv", "predictions": out / "predictions.zip",
             "summary": out / "summary.json", "data_report": out / "data_report.json",
             "figure": out / "evaluation.png"}
    write_results_csv(evaluation.per_crystal, files["per_crystal"])
    write_predictions(evaluation.predictions, formulas, files["predictions"])
    files["summary"].write_text(json.dumps(summary_record(evaluation), indent=1))
    files["data_report"].write_text(dataset.report.to_json())
    evaluation_figure(evaluation.per_crystal, files["figure"])
    return files


def summary_record(evaluation: Evaluation) -> dict[str, float]:
    """The metrics logged for an evaluation (rmse left out when nothing matched)."""
    summary = evaluation.summary
    total_s = evaluation.startup_s + evaluation.sampling_s + evaluation.matching_s
    record = {**asdict(summary), "startup_s": evaluation.startup_s, "sampling_s": evaluation.sampling_s,
              "matching_s": evaluation.matching_s, "total_s": total_s,
              "crystals_per_s": summary.num_crystals / total_s if total_s else 0.0}
    return {key: float(value) for key, value in record.items() if not (key == "rmse" and math.isnan(value))}


def evaluate_logged_run(run_id: str, settings: EvaluationSettings, data: str | None = None,
                        tracking_uri: str | None = None, out: Path | None = None,
                        extra_tags: dict[str, str] | None = None, show_progress: bool = True,
                        label: str = "") -> Evaluation:
    """Evaluate the model of MLflow training run `run_id` and log a child evaluation run under it.

    The same evaluation (run, data content, settings) asked for again is answered from its
    finished MLflow run instead of being computed and logged twice. The report goes to MLflow
    first and is copied to `out` afterwards, so a folder that fails late loses nothing logged;
    `out` is checked before any work.
    """

    began_ms = int(time.time() * 1000)
    settings.check()
    if out:
        check_writable_folder(Path(out))
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    checkpoint = tracking.read_logged_checkpoint(uri, run_id)
    training_run = tracking.get_run(uri, run_id)
    tuned = training_run.data.metrics.get("tuned_step_lr")
    if settings.step_lr is None and tuned is not None:  # a sweep searched this model's step size
        settings = replace(settings, step_lr=tuned)
    model_config = config_from_dict(checkpoint["config"])
    if data:
        options = PreprocessOptions(model_config.data.max_atoms, model_config.data.niggli, model_config.data.primitive)
        dataset = load_crystals(data, options, show_progress=show_progress)
    else:
        root = find_data_folder(model_config.data.path, logged_data_folders(uri, training_run, model_config.data.path))
        dataset = load_splits(replace(model_config, data=replace(model_config.data, path=root)), ("test",),
                              show_progress)["test"]
    if dataset.report.skipped and show_progress:
        print(dataset.report.summary())
    run_key = "evaluate:" + cache_key(run_id, data or model_config.data.path, dataset.num_atoms.tolist(),
                                      dataset.frac_coords.sum().item(), asdict(settings))[:16]
    params = {**asdict(settings), "data": data or f"{model_config.data.path} (test)",
              "training_run_id": run_id}
    finished = tracking.find_finished_run(uri, run_id, run_key)
    if finished is not None:
        return _answer_from_run(finished, settings, model_config, dataset)
    evaluation = evaluate_checkpoint(checkpoint, dataset, settings, show_progress, label=label)
    params.update(step_lr=evaluation.config.sampler.step_lr, num_steps=evaluation.config.sampler.num_steps,
                  batch_size=evaluation.config.sampler.batch_size, workers=evaluation.workers)
    with tempfile.TemporaryDirectory(prefix="equicsp-eval-") as scratch:
        files = write_report(evaluation, dataset, Path(scratch))
        try:
            evaluation.run_id = tracking.log_evaluation_run(uri, run_id, run_key, params, summary_record(evaluation),
                                                            list(files.values()), extra_tags or {}, began_ms)
        except Exception:
            if out:  # the evaluation is kept on disk when it cannot be logged
                copy_report(files, Path(out))
            raise
        if out:
            copy_report(files, Path(out), evaluation.run_id)
    return evaluation


def logged_data_folders(uri: str, training_run, data_path: str) -> list[Path]:
    """Where a training run's relative data.path may be: the folder recorded at launch, else (runs logged
    before that tag, to the default store <working folder>/mlflow/mlflow.db) under the store's working folder."""
    folders = []
    if training_run.data.tags.get(tracking.DATA_DIR_TAG):
        folders.append(Path(training_run.data.tags[tracking.DATA_DIR_TAG]))
    store = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if store is not None and store.parent.name == "mlflow" and not Path(data_path).is_absolute():
        folders.append(store.parent.parent / data_path)
    return folders


def copy_report(files: dict[str, Path], out: Path, run_id: str | None = None) -> dict[str, Path]:
    """The report's files copied into out; an error that says where the evaluation is kept when it fails."""
    copied = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, path in files.items():
            copied[name] = Path(shutil.copy(path, out / path.name))
    except OSError as error:
        logged = f" (the evaluation is logged as MLflow run {run_id})" if run_id else ""
        raise OSError(f"cannot write the report to {out}: {error.strerror or error}{logged}") from None
    return copied


def _answer_from_run(run, settings: EvaluationSettings, model_config: Config, dataset: CrystalDataset) -> Evaluation:
    """An Evaluation rebuilt from a finished evaluation run's metrics (no predictions kept)."""
    metrics = run.data.metrics
    summary = MatchSummary(match_rate=metrics["match_rate"], rmse=metrics.get("rmse", math.nan),
                           num_crystals=int(metrics["num_crystals"]), num_matched=int(metrics["num_matched"]),
                           num_samples=int(metrics["num_samples"]), valid_rate=metrics["valid_rate"])
    config = replace(model_config, sampler=replace(model_config.sampler, step_lr=float(run.data.params["step_lr"])))
    return Evaluation(summary, [], [], metrics["sampling_s"], metrics["matching_s"], int(run.data.params["workers"]),
                      config, run_id=run.info.run_id, reused=True, startup_s=metrics.get("startup_s", 0.0))
