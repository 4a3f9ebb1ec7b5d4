"""What a running sweep prints: trial k of N, its arm and seed, epochs done and an estimate of the time left.

Ray Tune's own status box counts reports ("iter 3") and shows losses; a trial here reports at
its checkpoints only, so that box says little. This Tune callback runs on the driver and
prints one line per report instead.
"""

from __future__ import annotations

import time

from ray.tune import Callback

from equicsp.sweep.spec import SweepSpec
from equicsp.task import TUNED_STEP_LR


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class SweepProgress(Callback):
    """Prints "trial k of N (arm, seed s): epoch e/E ..., training: about T left" as trials report and finish.

    The estimate is of the training left: the epochs still to train at the rate of those done
    so far (a finished trial counts its step-size search into that rate). It is left out once
    every epoch is trained (step-size searches may still run; the test stage follows).
    """

    def __init__(self, spec: SweepSpec, total_trials: int, print_fn=None):
        self.spec = spec
        self.total = total_trials
        # Tune pickles its callbacks, and a driver joined to a running cluster has Ray's own print in
        # builtins, which does not pickle: look print up when a line is written instead of holding it.
        self.print_fn = print_fn
        self.started = time.monotonic()
        self.epochs_done: dict[str, int] = {}  # trial id -> epochs trained
        self.epochs_of: dict[str, int] = {}  # trial id -> epochs it trains
        self.finished: set[str] = set()

    def _epochs(self, trial) -> int:
        if trial.trial_id not in self.epochs_of:
            params = dict(trial.config)
            arm = params.pop("arm", self.spec.arms[0])
            self.epochs_of[trial.trial_id] = self.spec.config_for(arm, params).optim.epochs
        return self.epochs_of[trial.trial_id]

    def _label(self, trials, trial) -> str:
        number = trials.index(trial) + 1 if trial in trials else len(trials)
        config = trial.config
        return f"trial {number} of {self.total} ({config.get('arm', '?')}, seed {config.get('run.seed', '?')})"

    def eta(self, trials) -> str:
        """The training time left at the rate of the epochs trained so far; '' before any epoch and after the last."""
        done = sum(self.epochs_done.values())
        per_trial = [self._epochs(trial) for trial in trials] or [1]
        planned = sum(per_trial) + (self.total - len(trials)) * max(per_trial)
        if not done or done >= planned:
            return ""
        rate = done / max(time.monotonic() - self.started, 1e-9)
        return f", training: about {duration((planned - done) / rate)} left"

    def _print(self, line: str, flush: bool = True) -> None:
        (self.print_fn or print)(line, flush=flush)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._print(f"{self._label(trials, trial)}: started ({len(self.finished)} of {self.total} finished)", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return
        epochs = self._epochs(trial)
        self.epochs_done[trial.trial_id] = int(result["epoch"])
        loss = f", val loss {result['val_total']:.4g}" if "val_total" in result else ""
        tuned = f", tuned step_lr {result[TUNED_STEP_LR]:.3g}" if TUNED_STEP_LR in result else ""
        self._print(f"{self._label(trials, trial)}: epoch {int(result['epoch'])}/{epochs}{loss}{tuned}"
                   f"{self.eta(trials)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        self.epochs_done[trial.trial_id] = self._epochs(trial)
        self._print(f"{self._label(trials, trial)}: done, {len(self.finished)} of {self.total} finished, "
                   f"{duration(time.monotonic() - self.started)} so far{self.eta(trials)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(f"{self._label(trials, trial)}: failed (Ray reports why)", flush=True)
