"""What a running sweep prints: trial k of N, its arm and seed, epochs done, step sizes tried, and the time left.

Ray Tune's own status box counts reports ("iter 3") and shows losses; a trial here reports at
its checkpoints only, so that box says little. This Tune callback runs on the driver and
prints one line per report instead. A trial's step-size search reports each step size it tries
the same way (a print in the trial would stay in its worker's log: see trials.reporter).

The time left (SweepClock) covers the whole sweep: the epochs still to train and the step
sizes still to try, each at the rate measured so far over every trial, shared among the
trials that run at once, then the final evaluation, scaled from the step-size searches'
cost per sampled crystal. A stage with nothing to measure it by yet is named instead
("+ final evaluation"). The estimate is smoothed into a countdown (engine.eta.Countdown):
a trial's start-up or a search's first step size no longer makes it jump.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ray.tune import Callback

from equicsp.engine.eta import Countdown, duration
from equicsp.sweep.spec import SweepSpec
from equicsp.sweep.step_size import SEARCH_PROGRESS
from equicsp.sweep.trial_records import ARM, SEED, TrialParams
from equicsp.task import TUNED_STEP_LR, task_of


@dataclass
class TrialTimes:
    """When one trial started and last reported (driver clock), and how far it had got."""

    epochs: int  # epochs it trains
    step_sizes: int  # step sizes it tries (its own search and those of the arms sharing its model)
    started: float
    first_epoch: tuple[float, int] | None = None  # (time, epoch) of its first epoch report
    last_epoch: tuple[float, int] | None = None
    searched: tuple[float, int] | None = None  # (time, step sizes tried)
    finished: float | None = None


class SweepClock:
    """The seconds a sweep has left, from its trials' reports (times on the driver's clock).

    final_crystals: the crystals the final stage samples per cell (test crystals x k), None when not known;
    search_crystals: those one step size samples (spec.step_lr_crystals).
    """

    def __init__(self, total_trials: int, epochs: int, step_sizes: int, concurrent: int, cells: int,
                 final_crystals: int | None, search_crystals: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.epochs, self.step_sizes = total_trials, epochs, step_sizes
        self.concurrent = concurrent or total_trials  # 0: every trial at once
        self.cells, self.final_crystals, self.search_crystals = cells, final_crystals, search_crystals
        self.clock = clock
        self.trials: dict[str, TrialTimes] = {}
        self.countdown = Countdown(clock=clock)
        self.untimed: list[str] = []  # the stages the last estimate left out

    def start(self, trial_id: str, epochs: int | None = None, step_sizes: int | None = None) -> None:
        self.trials[trial_id] = TrialTimes(epochs or self.epochs, self.step_sizes if step_sizes is None else step_sizes,
                                           self.clock())

    def _trial(self, trial_id: str) -> TrialTimes:
        if trial_id not in self.trials:  # a trial resumed by a restarted driver: its start was not seen
            self.start(trial_id)
        return self.trials[trial_id]

    def epoch(self, trial_id: str, epoch: int) -> None:
        trial = self._trial(trial_id)
        if trial.last_epoch and epoch <= trial.last_epoch[1]:
            return  # a trial's final result repeats its last epoch once its search is done
        trial.last_epoch = (self.clock(), epoch)
        trial.first_epoch = trial.first_epoch or trial.last_epoch

    def searched(self, trial_id: str, step_sizes_tried: int) -> None:
        self._trial(trial_id).searched = (self.clock(), step_sizes_tried)

    def finish(self, trial_id: str) -> None:
        self._trial(trial_id).finished = self.clock()

    def seconds_per_epoch(self) -> float | None:
        """Between a trial's epoch reports, pooled over trials; before any trial reports twice, from its start."""
        spans = [(t.last_epoch[0] - t.first_epoch[0], t.last_epoch[1] - t.first_epoch[1]) for t in self.trials.values()
                 if t.first_epoch and t.last_epoch and t.last_epoch[1] > t.first_epoch[1]]
        if not spans:
            spans = [(t.first_epoch[0] - t.started, t.first_epoch[1]) for t in self.trials.values() if t.first_epoch]
        epochs = sum(count for _, count in spans)
        return sum(seconds for seconds, _ in spans) / epochs if epochs else None

    def start_up_seconds(self, per_epoch: float) -> float:
        """A trial's time before its first epoch is trained (Ray Train's workers starting, the data loading)."""
        waits = [max(t.first_epoch[0] - t.started - t.first_epoch[1] * per_epoch, 0.0)
                 for t in self.trials.values() if t.first_epoch]
        return sum(waits) / len(waits) if waits else 0.0

    def seconds_per_step_size(self) -> float | None:
        """From the end of a trial's training to its latest step size (or its end), per step size tried."""
        spans = []
        for t in self.trials.values():
            if not t.last_epoch or t.last_epoch[1] < t.epochs:
                continue  # still training, or stopped early (no search)
            if t.finished is not None and t.step_sizes:
                spans.append((t.finished - t.last_epoch[0], t.step_sizes))
            elif t.searched:
                spans.append((t.searched[0] - t.last_epoch[0], t.searched[1]))
        tried = sum(count for _, count in spans)
        return sum(seconds for seconds, _ in spans) / tried if tried else None

    def left(self) -> tuple[float | None, list[str]]:
        """(seconds left, the stages left out of them for want of a measurement); None before any epoch report."""
        per_epoch = self.seconds_per_epoch()
        if per_epoch is None:
            return None, []
        per_step = self.seconds_per_step_size()
        start_up, now = self.start_up_seconds(per_epoch), self.clock()
        running = [self._trial_left(t, per_epoch, per_step or 0.0, start_up, now)
                   for t in self.trials.values() if t.finished is None]
        unseen = max(self.total - len(self.trials), 0)
        new_trial = start_up + self.epochs * per_epoch + self.step_sizes * (per_step or 0.0)
        trials = max((sum(running) + unseen * new_trial) / self.concurrent, max(running, default=0.0))
        missing = []
        searching = self.step_sizes and (unseen or any(t.finished is None and t.step_sizes
                                                       for t in self.trials.values()))
        if per_step is None and searching:
            missing.append("step-size searches")
        final = self._final_seconds(per_step)
        if final is None:
            missing.append("final evaluation")
        return trials + (final or 0.0), missing

    def _trial_left(self, t: TrialTimes, per_epoch: float, per_step: float, start_up: float, now: float) -> float:
        if t.last_epoch is None:
            training = max(start_up + t.epochs * per_epoch - (now - t.started), 0.0)
        else:
            training = max((t.epochs - t.last_epoch[1]) * per_epoch - (now - t.last_epoch[0]), 0.0)
        if t.searched is None:
            return training + t.step_sizes * per_step
        return max((t.step_sizes - t.searched[1]) * per_step - (now - t.searched[0]), 0.0)

    def _final_seconds(self, per_step: float | None) -> float | None:
        """The final stage: each cell's test crystals at the machine's sampling rate during the searches (each of
        the trials running at once sampled search_crystals per step size); None without a search to scale."""
        if per_step is None or self.final_crystals is None:
            return None
        return self.cells * self.final_crystals * per_step / (self.search_crystals * self.concurrent)

    def shown_left(self) -> tuple[float | None, list[str]]:
        """left(), smoothed into a countdown; a stage newly timed starts it again (the estimate means more now)."""
        seconds, missing = self.left()
        if seconds is None:
            return None, missing
        if missing != self.untimed:
            self.countdown = Countdown(clock=self.clock)
            self.untimed = missing
        return self.countdown.update(seconds), missing

    def describe(self) -> str:
        """', about 12 min left' (+ the stages not yet timed); '' before anything is measured."""
        seconds, missing = self.shown_left()
        if seconds is None:
            return ""
        return f", about {duration(seconds)} left" + "".join(f" + {stage}" for stage in missing)


class SweepProgress(Callback):
    """Prints "trial k of N (arm, seed s): epoch e/E ..., about T left" as trials report and finish.

    The time left is the whole sweep's, final evaluation included (SweepClock).
    """

    def __init__(self, spec: SweepSpec, total_trials: int, print_fn=None, concurrent: int = 0, unit: str = "CPU",
                 test_crystals: int | None = None):
        """concurrent: the trials that run at once (0: no limit), each on its own share of unit (CPU or GPU);
        test_crystals: the final stage's test crystals per cell (default spec.test_limit; None: not known)."""
        self.spec = spec
        self.total = total_trials
        self.concurrent, self.unit = concurrent, unit
        # Tune pickles its callbacks, and a driver joined to a running cluster has Ray's own print in
        # builtins, which does not pickle: look print up when a line is written instead of holding it.
        self.print_fn = print_fn
        self.started = time.monotonic()
        self.epochs_of: dict[str, int] = {}  # trial id -> epochs it trains
        self.finished: set[str] = set()
        self.failed: set[str] = set()
        test_crystals = test_crystals or spec.test_limit
        task = task_of(spec.task)
        per_trial = [self._step_sizes(arm) for arm in spec.trained_arms]
        self.clock = SweepClock(total_trials, spec.config_for(spec.arms[0], {}).optim.epochs,
                                round(sum(per_trial) / len(per_trial)), concurrent,
                                len(spec.arms) * len(spec.seeds),
                                test_crystals * spec.test_samples if test_crystals and not task.diffuses_types else None,
                                spec.step_lr_crystals)

    def _step_sizes(self, arm: str) -> int:
        """The step sizes a trial of arm tries: its own search and one for each arm sampling its model."""
        if not task_of(self.spec.task).searches_step_size:
            return 0
        return self.spec.step_lr_trials * (1 + len(self.spec.sharing_arms(arm)))

    def _epochs(self, trial) -> int:
        if trial.trial_id not in self.epochs_of:
            params = TrialParams.from_tune(trial.config)
            self.epochs_of[trial.trial_id] = self.spec.config_for(params.arm, params.config_values()).optim.epochs
        return self.epochs_of[trial.trial_id]

    def _label(self, trials, trial) -> str:
        number = trials.index(trial) + 1 if trial in trials else len(trials)
        config = trial.config
        return f"trial {number} of {self.total} ({config.get(ARM, '?')}, seed {config.get(SEED, '?')})"

    def _print(self, line: str, flush: bool = True) -> None:
        (self.print_fn or print)(line, flush=flush)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.clock.start(trial.trial_id, self._epochs(trial), self._step_sizes(TrialParams.from_tune(trial.config).arm))
        self._print(f"{self._label(trials, trial)}: started ({len(self.finished)} of {self.total} finished)", flush=True)
        self._say_who_waits(trials)

    def _say_who_waits(self, trials) -> None:
        """One line when the cluster is full and trials are left: Tune starts the next once a share is free."""
        running = len(trials) - len(self.finished) - len(self.failed)
        if self.concurrent and running >= self.concurrent and len(trials) < self.total:
            ahead = f"{running} trial{'s' if running > 1 else ''} ahead"
            self._print(f"trial {len(trials) + 1} of {self.total}: waiting for a {self.unit} ({ahead})", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if f"{SEARCH_PROGRESS}done" in result:
            self._search_result(trials, trial, result)
            return
        if "epoch" not in result:
            return
        epochs = self._epochs(trial)
        self.clock.epoch(trial.trial_id, int(result["epoch"]))
        loss = f", val loss {result['val_total']:.4g}" if "val_total" in result else ""
        tuned = f", tuned step_lr {result[TUNED_STEP_LR]:.3g}" if TUNED_STEP_LR in result else ""
        self._print(f"{self._label(trials, trial)}: epoch {int(result['epoch'])}/{epochs}{loss}{tuned}"
                   f"{self.clock.describe()}", flush=True)

    def _search_result(self, trials, trial, result) -> None:
        """'step-size search j/K, best val match rate so far' for a step size a trial's search tried."""
        done, total = int(result[f"{SEARCH_PROGRESS}done"]), int(result[f"{SEARCH_PROGRESS}trials"])
        self.clock.searched(trial.trial_id, done)
        arm = result.get(f"{SEARCH_PROGRESS}arm") or ""
        whose = f" (sampling as {arm})" if arm else ""
        self._print(f"{self._label(trials, trial)}: step-size search{whose}, {done} of {total} tried, best val match rate "
                    f"{100 * result[f'{SEARCH_PROGRESS}best_match_rate']:.1f}% at step_lr "
                    f"{result[f'{SEARCH_PROGRESS}best_step_lr']:.3g}{self.clock.describe()}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)
        self.clock.finish(trial.trial_id)
        self._print(f"{self._label(trials, trial)}: done, {len(self.finished)} of {self.total} finished, "
                   f"{duration(time.monotonic() - self.started)} so far{self.clock.describe()}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed.add(trial.trial_id)
        self.clock.finish(trial.trial_id)
        self._print(f"{self._label(trials, trial)}: failed (Ray reports why)", flush=True)
