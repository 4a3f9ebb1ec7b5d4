"""A sweep's progress lines: the time left over every stage, final evaluation included, and the step-size search."""

from types import SimpleNamespace

import pytest

from equicsp.sweep.progress import SweepClock, SweepProgress
from equicsp.sweep.spec import SweepSpec
from equicsp.sweep.step_size import SearchProgress, progress_metrics


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def two_trials_one_at_a_time(clock: FakeClock) -> SweepClock:
    """2 trials of 10 epochs and 4 step sizes, one at a time; 2 cells of 100 test crystals, 25 per step size."""
    return SweepClock(total_trials=2, epochs=10, step_sizes=4, concurrent=1, cells=2, final_crystals=100,
                      search_crystals=25, clock=clock)


def test_the_time_left_counts_epochs_step_sizes_and_the_final_evaluation_at_the_rates_measured():
    clock = FakeClock()
    sweep = two_trials_one_at_a_time(clock)
    sweep.start("a")
    clock.now = 20.0  # 10 s of start-up, then 5 epochs of 2 s
    sweep.epoch("a", 5)
    seconds, missing = sweep.left()
    assert sweep.seconds_per_epoch() == 4.0  # from its start: start-up and epochs together, for now
    assert missing == ["step-size searches", "final evaluation"]
    assert seconds == pytest.approx(5 * 4.0 + 10 * 4.0)  # this trial's epochs left, then the next trial's
    clock.now = 30.0
    sweep.epoch("a", 10)
    assert sweep.seconds_per_epoch() == 2.0 and sweep.start_up_seconds(2.0) == 10.0
    clock.now = 36.0  # two step sizes of 3 s
    sweep.searched("a", 2)
    assert sweep.seconds_per_step_size() == 3.0
    seconds, missing = sweep.left()
    assert missing == []
    # 2 step sizes left here; the next trial: start-up, 10 epochs, 4 step sizes; then 2 cells of 4 x 25 crystals
    final = 2 * 100 * 3.0 / 25
    assert seconds == pytest.approx(2 * 3.0 + (10 + 20 + 12) + final)
    clock.now = 42.0
    sweep.finish("a")
    sweep.epoch("a", 10)  # the final result repeats the last epoch: not a new one
    assert sweep.seconds_per_step_size() == 3.0
    assert sweep.left()[0] == pytest.approx(10 + 20 + 12 + final)


def test_the_shown_estimate_goes_down_steadily_through_a_trials_start_up_and_its_search():
    """Issue 27 saw 11 -> 5 -> 4 -> 6 -> 3 min: the rate of epochs over all time swung as start-ups and searches
    came and went. Here a trial of 30 s start-up, 20 epochs of 3 s and 6 step sizes of 10 s, then another."""
    clock = FakeClock()
    sweep = SweepClock(total_trials=2, epochs=20, step_sizes=6, concurrent=1, cells=2, final_crystals=50,
                       search_crystals=25, clock=clock)
    shown, untimed = [], []

    def report() -> None:
        seconds, missing = sweep.shown_left()
        shown.append(seconds)
        untimed.append(missing)

    for trial in ("a", "b"):
        sweep.start(trial)
        clock.now += 30
        for epoch in range(5, 21, 5):
            clock.now += 15
            sweep.epoch(trial, epoch)
            report()
        for step in range(1, 7):
            clock.now += 10
            sweep.searched(trial, step)
            report()
        sweep.finish(trial)
    # A rise only where a stage is newly timed, and the line says which: "+ step-size searches" goes away.
    rises = [i for i in range(1, len(shown)) if shown[i] > shown[i - 1] and untimed[i] == untimed[i - 1]]
    assert not rises, list(zip(shown, untimed))
    assert untimed[0] == ["step-size searches", "final evaluation"] and untimed[4] == [], "both timed by a search"
    true_left = [340 - t for t in (45, 60, 75, 90, *range(100, 151, 10), 195, 210, 225, 240, *range(250, 301, 10))]
    assert shown[4:] == pytest.approx(true_left[4:])  # from the first step size on, the true time left


def spec_with(**changes) -> SweepSpec:
    return SweepSpec(name="s", preset="smoke", arms=("equicsp", "no_pm"), overrides={"optim.epochs": 40},
                     step_lr_trials=3, **changes)


def test_a_step_size_search_prints_each_step_size_with_the_best_so_far_and_the_arm_it_samples_as():
    lines = []
    progress = SweepProgress(spec_with(test_limit=10), total_trials=1, print_fn=lambda line, flush: lines.append(line))
    trial = SimpleNamespace(trial_id="a", config={"arm": "equicsp", "run.seed": 0})
    progress.on_trial_start(0, [trial], trial)
    progress.on_trial_result(1, [trial], trial, {"epoch": 40, "val_total": 1.0})
    own = SearchProgress(2, 3, 1e-4, 0.25, 3e-4, 0.5)
    progress.on_trial_result(2, [trial], trial, progress_metrics(own, 0, 6))
    shared = SearchProgress(1, 3, 1e-4, 0.25, 1e-4, 0.25, sampling_arm="no_pm")
    progress.on_trial_result(3, [trial], trial, progress_metrics(shared, 3, 6))
    assert lines[2].startswith("trial 1 of 1 (equicsp, seed 0): step-size search, 2 of 6 tried, best val match rate "
                               "50.0% at step_lr 0.0003, about ")
    assert lines[3].startswith("trial 1 of 1 (equicsp, seed 0): step-size search (sampling as no_pm), 4 of 6 tried, "
                               "best val match rate 25.0% at step_lr 0.0001")
    assert "final evaluation" not in lines[3], "timed from the search"
    assert progress.clock.trials["a"].step_sizes == 6, "no_pm samples equicsp's model: its search runs in this trial"


def test_the_final_evaluation_is_named_when_there_is_nothing_to_estimate_it_from():
    lines = []
    progress = SweepProgress(spec_with(), total_trials=1, print_fn=lambda line, flush: lines.append(line))
    trial = SimpleNamespace(trial_id="a", config={"arm": "equicsp", "run.seed": 0})
    progress.on_trial_start(0, [trial], trial)
    progress.on_trial_result(1, [trial], trial, {"epoch": 20})
    assert lines[-1].endswith(" left + step-size searches + final evaluation")  # no test_limit, no count given


def test_a_trial_reports_each_step_size_to_tune_where_the_driver_prints_it(monkeypatch):
    """A private Ray keeps worker output from the driver's console (log_to_driver=False): a print in the trial
    would not show, a Tune result does."""
    import ray.tune

    from equicsp.sweep.search import FinalResultOptunaSearch
    from equicsp.sweep.trials import reporter

    reported = []
    monkeypatch.setattr(ray.tune, "report", reported.append)
    reporter(3, 6)(SearchProgress(1, 3, 1e-4, 0.25, 1e-4, 0.25, sampling_arm="no_pm"))
    [metrics] = reported
    assert metrics["step_lr_search/done"] == 4 and metrics["step_lr_search/trials"] == 6
    assert "epoch" not in metrics and FinalResultOptunaSearch.__name__  # ASHA and the searcher pass it by
    assert "val_match_rate" not in metrics


def test_the_search_tells_of_every_step_size_and_its_best_so_far(monkeypatch):
    from contextlib import nullcontext

    import equicsp.sweep.step_size as step_size
    from equicsp.config import make_config

    config = make_config("smoke")
    rates = iter([0.2, 0.6, 0.4])
    tracker = step_size.tracking.Tracker
    monkeypatch.setattr(tracker, "get_run", lambda self, run: SimpleNamespace(data=SimpleNamespace(metrics={})))
    monkeypatch.setattr(tracker, "read_logged_checkpoint", lambda self, run: {"config": config.to_dict()})
    monkeypatch.setattr(tracker, "log_metrics", lambda *args, **kwargs: None)
    monkeypatch.setattr(tracker, "log_artifact", lambda *args, **kwargs: None)
    monkeypatch.setattr(step_size, "load_splits", lambda *args, **kwargs: {"val": None})
    monkeypatch.setattr(step_size, "connect_ray", lambda: None)
    monkeypatch.setattr(step_size, "SamplingPool", lambda *args: nullcontext())
    monkeypatch.setattr(step_size, "evaluate_checkpoint", lambda *args, **kwargs: SimpleNamespace(
        summary=SimpleNamespace(match_rate=next(rates), rmse=0.1)))
    told = []
    spec = SweepSpec(name="s", preset="smoke", step_lr_trials=3)
    step_size.search_step_lr("run", spec, "sqlite://", workers=1, on_progress=told.append)
    assert [(p.done, p.trials, p.match_rate, p.best_match_rate) for p in told] == [(1, 3, 0.2, 0.2), (2, 3, 0.6, 0.6),
                                                                                   (3, 3, 0.4, 0.6)]
    assert told[2].best_step_lr == told[1].step_lr
