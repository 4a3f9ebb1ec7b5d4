"""Evaluating a logged MLflow training run: its model and data found by run id, a finished identical
evaluation reused, the result logged as a child evaluation run (CSP matching, or a generation model's scores)."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from equicsp.config import ARMS, Config, config_from_dict, with_sampling_switches
from equicsp.data.cache import cache_key
from equicsp.data.crystals import CrystalDataset, load_crystals
from equicsp.data.outputs import OutputFolder
from equicsp.data.splits import find_data_folder, load_split, preprocess_options
from equicsp.devices import resolve_device
from equicsp.engine.checkpoint import model_from_checkpoint
from equicsp.engine.sampler import with_sampler_options
from equicsp.evaluation.csp import Evaluation, EvaluationSettings, add_leakage, ground_truth
from equicsp.evaluation.generation import generate, num_atoms_distribution, score_generated, write_generated
from equicsp.evaluation.generation_metrics import thresholds_for
from equicsp.evaluation.leakage import LeakageSummary
from equicsp.evaluation.metrics import SCORE_VERSION, CrystalResult, MatchSummary
from equicsp.evaluation.report import read_results_csv, summary_record, write_report
from equicsp.platform import mlflow_store, tracking
from equicsp.platform.ray_evaluation import SamplingPool, evaluate_checkpoint
from equicsp.task import TUNED_STEP_LR, task_of

if TYPE_CHECKING:
    from mlflow.entities import Run


def evaluate_logged_run(run_id: str, settings: EvaluationSettings, data: str | None = None,
                        tracking_uri: str | None = None, out: OutputFolder | None = None,
                        extra_tags: dict[str, str] | None = None, show_progress: bool = True,
                        label: str = "", pool: SamplingPool | None = None) -> Evaluation:
    """Evaluate the model of MLflow training run `run_id` and log a child evaluation run under it.

    The same evaluation (run, data content, settings) asked for again is answered from its
    finished MLflow run instead of being computed and logged twice. The store is checked before any
    work (out, an opened OutputFolder, by its caller); the report is written into out and logged,
    and a store that fails at the end anyway leaves it in out or, without out, in a folder the error
    names (keep_unlogged). With settings.leakage, the test crystals are also checked
    against the model's training split (see leakage.py). A pool keeps its sampling workers for the
    next evaluation (a sweep's final stage evaluates every cell with one).
    """
    began_ms = int(time.time() * 1000)
    settings.check()
    tracker = tracking.Tracker.resolve(tracking_uri)
    mlflow_store.check_reachable(tracker.uri)
    training_run = tracker.get_run(run_id)
    mlflow_store.check_writable_store(tracker.uri, training_run.info.experiment_id)  # the result is logged there, at the end
    checkpoint = tracker.read_logged_checkpoint(run_id)
    tuned = training_run.data.metrics.get(TUNED_STEP_LR)
    if settings.step_lr is None and tuned is not None:  # a sweep searched this model's step size
        settings = replace(settings, step_lr=tuned)
    model_config = config_from_dict(checkpoint["config"])
    task_of(model_config).check_predicts_structures()

    def model_split(split: str) -> CrystalDataset:
        root = find_data_folder(model_config.data.path, logged_data_folders(tracker.uri, training_run, model_config.data.path))
        return load_split(model_config, split, root, show_progress)

    dataset = (load_crystals(data, preprocess_options(model_config), show_progress=show_progress) if data
               else model_split("test"))
    if dataset.report.skipped and show_progress:
        print(dataset.report.summary())
    run_key = "evaluate:" + cache_key(SCORE_VERSION, run_id, data or model_config.data.path, dataset.content_key(),
                                      asdict(settings))[:16]
    params = {**asdict(settings), "data": data or f"{model_config.data.path} (test)",
              "training_run_id": run_id}
    finished = tracker.find_finished_run(run_id, run_key)
    if finished is not None:
        return _answer_from_run(tracker, finished, model_config)
    evaluation = evaluate_checkpoint(checkpoint, dataset, settings, show_progress, pool, label)
    if settings.leakage:
        add_leakage(evaluation, model_split("train"), dataset, show_progress=show_progress)
    params.update(step_lr=evaluation.config.sampler.step_lr, num_steps=evaluation.config.sampler.num_steps,
                  batch_size=evaluation.config.sampler.batch_size, workers=evaluation.workers)

    def log(files: dict[str, Path]) -> str:
        return tracker.log_evaluation_run(run_id, run_key, params, summary_record(evaluation), list(files.values()),
                                          extra_tags or {}, began_ms)

    write = partial(write_report, evaluation, dataset, model=f"run {run_id[:8]}")  # as the sweep table prints it
    evaluation.run_id = _write_and_log(write, log, out) if out else _log_or_keep(write, log, f"evaluation-{run_id}")
    return evaluation


def _write_and_log(write: Callable[[Path], dict[str, Path]], log: Callable[[dict[str, Path]], str],
                   out: OutputFolder) -> str:
    """The report written into out and logged from there; out keeps it when the store fails."""
    logged, failure = None, None
    try:
        with out.writing() as folder:
            files = write(folder)
            try:
                logged = log(files)
            except Exception as error:  # MLflow and SQLAlchemy raise many types for a store that fails
                failure = error
    except OSError as error:
        also = f" (the evaluation is logged as MLflow run {logged})" if logged else \
            f"; it could not be logged to MLflow either ({_describe(failure)})"
        raise OSError(f"{error}{also}") from None
    if failure is not None or logged is None:
        raise tracking.TrackingError(f"the evaluation could not be logged to MLflow ({_describe(failure)}); "
                                     f"its report is in {out.path}") from None
    return logged


def _log_or_keep(write: Callable[[Path], dict[str, Path]], log: Callable[[dict[str, Path]], str], name: str) -> str:
    """The report logged from a scratch folder; when the store fails, the report is kept on disk and the error
    says where."""
    with tempfile.TemporaryDirectory(prefix="equicsp-eval-") as scratch:
        files = write(Path(scratch))
        try:
            return log(files)
        except Exception as error:  # MLflow and SQLAlchemy raise many types for a store that fails
            kept = keep_unlogged(Path(scratch), name)
            where = f"its report is kept in {kept}" if kept else "and its report could not be kept on disk either"
            raise tracking.TrackingError(f"the evaluation could not be logged to MLflow ({_describe(error)}); "
                                         f"{where}") from None


def keep_unlogged(scratch: Path, name: str) -> Path | None:
    """A report that MLflow could not take, copied to ./unlogged/<name>-<time> (else the temporary folder)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for root in (Path.cwd() / "unlogged", Path(tempfile.gettempdir()) / "equicsp-unlogged"):
        try:
            return Path(shutil.copytree(scratch, root / f"{name}-{stamp}"))
        except OSError:
            continue
    return None


def _describe(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def logged_data_folders(uri: str, training_run: Run, data_path: str) -> list[Path]:
    """Where a training run's relative data.path may be: the folder recorded at launch, else (runs logged
    before that tag, to the default store <working folder>/mlflow/mlflow.db) under the store's working folder."""
    folders = []
    if training_run.data.tags.get(tracking.DATA_DIR_TAG):
        folders.append(Path(training_run.data.tags[tracking.DATA_DIR_TAG]))
    store = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if store is not None and store.parent.name == "mlflow" and not Path(data_path).is_absolute():
        folders.append(store.parent.parent / data_path)
    return folders


REUSED_SCORES = ("crmse", "metre", "metre_rmse", "metre_crmse")  # nan when not logged (METRe left out, nothing matched)


def _answer_from_run(tracker: tracking.Tracker, run: Run, model_config: Config) -> Evaluation:
    """An Evaluation rebuilt from a finished evaluation run's metrics and per-crystal table (no predictions kept)."""
    metrics = run.data.metrics
    summary = MatchSummary(match_rate=metrics["match_rate"], rmse=metrics.get("rmse", math.nan),
                           num_crystals=int(metrics["num_crystals"]), num_matched=int(metrics["num_matched"]),
                           num_samples=int(metrics["num_samples"]), valid_rate=metrics["valid_rate"],
                           matcher_failures=int(metrics.get("matcher_failures", 0)),
                           **{name: metrics.get(name, math.nan) for name in REUSED_SCORES})
    config = replace(model_config, sampler=replace(model_config.sampler, step_lr=float(run.data.params["step_lr"])))
    leakage = None
    if "leaked_fraction" in metrics:
        leakage = LeakageSummary(leaked_fraction=metrics["leaked_fraction"],
                                 unleaked_match_rate=metrics.get("unleaked_match_rate", math.nan),
                                 unleaked_rmse=metrics.get("unleaked_rmse", math.nan),
                                 num_unleaked=int(metrics["num_unleaked"]))
    return Evaluation(summary=summary, per_crystal=logged_per_crystal(tracker, run.info.run_id), predictions=[],
                      sampling_s=metrics["sampling_s"], matching_s=metrics["matching_s"],
                      workers=int(run.data.params["workers"]), config=config,
                      run_id=run.info.run_id, reused=True, startup_s=metrics.get("startup_s", 0.0), leakage=leakage)


def logged_per_crystal(tracker: tracking.Tracker, evaluation_run_id: str) -> list[CrystalResult]:
    """The per-crystal results an evaluation run logged (per_crystal.csv), in their order."""
    with tempfile.TemporaryDirectory(prefix="equicsp-per-crystal-") as folder:
        return read_results_csv(tracker.download_checkpoint(evaluation_run_id, Path(folder), "per_crystal.csv"))


def log_generation_run(tracker: tracking.Tracker, run_id: str, settings: dict, metrics: dict[str, float],
                       files: dict[str, Path], extra_tags: dict[str, str] | None = None) -> str:
    """Generation scores as a child run of training run `run_id`, keyed by the settings (so a rerun finds it)."""
    params = {**settings, "num_samples": settings["num"], "task": "generation"}
    finite = {name: value for name, value in metrics.items() if value == value}  # MLflow rejects NaN
    paths = [files[name] for name in ("samples", "summary", "figure") if name in files]
    return tracker.log_evaluation_run(run_id, generation_run_key(settings), params, finite, paths,
                                      {"equicsp.task": "generation", **(extra_tags or {})})


def generation_run_key(settings: dict) -> str:
    return "generation-" + cache_key(SCORE_VERSION, settings)[:16]


def generate_for_logged_run(run_id: str, num: int, seed: int = 0, step_lr: float | None = None,
                            sampling_arm: str | None = None, tracking_uri: str | None = None,
                            extra_tags: dict[str, str] | None = None,
                            show_progress: bool = True) -> tuple[str, dict[str, float]]:
    """(child run id, metrics): num crystals from the model of generation training run `run_id`, scored against
    its test split (docs/method.md#generation-metrics) and logged as a child run, as `generate --run-id` does.

    With sampling_arm, the model is sampled with that arm's sampling-only switches (a model it shares).
    The same generation asked for again is answered from its finished run.
    """
    tracker = tracking.Tracker.resolve(tracking_uri)
    checkpoint = tracker.read_logged_checkpoint(run_id)
    training_run = tracker.get_run(run_id)
    device = resolve_device("auto")
    config, model = model_from_checkpoint(checkpoint, device)
    config = with_sampler_options(config, step_lr)
    if sampling_arm is not None:
        config = with_sampling_switches(config, ARMS[sampling_arm].objective)
    thresholds = thresholds_for(config.preset)
    root = find_data_folder(config.data.path, logged_data_folders(tracker.uri, training_run, config.data.path))
    test = load_split(config, "test", root, show_progress)
    settings = {"num": num, "seed": seed, "step_lr": config.sampler.step_lr, "num_steps": config.sampler.num_steps,
                "precision": "fp32", "reference": "test split", "reference_content": test.content_key()[:16],
                "struct_cutoff": thresholds.structure, "comp_cutoff": thresholds.composition,
                "sampling_arm": sampling_arm or ""}
    finished = tracker.find_finished_run(run_id, generation_run_key(settings))
    if finished is not None:
        return finished.info.run_id, dict(finished.data.metrics)
    crystals = generate(model, config, num_atoms_distribution(checkpoint), num, seed, device,
                        show_progress=show_progress)
    report = score_generated(crystals, ground_truth(test, list(range(len(test)))), config.preset, thresholds,
                             show_progress=show_progress)
    with tempfile.TemporaryDirectory(prefix="equicsp-generate-") as scratch:
        files = write_generated(crystals, report, Path(scratch), settings)
        child = log_generation_run(tracker, run_id, settings, report.metrics, files, extra_tags)
    return child, report.metrics
