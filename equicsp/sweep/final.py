"""The sweep's final stage: the best trial of each (arm, seed) cell, evaluated on the test split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from equicsp.distributed_eval import EvaluationSettings, evaluate_logged_run
from equicsp.sweep.spec import SweepLaunch, SweepSpec
from equicsp.sweep.step_size import STEP_LR_METRIC


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


def best_per_cell(trials: list[dict[str, Any]], spec: SweepSpec) -> list[dict[str, Any]]:
    """Each (arm, seed)'s best trial: highest validation match rate, then lowest validation loss."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for trial in trials:
        params = trial["config"]
        key = (params["arm"], int(params["run.seed"]))
        rank = (trial[STEP_LR_METRIC], -trial.get("val_denoise", math.inf))
        if key not in best or rank > (best[key][STEP_LR_METRIC], -best[key].get("val_denoise", math.inf)):
            best[key] = trial
    return [best[(arm, seed)] for arm in spec.arms for seed in spec.seeds if (arm, seed) in best]


def evaluate_cell(trial: dict[str, Any], spec: SweepSpec, launch: SweepLaunch, uri: str,
                  show_progress: bool) -> CellResult:
    """The final test evaluation of one cell's best model at its tuned step size (an MLflow child run)."""
    params = trial["config"]
    arm, seed = params["arm"], int(params["run.seed"])
    settings = EvaluationSettings(num_samples=spec.test_samples, seed=0, limit=spec.test_limit,
                                  workers=launch.eval_workers, step_lr=trial["tuned_step_lr"])
    evaluation = evaluate_logged_run(trial["training_run_id"], settings, tracking_uri=uri,
                                     show_progress=show_progress)  # the run inherits arm, seed and switches
    searched = {name: value for name, value in params.items() if name not in ("arm", "run.seed")}
    return CellResult(arm, seed, trial["training_run_id"], evaluation.run_id, trial["tuned_step_lr"],
                      trial[STEP_LR_METRIC], evaluation.summary.match_rate, evaluation.summary.rmse, searched)
