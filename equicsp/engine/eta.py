"""Time left, as a person reads it: durations, the mean epoch time, and a countdown that does not jump.

Every command that runs for minutes says how long it has left; they share these pieces so
their lines read alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def duration(seconds: float) -> str:
    """'45 s', '12 min', '2 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class EpochTimer:
    """Wall seconds per epoch, and the time left at their running mean.

    The first epoch timed in a process is left out once a later one is timed: it holds the
    warm-up (first allocations, and torch.compile's tracing of each batch shape), which took
    several times an epoch's cost. The mean is over the last `window` epochs, so a machine that
    gets busier or quieter shows within a few epochs.
    """

    def __init__(self, window: int = 20):
        self.window = window
        self.seconds: list[float] = []

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def mean(self) -> float | None:
        steady = self.seconds[1:] or self.seconds
        recent = steady[-self.window:]
        return sum(recent) / len(recent) if recent else None

    def left(self, epochs: int) -> float | None:
        """Seconds for `epochs` more epochs; None before any epoch is timed."""
        mean = self.mean()
        return None if mean is None else max(epochs, 0) * mean


class Countdown:
    """Time left from estimates that come and go, shown as a countdown that does not jump.

    Each estimate predicts a finish time; the shown finish time moves a fraction (`smoothing`)
    of the way to it, and a later finish within `slack` of the time shown is ignored: a count
    that goes down steadily, rising only when the work clearly takes longer than shown.
    """

    def __init__(self, smoothing: float = 0.3, slack: float = 0.25, clock: Callable[[], float] = time.monotonic):
        self.smoothing, self.slack, self.clock = smoothing, slack, clock
        self.finish: float | None = None

    def update(self, seconds_left: float) -> float:
        """The seconds left to show, given a new estimate of them."""
        now = self.clock()
        predicted = now + max(seconds_left, 0.0)
        if self.finish is None:
            self.finish = predicted
        elif not (self.finish < predicted <= now + (1 + self.slack) * max(self.finish - now, 0.0)):
            self.finish += self.smoothing * (predicted - self.finish)
        return max(self.finish - now, 0.0)
