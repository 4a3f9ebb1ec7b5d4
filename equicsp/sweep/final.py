"""The sweep's final stage: the best trial of each (arm, seed) cell, evaluated on the test split."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from equicsp.config import ARMS
from equicsp.evaluation.csp import EvaluationSettings
from equicsp.platform.logged_evaluation import evaluate_logged_run, generate_for_logged_run
from equicsp.platform.ray_evaluation import SamplingPool
from equicsp.sweep.spec import SweepLaunch, SweepSpec
from equicsp.sweep.step_size import STEP_LR_METRIC
from equicsp.sweep.trial_records import FinishedTrial
from equicsp.task import TUNED_STEP_LR, VAL_DENOISE, task_of


@dataclass
class CellResult:
    """The best trial of one (arm, seed) cell and its test evaluation."""

    arm: str
    seed: int
    training_run_id: str
    evaluation_run_id: str
    step_lr: float
    val_match_rate: float
    test_match_rate: float
    test_rmse: float  # nan when nothing matched
    searched: dict[str, Any] = field(default_factory=dict)
    model_of: str = ""  # the arm whose training produced the model (this arm's own, or one it shares)
    leaked_fraction: float = math.nan  # with spec.leakage: test crystals a training crystal answers
    unleaked_match_rate: float = math.nan
    unleaked_rmse: float = math.nan
    generation: dict[str, float] = field(default_factory=dict)  # task generation: the test metrics (no matching)
    test_crmse: float = math.nan  # docs/method.md#corrected-rmse
    test_metre: float = math.nan  # docs/method.md#metre; nan when METRe was left out
    test_metre_rmse: float = math.nan
    # Each test crystal's best rms (nan: not matched) and METRe rms, in the test split's order, which every cell
    # shares: the table's bootstrap resamples the same crystals for every arm (sweep/report.py).
    rms: tuple[float, ...] = ()
    metre_rms: tuple[float, ...] = ()


def metric_name(arm: str, owner: str, name: str) -> str:
    """A trial's metric for arm: its own name when arm trained the model, else prefixed by arm."""
    return name if arm == owner else f"{arm}/{name}"


def best_per_cell(trials: list[FinishedTrial], spec: SweepSpec) -> list[tuple[str, FinishedTrial]]:
    """(arm, trial) for each (arm, seed): the trial of the arm's model with its highest validation match rate,
    then lowest validation loss. An arm that shares another's model picks among that arm's trials by its own
    step-size search. A generation sweep (no step-size search) picks the lowest validation loss."""
    chosen = []
    task = task_of(spec.task)
    for arm in spec.arms:
        owner = spec.model_owner(arm)
        score_name = metric_name(arm, owner, task.trial_metric) if task.searches_step_size else task.trial_metric
        sign = 1 if task.trial_mode == "max" else -1
        for seed in spec.seeds:
            mine = [trial for trial in trials if trial.params.arm == owner and trial.params.seed == seed
                    and score_name in trial.metrics]
            if mine:
                chosen.append((arm, max(mine, key=lambda t: (sign * t.metrics[score_name],
                                                             -t.metric(VAL_DENOISE, math.inf)))))
    return chosen


def evaluate_cells(chosen: list[tuple[str, FinishedTrial]], spec: SweepSpec, launch: SweepLaunch, uri: str,
                   show_progress: bool) -> list[CellResult]:
    """Every chosen cell's final evaluation. CSP cells share one sampling pool, each handing it its model: a pool
    per cell started new sampling actors, and new processes for its matching tasks, every time."""
    if task_of(spec.task).diffuses_types:
        return [generation_cell(arm, trial, spec, uri, show_progress) for arm, trial in chosen]
    settings = final_settings(spec, launch)
    with SamplingPool(None, settings.workers, settings.threads, settings.precision) as pool:
        return [evaluate_cell(arm, trial, spec, launch, uri, show_progress, pool) for arm, trial in chosen]


def final_settings(spec: SweepSpec, launch: SweepLaunch) -> EvaluationSettings:
    """The final stage's evaluation settings, before each cell's step size and sampling arm."""
    return EvaluationSettings(num_samples=spec.test_samples, seed=0, limit=spec.test_limit,
                              workers=launch.eval_workers, leakage=spec.leakage)


def evaluate_cell(arm: str, trial: FinishedTrial, spec: SweepSpec, launch: SweepLaunch, uri: str,
                  show_progress: bool, pool: SamplingPool | None = None) -> CellResult:
    """The final test evaluation of one CSP cell's best model at its tuned step size (an MLflow child run)."""
    owner, seed = trial.params.arm, trial.params.seed
    step_lr = trial.metrics[metric_name(arm, owner, TUNED_STEP_LR)]
    settings = replace(final_settings(spec, launch), step_lr=step_lr, sampling_arm=None if arm == owner else arm)
    tags = sharing_tags(arm, owner)
    evaluation = evaluate_logged_run(trial.training_run_id, settings, tracking_uri=uri, extra_tags=tags,
                                     show_progress=show_progress, label=f"{ARMS[arm].label} (seed {seed})", pool=pool)
    leakage, summary = evaluation.leakage, evaluation.summary
    assert evaluation.run_id is not None  # evaluate_logged_run logs every evaluation it returns
    return CellResult(arm=arm, seed=seed, training_run_id=trial.training_run_id, evaluation_run_id=evaluation.run_id,
                      step_lr=step_lr, val_match_rate=trial.metrics[metric_name(arm, owner, STEP_LR_METRIC)],
                      test_match_rate=summary.match_rate, test_rmse=summary.rmse, searched=trial.params.searched,
                      model_of=owner, leaked_fraction=leakage.leaked_fraction if leakage else math.nan,
                      unleaked_match_rate=leakage.unleaked_match_rate if leakage else math.nan,
                      unleaked_rmse=leakage.unleaked_rmse if leakage else math.nan,
                      test_crmse=summary.crmse, test_metre=summary.metre, test_metre_rmse=summary.metre_rmse,
                      rms=tuple(result.rms if result.matched else math.nan for result in evaluation.per_crystal),
                      metre_rms=tuple(math.nan if result.metre_rms is None else result.metre_rms
                                      for result in evaluation.per_crystal))


def sharing_tags(arm: str, owner: str) -> dict[str, str]:
    """The evaluation run inherits the training run's tags; an arm sampling a shared model says which arm it is."""
    return {} if arm == owner else {"arm": arm, "shares_model_of": owner, **{
        f"switch.{name}": str(value) for name, value in asdict(ARMS[arm].objective).items()}}


def generation_cell(arm: str, trial: FinishedTrial, spec: SweepSpec, uri: str, show_progress: bool) -> CellResult:
    """A generation cell's final stage: spec.num_generated crystals from its best model at the config's step size,
    scored against the test split (validity, coverage, Wasserstein distances) in an MLflow child run."""
    owner, seed, searched = trial.params.arm, trial.params.seed, trial.params.searched
    step_lr = spec.config_for(owner, searched).sampler.step_lr
    run_id, metrics = generate_for_logged_run(trial.training_run_id, spec.num_generated, seed=0, step_lr=step_lr,
                                              sampling_arm=None if arm == owner else arm, tracking_uri=uri,
                                              extra_tags=sharing_tags(arm, owner), show_progress=show_progress)
    return CellResult(arm=arm, seed=seed, training_run_id=trial.training_run_id, evaluation_run_id=run_id,
                      step_lr=step_lr, val_match_rate=math.nan, test_match_rate=math.nan, test_rmse=math.nan,
                      searched=searched, model_of=owner, generation=metrics)
