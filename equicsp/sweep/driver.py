"""run_sweep: the checks, the Ray Tune run over every cell's trials, then the final test stage and the report."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from equicsp.platform import tracking
from equicsp.platform.ray_train import connect_ray, resolve_storage
from equicsp.sweep.cluster import (
    check_data_on_cluster,
    check_stopped_trials_are_freed,
    concurrent_trials,
    with_absolute_data_path,
    with_gpu_decided,
)
from equicsp.sweep.final import CellResult, best_per_cell, evaluate_cells
from equicsp.sweep.progress import SweepProgress
from equicsp.sweep.report import ablation_table, write_sweep_report
from equicsp.sweep.search import FinalResultOptunaSearch, SearchSpace, initial_points
from equicsp.sweep.spec import SweepError, SweepLaunch, SweepSpec, validate_spec
from equicsp.sweep.step_size import search_metric
from equicsp.sweep.trials import TrialContext, sweep_trial


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    cells: list[CellResult]
    table: list[dict[str, Any]]
    artifacts: dict[str, Path]


def run_sweep(spec: SweepSpec, launch: SweepLaunch = SweepLaunch(), show_progress: bool = True) -> SweepResult:
    """Train every cell's trials, search each model's step size, evaluate each cell's best on test, report."""
    validate_spec(spec)
    spec = with_absolute_data_path(spec)
    uri = tracking.resolve_tracking_uri(launch.tracking_uri)
    tracking.check_reachable(uri)
    connect_ray(dashboard=spec.asha)
    launch = with_gpu_decided(launch)
    check_data_on_cluster(spec)
    check_stopped_trials_are_freed(spec)
    storage = resolve_storage(launch.storage_path, "sweeps")
    launch = replace(launch, storage_path=storage)  # the parent run's params record where the sweep lives
    experiment_id = tracking.ensure_experiment(uri, launch.experiment)
    parent = tracking.start_sweep_run(uri, experiment_id, run_key=f"{storage}/{spec.name}", run_name=spec.name,
                                      params=sweep_params(spec, launch))
    # Epoch results carry the training metrics only; the searched metric arrives with a trial's last result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    context = TrialContext(spec, launch, uri, launch.experiment, parent, storage)
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, context=context), {"CPU": 0.01})
    experiment_path = f"{storage}/{spec.name}"
    if tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        tuner = _new_tuner(spec, launch, trainable, storage, show_progress)
    grid = tuner.fit()
    tracking.mark_unfinished_children_killed(uri, parent)
    trials = [result.metrics for result in grid if result.metrics and search_metric(spec)[0] in result.metrics
              and "training_run_id" in result.metrics]
    if not trials:
        errors = [str(result.error) for result in grid if result.error is not None]
        raise SweepError("no trial finished" + (f"; first error: {errors[0]}" if errors else ""))
    cells = evaluate_cells(best_per_cell(trials, spec), spec, launch, uri, show_progress)
    table = ablation_table(cells, spec)
    artifacts = write_sweep_report(cells, table, spec, uri, parent)
    return SweepResult(parent, uri, cells, table, artifacts)


def _new_tuner(spec: SweepSpec, launch: SweepLaunch, trainable, storage: str, show_progress: bool) -> tune.Tuner:
    """A fresh Tuner: Optuna seeded with every cell's first points, ASHA on the validation loss when asked."""
    points = initial_points(spec)
    metric, mode = search_metric(spec)
    searcher = FinalResultOptunaSearch(SearchSpace(spec), metric=metric, mode=mode,
                                       points_to_evaluate=points, seed=spec.search_seed)
    epochs = spec.config_for(spec.arms[0], {}).optim.epochs
    # Trials report at their checkpoints, so ASHA counts epochs rather than reports; max_t lies past the
    # last epoch, or ASHA would stop every trial at its last checkpoint, before the step-size search.
    scheduler = (ASHAScheduler(metric="val_denoise", mode="min", time_attr="epoch", max_t=epochs + 1,
                               grace_period=max(1, epochs // 4)) if spec.asha else None)
    # Our own progress lines (trial k of N, arm, epochs, time left) instead of Tune's status box of losses.
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=len(points),
                                    max_concurrent_trials=concurrent_trials(launch)),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=0,
                                  callbacks=[SweepProgress(spec, len(points))] if show_progress else None,
                                  failure_config=tune.FailureConfig(max_failures=launch.max_failures)),
    )


def sweep_params(spec: SweepSpec, launch: SweepLaunch) -> dict[str, Any]:
    """The sweep's MLflow params: the spec, its space and overrides, and the launch (no tracking URI)."""
    params = {f"sweep.{key}": value for key, value in asdict(spec).items() if key not in ("space", "overrides")}
    params.update({f"space.{name}": domain for name, domain in spec.space.items()})
    params.update({f"override.{name}": value for name, value in spec.overrides.items()})
    params.update({f"launch.{key}": value for key, value in asdict(launch).items() if key != "tracking_uri"})
    return params
