"""The Langevin step size of one trained model, searched by Optuna on validation crystals (no retraining)."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna

from equicsp.config import config_from_dict
from equicsp.data.cache import save_atomically
from equicsp.data.splits import load_splits
from equicsp.evaluation.csp import EvaluationSettings
from equicsp.platform import tracking
from equicsp.platform.ray_cluster import connect_ray
from equicsp.platform.ray_evaluation import SamplingPool, evaluate_checkpoint
from equicsp.sweep.spec import SweepSpec
from equicsp.task import TUNED_STEP_LR, VAL_DENOISE, VAL_MATCH_RATE, task_of

STEP_LR_METRIC = VAL_MATCH_RATE  # what the step-size search maximises, and the sweep's search metric
GENERATION_METRIC = VAL_DENOISE  # a generation sweep's search metric: no step-size search (see search_metric)


def search_metric(spec: SweepSpec) -> tuple[str, str]:
    """(metric, mode) that Optuna optimises over a cell's trials and that picks each cell's best trial.

    CSP: the validation match rate at the model's tuned step size. Generation has no step-size
    search: the Langevin step moves only the coordinates, and scoring a step size by coverage
    needs fingerprints of every sample (more costly than sampling them) while validity alone
    rewards atoms pushed apart rather than the data's structures. Its models sample at the
    config's step_lr (the dataset presets carry DiffCSP's values), and trials are compared by
    their validation denoising loss.
    """
    task = task_of(spec.task)
    return task.trial_metric, task.trial_mode


@dataclass(frozen=True)
class SearchProgress:
    """One step size tried: the j-th of a search's trials, and the best so far."""

    done: int
    trials: int
    step_lr: float
    match_rate: float
    best_step_lr: float
    best_match_rate: float
    sampling_arm: str | None = None


SEARCH_PROGRESS = "step_lr_search/"  # the prefix of what a trial reports to Tune while it searches


def progress_metrics(progress: SearchProgress, offset: int, total: int) -> dict[str, float | str]:
    """A search's progress as a Tune result: the j-th of a trial's `total` step sizes (its searches one after the
    other, offset tried before this one), and this search's best so far. Without an epoch or the search metric, so
    the scheduler and the searcher pass it by (search.FinalResultOptunaSearch)."""
    return {f"{SEARCH_PROGRESS}done": offset + progress.done, f"{SEARCH_PROGRESS}trials": total,
            f"{SEARCH_PROGRESS}best_match_rate": progress.best_match_rate,
            f"{SEARCH_PROGRESS}best_step_lr": progress.best_step_lr, f"{SEARCH_PROGRESS}arm": progress.sampling_arm or ""}


def search_step_lr(run_id: str, spec: SweepSpec, tracking_uri: str, workers: int,
                   sampling_arm: str | None = None,
                   on_progress: Callable[[SearchProgress], None] | None = None) -> dict[str, float]:
    """Optuna over the Langevin step size (log scale): match rate on validation crystals, most wins.

    Logged to the training run (one step per Optuna trial); a run that holds the search
    already (a trial resumed after its driver died) answers from it. With sampling_arm, the
    model is sampled with that arm's sampling-only switches and every name gets its prefix.
    workers: sampling workers of one CPU (GPU) each, the share the trial trained on
    (sweep.cluster.concurrent_trials counts on it: more would take another trial's share).
    on_progress: told of every step size tried (with the paper's profile a search runs for minutes).
    """
    tracker = tracking.Tracker(tracking_uri)
    prefix = f"{sampling_arm}/" if sampling_arm else ""
    logged = tracker.get_run(run_id).data.metrics
    if f"{prefix}tuned_step_lr" in logged:
        return {prefix + key: logged[prefix + key] for key in (TUNED_STEP_LR, STEP_LR_METRIC, "val_rmse")
                if prefix + key in logged}
    checkpoint = tracker.read_logged_checkpoint(run_id)
    config = config_from_dict(checkpoint["config"])
    validation = load_splits(config, ("val",), show_progress=False)["val"]
    connect_ray()
    settings = EvaluationSettings(num_samples=1, seed=0, limit=spec.step_lr_crystals,
                                  workers=workers, threads=1, sampling_arm=sampling_arm)

    def objective(trial: optuna.Trial) -> float:
        step_lr = trial.suggest_float("step_lr", spec.step_lr.low, spec.step_lr.high, log=spec.step_lr.log)
        # One seed for every step size: the step sizes are compared on the same noise.
        evaluation = evaluate_checkpoint(checkpoint, validation, replace(settings, step_lr=step_lr),
                                         show_progress=False, pool=pool)
        trial.set_user_attr("rmse", evaluation.summary.rmse)
        tracker.log_metrics(run_id, {f"{prefix}step_lr_search/step_lr": step_lr,
                                     f"{prefix}step_lr_search/match_rate": evaluation.summary.match_rate},
                            step=trial.number)
        if on_progress is not None:
            tried = [(done.value, done.params["step_lr"]) for done in study.trials if done.value is not None]
            best_rate, best_step_lr = max(tried + [(evaluation.summary.match_rate, step_lr)], key=lambda pair: pair[0])
            on_progress(SearchProgress(trial.number + 1, spec.step_lr_trials, step_lr, evaluation.summary.match_rate,
                                       best_step_lr, best_rate, sampling_arm))
        return evaluation.summary.match_rate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=spec.search_seed))
    default = config.sampler.step_lr
    if spec.step_lr.low <= default <= spec.step_lr.high:
        study.enqueue_trial({"step_lr": default})  # never worse on validation than the config's step size
    with SamplingPool(checkpoint, settings.workers, settings.threads) as pool:
        study.optimize(objective, n_trials=spec.step_lr_trials)
    best = study.best_trial
    result = {f"{prefix}{TUNED_STEP_LR}": best.params["step_lr"], f"{prefix}{STEP_LR_METRIC}": best.value}
    if not math.isnan(best.user_attrs["rmse"]):
        result[f"{prefix}val_rmse"] = best.user_attrs["rmse"]
    tracker.log_metrics(run_id, result)
    if sampling_arm is None:  # the best checkpoint carries its step size, for `evaluate --checkpoint` and `sample`
        with tempfile.TemporaryDirectory(prefix="equicsp-tuned-") as folder:
            path = Path(folder) / Path(tracking.CHECKPOINT_ARTIFACT).name
            save_atomically({**checkpoint, TUNED_STEP_LR: best.params["step_lr"]}, path)
            tracker.log_artifact(run_id, path, str(Path(tracking.CHECKPOINT_ARTIFACT).parent))
    return result
