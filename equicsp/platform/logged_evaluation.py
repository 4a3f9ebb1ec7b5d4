"""Evaluating a logged MLflow training run: its model and data found by run id, a finished identical
evaluation reused, the result logged as a child evaluation run (CSP matching, or a generation model's scores)."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from equicsp.config import ARMS, Config, config_from_dict, with_sampling_switches
from equicsp.data.cache import cache_key, check_writable_folder
from equicsp.data.crystals import CrystalDataset, load_crystals
from equicsp.data.splits import find_data_folder, load_split, preprocess_options
from equicsp.devices import resolve_device
from equicsp.engine.checkpoint import model_from_checkpoint
from equicsp.engine.sampler import with_sampler_options
from equicsp.evaluation.csp import Evaluation, EvaluationSettings, add_leakage, ground_truth
from equicsp.evaluation.generation import generate, num_atoms_distribution, score_generated, write_generated
from equicsp.evaluation.generation_metrics import thresholds_for
from equicsp.evaluation.leakage import LeakageSummary
from equicsp.evaluation.metrics import SCORE_VERSION, MatchSummary
from equicsp.evaluation.report import copy_report, summary_record, write_report
from equicsp.platform import tracking
from equicsp.platform.ray_evaluation import SamplingPool, evaluate_checkpoint
from equicsp.task import TUNED_STEP_LR


def evaluate_logged_run(run_id: str, settings: EvaluationSettings, data: str | None = None,
                        tracking_uri: str | None = None, out: Path | None = None,
                        extra_tags: dict[str, str] | None = None, show_progress: bool = True,
                        label: str = "", pool: SamplingPool | None = None) -> Evaluation:
    """Evaluate the model of MLflow training run `run_id` and log a child evaluation run under it.

    The same evaluation (run, data content, settings) asked for again is answered from its
    finished MLflow run instead of being computed and logged twice. The report goes to MLflow
    first and is copied to `out` afterwards, so a folder that fails late loses nothing logged;
    `out` is checked before any work. With settings.leakage, the test crystals are also checked
    against the model's training split (see leakage.py). A pool keeps its sampling workers for the
    next evaluation (a sweep's final stage evaluates every cell with one).
    """
    began_ms = int(time.time() * 1000)
    settings.check()
    if out:
        check_writable_folder(Path(out))
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    checkpoint = tracking.read_logged_checkpoint(uri, run_id)
    training_run = tracking.get_run(uri, run_id)
    tuned = training_run.data.metrics.get(TUNED_STEP_LR)
    if settings.step_lr is None and tuned is not None:  # a sweep searched this model's step size
        settings = replace(settings, step_lr=tuned)
    model_config = config_from_dict(checkpoint["config"])

    def model_split(split: str) -> CrystalDataset:
        root = find_data_folder(model_config.data.path, logged_data_folders(uri, training_run, model_config.data.path))
        return load_split(model_config, split, root, show_progress)

    if data:
        dataset = load_crystals(data, preprocess_options(model_config), show_progress=show_progress)
    else:
        dataset = model_split("test")
    if dataset.report.skipped and show_progress:
        print(dataset.report.summary())
    run_key = "evaluate:" + cache_key(SCORE_VERSION, run_id, data or model_config.data.path, dataset.content_key(),
                                      asdict(settings))[:16]
    params = {**asdict(settings), "data": data or f"{model_config.data.path} (test)",
              "training_run_id": run_id}
    finished = tracking.find_finished_run(uri, run_id, run_key)
    if finished is not None:
        return _answer_from_run(finished, settings, model_config, dataset)
    evaluation = evaluate_checkpoint(checkpoint, dataset, settings, show_progress, pool, label)
    if settings.leakage:
        add_leakage(evaluation, model_split("train"), dataset, show_progress=show_progress)
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


def _answer_from_run(run, settings: EvaluationSettings, model_config: Config, dataset: CrystalDataset) -> Evaluation:
    """An Evaluation rebuilt from a finished evaluation run's metrics (no predictions kept)."""
    metrics = run.data.metrics
    summary = MatchSummary(match_rate=metrics["match_rate"], rmse=metrics.get("rmse", math.nan),
                           num_crystals=int(metrics["num_crystals"]), num_matched=int(metrics["num_matched"]),
                           num_samples=int(metrics["num_samples"]), valid_rate=metrics["valid_rate"],
                           matcher_failures=int(metrics.get("matcher_failures", 0)))
    config = replace(model_config, sampler=replace(model_config.sampler, step_lr=float(run.data.params["step_lr"])))
    leakage = None
    if "leaked_fraction" in metrics:
        leakage = LeakageSummary(metrics["leaked_fraction"], metrics.get("unleaked_match_rate", math.nan),
                                 metrics.get("unleaked_rmse", math.nan), int(metrics["num_unleaked"]))
    return Evaluation(summary, [], [], metrics["sampling_s"], metrics["matching_s"], int(run.data.params["workers"]),
                      config, run_id=run.info.run_id, reused=True, startup_s=metrics.get("startup_s", 0.0),
                      leakage=leakage)


def log_generation_run(uri: str, run_id: str, settings: dict, metrics: dict[str, float], files: dict[str, Path],
                       extra_tags: dict[str, str] | None = None) -> str:
    """Generation scores as a child run of training run `run_id`, keyed by the settings (so a rerun finds it)."""
    params = {**settings, "num_samples": settings["num"], "task": "generation"}
    finite = {name: value for name, value in metrics.items() if value == value}  # MLflow rejects NaN
    paths = [files[name] for name in ("samples", "summary", "figure") if name in files]
    return tracking.log_evaluation_run(uri, run_id, generation_run_key(settings), params, finite, paths,
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
    uri = tracking.resolve_tracking_uri(tracking_uri)
    checkpoint = tracking.read_logged_checkpoint(uri, run_id)
    training_run = tracking.get_run(uri, run_id)
    device = resolve_device("auto")
    config, model = model_from_checkpoint(checkpoint, device)
    config = with_sampler_options(config, step_lr)
    if sampling_arm is not None:
        config = with_sampling_switches(config, ARMS[sampling_arm].objective)
    thresholds = thresholds_for(config.preset)
    root = find_data_folder(config.data.path, logged_data_folders(uri, training_run, config.data.path))
    test = load_split(config, "test", root, show_progress)
    settings = {"num": num, "seed": seed, "step_lr": config.sampler.step_lr, "num_steps": config.sampler.num_steps,
                "precision": "fp32", "reference": "test split", "reference_content": test.content_key()[:16],
                "struct_cutoff": thresholds.structure, "comp_cutoff": thresholds.composition,
                "sampling_arm": sampling_arm or ""}
    finished = tracking.find_finished_run(uri, run_id, generation_run_key(settings))
    if finished is not None:
        return finished.info.run_id, dict(finished.data.metrics)
    crystals = generate(model, config, num_atoms_distribution(checkpoint), num, seed, device,
                        show_progress=show_progress)
    report = score_generated(crystals, ground_truth(test, list(range(len(test)))), config.preset, thresholds,
                             show_progress=show_progress)
    with tempfile.TemporaryDirectory(prefix="equicsp-generate-") as scratch:
        files = write_generated(crystals, report, Path(scratch), settings)
        child = log_generation_run(uri, run_id, settings, report.metrics, files, extra_tags)
    return child, report.metrics
