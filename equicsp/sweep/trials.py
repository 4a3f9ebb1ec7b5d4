"""One Ray Tune trial of a sweep: train the cell's config with Ray Train, then search its step size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import ray.tune

from equicsp.platform.ray_train import LaunchOptions, run_training
from equicsp.sweep.spec import SweepLaunch, SweepSpec
from equicsp.sweep.step_size import SearchProgress, progress_metrics, search_step_lr
from equicsp.sweep.trial_records import TRAINING_RUN_ID, TrialParams
from equicsp.task import task_of


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its own parameters (passed once through the object store)."""

    spec: SweepSpec
    launch: SweepLaunch
    tracking_uri: str
    experiment: str
    parent_run_id: str
    storage: str


def trial_run_name(spec: SweepSpec, arm: str, seed: int, trial_id: str) -> str:
    """Arm and seed first: the MLflow UI cuts long names, and a sweep's runs differ there, not in the sweep's name."""
    return f"{arm}-s{seed}-{spec.name}-{trial_id}"


def reporter(offset: int, total: int) -> Callable[[SearchProgress], None]:
    """Each step size tried, reported to Tune: the driver's progress lines show it. A print here would not reach
    the driver's console, where a private Ray keeps worker output (log_to_driver=False, the quiet default)."""
    return lambda progress: ray.tune.report(progress_metrics(progress, offset, total))


def sweep_trial(params: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: train (Ray Train, reporting each checkpoint to Tune), then search step_lr on validation.

    Arms that sample this arm's model (spec.sharing_arms) get their own step-size search on
    it, reported as `<arm>/tuned_step_lr` and `<arm>/val_match_rate`. A generation sweep has no search.
    """
    spec, launch = context.spec, context.launch
    trial = TrialParams.from_tune(params)
    arm, config = trial.arm, spec.config_for(trial.arm, trial.config_values())
    trial_id = ray.tune.get_context().get_trial_id()
    tags = {"arm": arm, "seed": str(config.run.seed), "equicsp.sweep": context.parent_run_id, "trial_id": trial_id,
            **{f"switch.{name}": str(value) for name, value in asdict(config.objective).items()}}
    options = LaunchOptions(num_workers=launch.workers_per_trial, use_gpu=bool(launch.use_gpu),
                            tracking_uri=context.tracking_uri, experiment=context.experiment,
                            run_name=trial_run_name(spec, arm, config.run.seed, trial_id),
                            storage_path=f"{context.storage}/train", max_failures=launch.max_failures,
                            parent_run_id=context.parent_run_id, extra_tags=tags, report_to_tune=True,
                            system_metrics=launch.system_metrics)
    result = run_training(config, options)
    search = {}
    task = task_of(spec.task)
    if task.searches_step_size:  # generation samples at the config's step_lr (step_size.search_metric says why)
        total = spec.step_lr_trials * (1 + len(spec.sharing_arms(arm)))
        search = search_step_lr(result.run_id, spec, context.tracking_uri, launch.workers_per_trial,
                                on_progress=reporter(0, total))
        for number, other in enumerate(spec.sharing_arms(arm), start=1):
            search.update(search_step_lr(result.run_id, spec, context.tracking_uri, launch.workers_per_trial,
                                         sampling_arm=other, on_progress=reporter(number * spec.step_lr_trials, total)))
    final = {**result.history[-1], **search, TRAINING_RUN_ID: result.run_id}
    if not task.searches_step_size:  # the logged model is the best epoch's: compare trials by that epoch
        final[task.trial_metric] = min(row[task.trial_metric] for row in result.history)
    ray.tune.report(final)
