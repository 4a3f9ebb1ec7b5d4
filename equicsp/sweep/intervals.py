"""How sure each row of the ablation table is: bootstrap intervals per arm, and each arm's paired difference from
EquiCSP (docs/method.md#uncertainty).

Every CSP cell keeps its test crystals' best rms in the test split's order (CellResult.rms), the same crystals for
every arm. An arm's table is (crystals, seeds): its seeds side by side. evaluation.uncertainty resamples whole
test crystals, a crystal's seeds together, so the interval carries both the test set's and the seeds' spread; the
difference from EquiCSP resamples the same crystals for both arms. The resamples are seeded: the same cells give
the same table.
"""

from __future__ import annotations

import math

import numpy as np

from equicsp.evaluation.matching import MATCHER_TOLERANCES
from equicsp.evaluation.uncertainty import Interval, bootstrap_interval, crmse, match_rate, paired_difference, rmse
from equicsp.sweep.final import CellResult

REFERENCE_ARM = "equicsp"  # every arm is compared with the paper's full model
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
STATISTICS = {"match_rate": match_rate, "rmse": rmse, "crmse": crmse(MATCHER_TOLERANCES["stol"])}


def rms_table(cells: list[CellResult], arm: str) -> np.ndarray | None:
    """The arm's per-crystal rms, (crystals, seeds) in seed order; None when a cell kept none or their crystals
    differ in number (an interval over different test sets would mean nothing)."""
    mine = sorted((cell for cell in cells if cell.arm == arm), key=lambda cell: cell.seed)
    if not mine or not all(cell.rms for cell in mine) or len({len(cell.rms) for cell in mine}) != 1:
        return None
    return np.array([cell.rms for cell in mine], dtype=float).T


def arm_intervals(cells: list[CellResult], arm: str) -> dict[str, Interval]:
    """For each statistic, the arm's estimate and interval ("match_rate", ...) and, for an arm other than
    REFERENCE_ARM, its difference from it ("match_rate_diff", ...: arm minus EquiCSP); {} without per-crystal rms."""
    table = rms_table(cells, arm)
    if table is None:
        return {}
    found = {name: bootstrap_interval(table, statistic, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CONFIDENCE)
             for name, statistic in STATISTICS.items()}
    reference = rms_table(cells, REFERENCE_ARM)
    if arm != REFERENCE_ARM and reference is not None and len(reference) == len(table):
        found.update({f"{name}_diff": paired_difference(table, reference, statistic, BOOTSTRAP_RESAMPLES,
                                                        BOOTSTRAP_SEED, CONFIDENCE)
                      for name, statistic in STATISTICS.items()})
    return found


def interval_columns(intervals: dict[str, Interval]) -> dict[str, float | bool]:
    """A table row's columns, the same for every row (nan where an arm has no such interval): NAME_low and
    NAME_high for each score, and for each difference from EquiCSP NAME_diff (the estimate), its _low and _high
    and NAME_diff_resolved (its interval excludes 0); match rates in %."""
    columns: dict[str, float | bool] = {}
    for name in STATISTICS:
        scale = 100.0 if name == "match_rate" else 1.0
        score, difference = intervals.get(name), intervals.get(f"{name}_diff")
        columns[f"{name}_low"], columns[f"{name}_high"] = _bounds(score, scale)
        columns[f"{name}_diff"] = scale * difference.estimate if difference else math.nan
        columns[f"{name}_diff_low"], columns[f"{name}_diff_high"] = _bounds(difference, scale)
        columns[f"{name}_diff_resolved"] = bool(difference and difference.excludes_zero)
    return columns


def _bounds(interval: Interval | None, scale: float) -> tuple[float, float]:
    return (scale * interval.low, scale * interval.high) if interval else (math.nan, math.nan)
