"""Time left: durations as read, the mean epoch time past the warm-up, and a countdown that does not jump."""

from equicsp.engine.eta import Countdown, EpochTimer, duration


def test_durations_read_as_seconds_minutes_or_hours():
    assert [duration(s) for s in (4, 89, 600, 5399, 7500)] == ["4 s", "89 s", "10 min", "1 h 30 min", "2 h 05 min"]


def test_the_first_epoch_is_left_out_of_the_mean_once_another_is_timed():
    timer = EpochTimer(window=3)
    assert timer.left(10) is None
    timer.add(30.0)  # compilation and warm-up
    assert timer.left(10) == 300.0  # nothing better yet
    for seconds in (2.0, 2.0, 4.0, 4.0, 4.0):
        timer.add(seconds)
    assert timer.mean() == 4.0  # the last three, without the first
    assert timer.left(5) == 20.0 and timer.left(-1) == 0.0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_countdown_smooths_estimates_that_jump_and_rises_only_for_a_clearly_later_finish():
    clock = FakeClock()
    countdown = Countdown(clock=clock)
    shown = []
    # The sweep of issue 27: 11, 5, 4, 6, 3 min estimated a minute apart (a true finish near minute 9).
    for minute, estimate in enumerate((11, 5, 4, 6, 3)):
        clock.now = 60.0 * minute
        shown.append(countdown.update(60.0 * estimate) / 60)
    assert all(later <= earlier for earlier, later in zip(shown, shown[1:])), shown
    assert shown[1] > 5 and shown[-1] < shown[0] - 4
    clock.now += 60
    assert countdown.update(60.0 * 30) / 60 > shown[-1] + 5, "a much later finish shows"
