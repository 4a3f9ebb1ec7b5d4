"""How sure a score is: seeded bootstrap intervals over the test crystals, and paired differences between arms.

An arm's results are one number per test crystal, or per test crystal and seed: the rms of its best
match, NaN where it matched nothing (as CrystalResult.rms). A table of shape (crystals,) or
(crystals, seeds), every seed scoring the same crystals in the same order. Match rate, RMSE and
corrected RMSE are statistics of that table.

Why resample crystals, and keep each crystal's seeds together: an interval answers "how different
would the score be on another test set drawn like this one, sampled again?". The test crystals are
the random sample. A crystal's seeds are repeated measurements of one crystal and strongly
correlated (an easy crystal is matched under every seed), so resampling (crystal, seed) cells as if
independent would count three seeds as three times the data and make the interval too narrow by up
to sqrt(3); resampling seeds alone would ignore which crystals happened to be in the test set, and
with one seed give no spread at all. Drawing crystals with replacement, each with all its seeds,
carries both the test-set variability and the seed-to-seed variability within a crystal. The
statistic pools the drawn crystals' seeds (a match rate over every (crystal, seed) cell).

Why pair arms: every arm is scored on the same test crystals, and most of a score's spread is which
crystals are hard. Resampling the same crystals for both arms cancels that shared part, so the
interval on the difference is much narrower than two separate intervals suggest.

Percentile intervals over `n_resamples` resamples, the crystal indices drawn from
numpy.random.default_rng(seed) in blocks of 64 resamples: the same seed and number of crystals give
the same resamples in every call, so a table of arms stays reproducible, and the arms of one table
are compared on common resamples. scipy.stats.bootstrap(method="percentile", paired=True, batch=64)
draws the same resamples and gives the same interval where it applies (tests/test_uncertainty.py
checks it), but it is not used: a resample whose RMSE is undefined (no crystal matched) turns its
whole interval into NaN, where here such resamples are left out and counted; each seed would have to
be passed as a separate sample; and its seeding argument changed name within the SciPy versions the
project allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# A statistic reduces the last two axes (crystals, seeds) of an rms table: (..., crystals, seeds) -> (...).
Statistic = Callable[[np.ndarray], np.ndarray]
RESAMPLE_BLOCK = 64  # resamples drawn (and evaluated) at a time; part of what a seed reproduces


def match_rate(rms: np.ndarray) -> np.ndarray:
    """The fraction of (crystal, seed) cells with a match."""
    return np.isfinite(rms).mean(axis=(-2, -1))


def rmse(rms: np.ndarray) -> np.ndarray:
    """The published RMSE: the mean rms over the matched cells; NaN where nothing matched."""
    matched = np.isfinite(rms)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(matched, rms, 0.0).sum(axis=(-2, -1)) / matched.sum(axis=(-2, -1))


def crmse(stol: float) -> Statistic:
    """The corrected RMSE (scores.corrected_rmse) as a statistic: a cell without a match counts as stol."""

    def corrected(rms: np.ndarray) -> np.ndarray:
        return np.where(np.isfinite(rms), rms, stol).mean(axis=(-2, -1))

    return corrected


@dataclass(frozen=True)
class Interval:
    """A score (or a difference of scores) with its bootstrap percentile interval."""

    estimate: float  # the statistic on the test set itself
    low: float
    high: float
    confidence: float
    n_resamples: int
    undefined: int  # resamples where the statistic is undefined (an RMSE with no match), left out of the interval

    @property
    def excludes_zero(self) -> bool:
        """For a difference between arms: the interval lies on one side of 0 (no difference is ruled out)."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_interval(per_crystal_values, statistic: Statistic, n_resamples: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> Interval:
    """The statistic of an arm's rms table with a percentile interval over resampled test crystals.

    per_crystal_values: (crystals,) or (crystals, seeds), NaN where not matched; a crystal's seeds
    are drawn together (see the module's docstring for why).
    """
    table = rms_table(per_crystal_values)
    replicates = np.concatenate([statistic(table[indices]) for indices in resample_blocks(len(table), n_resamples, seed)])
    return percentile_interval(float(statistic(table)), replicates, confidence)


def paired_difference(arm_values, reference_values, statistic: Statistic, n_resamples: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> Interval:
    """statistic(arm) - statistic(reference) with a paired bootstrap interval: each resample draws the same
    test crystals for both. The two tables must list the same crystals in the same order; their numbers
    of seeds may differ. `.excludes_zero` says whether the difference is resolved at this confidence."""
    arm, reference = rms_table(arm_values), rms_table(reference_values)
    if len(arm) != len(reference):
        raise ValueError(f"a paired comparison needs the same test crystals: {len(arm)} against {len(reference)}")
    replicates = np.concatenate([statistic(arm[indices]) - statistic(reference[indices])
                                 for indices in resample_blocks(len(arm), n_resamples, seed)])
    return percentile_interval(float(statistic(arm) - statistic(reference)), replicates, confidence)


def rms_table(values) -> np.ndarray:
    """(crystals, seeds) float array of per-crystal values; a 1-D input is one seed. None counts as NaN."""
    table = np.array(values, dtype=float)
    if table.ndim == 1:
        table = table[:, None]
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"need per-crystal values of shape (crystals,) or (crystals, seeds), not {table.shape}")
    return table


def resample_blocks(num_crystals: int, n_resamples: int, seed: int):
    """Crystal indices of each resample, (block, crystals) arrays of up to RESAMPLE_BLOCK resamples."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, not {n_resamples}")
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, RESAMPLE_BLOCK):
        yield rng.integers(0, num_crystals, size=(min(RESAMPLE_BLOCK, n_resamples - start), num_crystals))


def percentile_interval(estimate: float, replicates: np.ndarray, confidence: float) -> Interval:
    """The (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the defined replicates."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, not {confidence}")
    defined = replicates[np.isfinite(replicates)]
    if len(defined) == 0 or not math.isfinite(estimate):
        low = high = math.nan
    else:
        low, high = np.quantile(defined, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(estimate, float(low), float(high), confidence, len(replicates), len(replicates) - len(defined))
