"""run_sweep: the checks, the Ray Tune run over every cell's trials, then the final test stage and the report."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from equicsp.data.crystals import DatasetError
from equicsp.data.splits import split_size
from equicsp.platform import mlflow_store, tracking
from equicsp.platform.ray_cluster import connect_ray, worker_unit
from equicsp.platform.ray_train import resolve_storage
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
from equicsp.sweep.trial_records import TRAINING_RUN_ID, FinishedTrial
from equicsp.sweep.trials import TrialContext, sweep_trial


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    cells: list[CellResult]
    table: list[dict[str, Any]]
    artifacts: dict[str, Path]


def run_sweep(spec: SweepSpec, launch: SweepLaunch = SweepLaunch(), show_progress: bool = True) -> SweepResult:  # noqa: B008  frozen
    """Train every cell's trials, search each model's step size, evaluate each cell's best on test, report."""
    validate_spec(spec)
    spec = with_absolute_data_path(spec)
    uri = mlflow_store.resolve_tracking_uri(launch.tracking_uri)
    mlflow_store.check_reachable(uri)
    connect_ray(dashboard=spec.asha)
    launch = with_gpu_decided(launch)
    check_data_on_cluster(spec)
    check_stopped_trials_are_freed(spec)
    launch = replace(launch, max_concurrent=concurrent_trials(launch))  # refuses a trial that cannot fit
    storage = resolve_storage(launch.storage_path, "sweeps")
    launch = replace(launch, storage_path=storage)  # the parent run's params record where the sweep lives
    tracker = tracking.Tracker(uri)
    experiment_id = tracker.ensure_experiment(launch.experiment)
    note = rerun_note(tracker.find_run(experiment_id, f"{storage}/{spec.name}"), spec.name)
    if note and show_progress:
        print(note, flush=True)
    parent = tracker.start_sweep_run(experiment_id, run_key=f"{storage}/{spec.name}", run_name=spec.name,
                                     params=sweep_params(spec, launch))
    try:
        return _run_opened_sweep(spec, launch, uri, parent, storage, show_progress)
    except (KeyboardInterrupt, SweepInterrupted):
        _close_parent(tracker, parent, "KILLED")
        raise SweepInterrupted(parent) from None
    except Exception:
        _close_parent(tracker, parent, "FAILED")
        raise


def rerun_note(previous, name: str) -> str:
    """What a rerun of sweep `name` does, given its parent run from before (None: a new sweep, '')."""
    if previous is None:
        return ""
    run = f"MLflow run {previous.info.run_id[:8]}"
    if previous.info.status == "FINISHED":
        return (f"sweep {name!r} is already complete ({run}): its trials and final evaluation are reused and the "
                "report is written again; choose another --name for a new sweep")
    return f"resuming sweep {name!r} ({run}, {previous.info.status}): finished trials are kept, the others go on"


class SweepInterrupted(Exception):
    """Ctrl-C during a sweep: its parent MLflow run (and any training run left open) is KILLED; rerunning resumes."""

    def __init__(self, parent_run_id: str = ""):
        super().__init__("interrupted; rerun the same command to resume")
        self.parent_run_id = parent_run_id


# A trial function only drives its training run and its step-size search; their workers reserve the CPUs (GPUs).
# It reserves a byte of memory, not a share of a CPU: n trials holding 0.01 CPU each leave no whole CPU for the last
# worker group on a full machine, which then waits for ever (seen on 2 CPUs). Tune refuses an empty request.
TRIAL_RESOURCES: dict[str, float] = {"CPU": 0, "memory": 1}


def _run_opened_sweep(spec: SweepSpec, launch: SweepLaunch, uri: str, parent: str, storage: str,
                      show_progress: bool) -> SweepResult:
    """The sweep once its parent run is open: the trials on Tune, then the final stage and the report."""
    # Epoch results carry the training metrics only; the searched metric arrives with a trial's last result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    context = TrialContext(spec, launch, uri, launch.experiment, parent, storage)
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, context=context), TRIAL_RESOURCES)
    experiment_path = f"{storage}/{spec.name}"
    if tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        tuner = _new_tuner(spec, launch, trainable, storage, show_progress)
    grid = tuner.fit()
    results = [grid[index] for index in range(len(grid))]  # ResultGrid iterates through __getitem__ alone
    tracking.Tracker(uri).mark_unfinished_children_killed(parent)
    if grid.num_terminated + grid.num_errors < len(initial_points(spec)):
        # Tune ends its run on Ctrl-C (saving its state) and returns the trials it has: some never finished.
        raise SweepInterrupted(parent)
    trials = [FinishedTrial.from_tune(result.metrics) for result in results
              if result.metrics and search_metric(spec)[0] in result.metrics and TRAINING_RUN_ID in result.metrics]
    if not trials:
        errors = [str(result.error) for result in results if result.error is not None]
        raise SweepError("no trial finished" + (f"; first error: {errors[0]}" if errors else ""))
    chosen = best_per_cell(trials, spec)
    if show_progress:
        print(f"final evaluation: the best trial of each of {len(chosen)} cells on the test split", flush=True)
    cells = evaluate_cells(chosen, spec, launch, uri, show_progress)
    table = ablation_table(cells, spec)
    artifacts = write_sweep_report(cells, table, spec, uri, parent)
    return SweepResult(parent, uri, cells, table, artifacts)


def _close_parent(tracker: tracking.Tracker, parent: str, status: str) -> None:
    """The parent run and the training runs left open under it end with status, never RUNNING."""
    tracker.mark_unfinished_children_killed(parent)
    tracker.client.set_terminated(parent, status)


def _new_tuner(spec: SweepSpec, launch: SweepLaunch, trainable, storage: str, show_progress: bool) -> tune.Tuner:
    """A fresh Tuner: Optuna seeded with every cell's first points, ASHA on the validation loss when asked."""
    points = initial_points(spec)
    metric, mode = search_metric(spec)
    # Our own progress lines (trial k of N, arm, epochs, time left) instead of Optuna's "A new study created"
    # lines (the searcher creates its study here), unless asked for (--verbose).
    optuna.logging.set_verbosity(optuna.logging.INFO if launch.verbose else optuna.logging.WARNING)
    searcher = FinalResultOptunaSearch(SearchSpace(spec), metric=metric, mode=mode,
                                       points_to_evaluate=points, seed=spec.search_seed)
    epochs = spec.config_for(spec.arms[0], {}).optim.epochs
    # Trials report at their checkpoints, so ASHA counts epochs rather than reports; max_t lies past the
    # last epoch, or ASHA would stop every trial at its last checkpoint, before the step-size search.
    scheduler = (ASHAScheduler(metric="val_denoise", mode="min", time_attr="epoch", max_t=epochs + 1,
                               grace_period=max(1, epochs // 4)) if spec.asha else None)
    # Tune's status tables only with --verbose (cli.options.show_library_output quiets the rest of its output).
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=len(points),
                                    max_concurrent_trials=launch.max_concurrent),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=2 if launch.verbose else 0,
                                  callbacks=[SweepProgress(spec, len(points), concurrent=launch.max_concurrent,
                                                           unit=worker_unit(bool(launch.use_gpu)),
                                                           test_crystals=final_test_crystals(spec))]
                                  if show_progress else None,
                                  failure_config=tune.FailureConfig(max_failures=launch.max_failures)),
    )


def final_test_crystals(spec: SweepSpec) -> int | None:
    """The test crystals each cell's final evaluation samples, for the time estimate; None where the driver cannot
    count them (data on a remote store)."""
    try:
        count = split_size(spec.config_for(spec.arms[0], {}), "test")
    except (DatasetError, OSError):
        return spec.test_limit
    return min(count, spec.test_limit or count)


def sweep_params(spec: SweepSpec, launch: SweepLaunch) -> dict[str, Any]:
    """The sweep's MLflow params: the spec, its space and overrides, and the launch (no tracking URI)."""
    params = {f"sweep.{key}": value for key, value in asdict(spec).items() if key not in ("space", "overrides")}
    params.update({f"space.{name}": domain for name, domain in spec.space.items()})
    params.update({f"override.{name}": value for name, value in spec.overrides.items()})
    params.update({f"launch.{key}": value for key, value in asdict(launch).items()
                   if key not in ("tracking_uri", "verbose")})
    return params
