"""Optuna's side of a sweep: the define-by-run space of a trial, the seeded first points, the Tune searcher."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.tune.search.optuna import OptunaSearch

from equicsp.sweep.space import domain_contains, suggest
from equicsp.sweep.spec import SweepSpec
from equicsp.sweep.trial_records import ARM, SEED, TrialParams

if TYPE_CHECKING:
    import optuna


class SearchSpace:
    """Optuna's define-by-run space: the cell (arm, seed), then the arm's searched fields.

    A class rather than a closure: Tune pickles the searcher with the space when it saves
    the sweep's state for a resume.
    """

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    def __call__(self, trial: optuna.Trial) -> None:
        arm = trial.suggest_categorical(ARM, list(self.spec.trained_arms))
        trial.suggest_categorical(SEED, list(self.spec.seeds))
        for name, domain in self.spec.arm_space(arm).items():
            suggest(trial, name, domain)


def initial_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every trained cell trials_per_cell times; the first trial of a cell runs the config's own values."""
    points = []
    for arm in spec.trained_arms:
        defaults = spec.config_for(arm, {}).flat()
        own = {name: defaults[name] for name, domain in spec.arm_space(arm).items()
               if domain_contains(domain, defaults[name])}
        for seed in spec.seeds:
            for trial in range(spec.trials_per_cell):
                points.append(TrialParams(arm, seed, own if trial == 0 else {}).to_tune())
    return points


class FinalResultOptunaSearch(OptunaSearch):
    """OptunaSearch that learns from each trial's final result only.

    The epochs a trial reports along the way (for ASHA and the progress table) do not hold
    the search metric, which only exists once the step size has been searched.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)
