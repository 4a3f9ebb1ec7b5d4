"""A trial as the sweep reads it: its cell and searched values going in, its training run and metrics coming out.

Tune and Optuna carry a trial's parameters as a flat dict (Optuna suggests each by name, and Tune
saves them for a resume), and its last result as another. These records are built from those
dicts once, where they come out of Tune, so that no other module reads them by key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ARM = "arm"  # the trial's arm, a parameter Optuna chooses like any other
SEED = "run.seed"  # the trial's seed: a config field, named as everywhere
TRAINING_RUN_ID = "training_run_id"  # in a trial's last result: its MLflow training run


@dataclass(frozen=True)
class TrialParams:
    """One trial's parameters: its cell (arm, seed) and the values searched for it (config field -> value)."""

    arm: str
    seed: int
    searched: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_tune(cls, params: dict[str, Any]) -> TrialParams:
        searched = {name: value for name, value in params.items() if name not in (ARM, SEED)}
        return cls(arm=params[ARM], seed=int(params[SEED]), searched=searched)

    def to_tune(self) -> dict[str, Any]:
        return {ARM: self.arm, SEED: self.seed, **self.searched}

    def config_values(self) -> dict[str, Any]:
        """The config fields this trial sets: the searched ones and its seed."""
        return {SEED: self.seed, **self.searched}


@dataclass(frozen=True)
class FinishedTrial:
    """A trial that trained its model (and searched its step size): what the final stage picks among."""

    params: TrialParams
    training_run_id: str
    metrics: dict[str, float]  # its last result: the last epoch's metrics and the step-size search's

    @classmethod
    def from_tune(cls, result: dict[str, Any]) -> FinishedTrial:
        """From a trial's last result as Tune returns it (its parameters under "config")."""
        metrics = {name: float(value) for name, value in result.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        return cls(params=TrialParams.from_tune(result["config"]), training_run_id=result[TRAINING_RUN_ID],
                   metrics=metrics)

    def metric(self, name: str, missing: float = math.nan) -> float:
        return self.metrics.get(name, missing)
