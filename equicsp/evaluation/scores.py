"""Scores that mend two blind spots of the CSP protocol (docs/method.md#evaluation): corrected RMSE and METRe.

Both come from OMatG (Hoellmer et al., 2025; omg/analysis/analysis.py of FERMat-ML/OMatG, `match_rmsds`
and `metre_rmsds`) and are argued for in "All that structure matches does not glitter" (arXiv 2509.12178):

- The published RMSE averages the rms over the matched crystals only, so a model that matches fewer
  crystals (its easiest ones) can look better. The corrected RMSE counts every test crystal, a crystal
  without a match at stol, the largest rms the matcher accepts.
- The published match rate pairs each test crystal with the samples drawn for it. A composition with
  several polymorphs in the test set asks the same question (the composition) several times with
  different answers, and a model that finds all of them in the wrong order scores nothing. METRe (match
  everyone to reference) matches each test crystal against every generated crystal of its reduced
  composition and keeps the best rms.

The matcher is a configured pymatgen StructureMatcher: the project's is
StructureMatcher(**matching.MATCHER_TOLERANCES), stol=0.5, angle_tol=10, ltol=0.3, as the published
evaluation and OMatG's CSP runs use. Like OMatG's `valid` scores, a structure the caller found invalid
is passed as None: a None test crystal is a test crystal without a match, a None generated crystal
matches nothing. Structures are handed to pymatgen as they are; screen extreme cells first
(metrics.tractable_structure) and bound the time where a matcher may hang.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from equicsp.evaluation.matching import ReducedStructure, reduce_for_matching, rms_dist


def corrected_rmse(rms: Sequence[float | None], stol: float) -> float:
    """OMatG's cRMSE: the mean over all test crystals of the rms, a crystal without a match (None or NaN)
    counting as stol. NaN for no crystals.

    It lies between the matched crystals' mean rms and stol: matching a crystal at any rms the matcher
    accepts (below stol) lowers it, so matching fewer crystals never pays.
    """
    values = np.array([math.nan if value is None else value for value in rms], dtype=float)
    matched = np.isfinite(values)
    if (values[matched] < 0).any() or (values[matched] > stol).any():
        raise ValueError(f"an rms outside [0, stol = {stol}]: StructureMatcher accepts none such")
    return float(np.where(matched, values, stol).mean()) if len(values) else math.nan


@dataclass(frozen=True)
class Metre:
    """METRe and the rms scores that go with it, as OMatG's metre_rmsds reports them."""

    rate: float  # test crystals matched by some generated crystal of their composition, over all test crystals
    rmse: float  # mean best rms over the matched test crystals (nan when none)
    crmse: float  # mean best rms over all test crystals, a test crystal without a match at stol
    rms: tuple[float, ...]  # each test crystal's best rms, nan when not matched
    best: tuple[int, ...]  # the index in `generated` of the crystal giving it, -1 when not matched

    def as_dict(self) -> dict[str, float]:
        return {name: value for name, value in asdict(self).items() if name in ("rate", "rmse", "crmse")}


def metre(references: Sequence[Structure | None], generated: Sequence[Structure | None],
          matcher: StructureMatcher) -> Metre:
    """Match every test crystal against all generated crystals of its reduced composition; the best rms counts.

    generated is every sample, in any order and any number per composition (k per test crystal for best
    of k; OMatG draws one). As in OMatG, the compositions are compared first (the same elements in the
    same proportions), then matcher.get_rms_dist(generated crystal, test crystal), in that order, as
    metrics.match_one calls it; a tie keeps the earlier generated crystal. Each structure is reduced
    once however many pairs it is in (equicsp.evaluation.matching). The work grows with the square of the number
    of crystals sharing a composition: on Carbon-24 every test crystal meets every sample.
    """
    candidates: dict[tuple, list[int]] = defaultdict(list)
    for index, structure in enumerate(generated):
        if structure is not None:
            candidates[composition_key(structure)].append(index)
    reduced: dict[int, ReducedStructure] = {}
    rms, best = [math.nan] * len(references), [-1] * len(references)
    for i, reference in enumerate(references):
        if reference is None:
            continue
        same_composition = candidates.get(composition_key(reference), [])
        if not same_composition:
            continue
        target = reduce_for_matching(matcher, reference)
        for j in same_composition:
            if j not in reduced:
                sample = generated[j]
                assert sample is not None  # candidates holds the indices of generated crystals only
                reduced[j] = reduce_for_matching(matcher, sample)
            found = rms_dist(matcher, reduced[j], target)
            if found is not None and (best[i] < 0 or found[0] < rms[i]):
                rms[i], best[i] = float(found[0]), j
    matched = [value for value in rms if not math.isnan(value)]
    return Metre(rate=len(matched) / len(references) if references else math.nan,
                 rmse=float(np.mean(matched)) if matched else math.nan,
                 crmse=corrected_rmse(rms, matcher.stol), rms=tuple(rms), best=tuple(best))


def composition_key(structure: Structure) -> tuple[tuple[str, float], ...]:
    """The composition by element (oxidation states dropped) as fractions: equal exactly for the same elements
    in the same proportions, as OMatG's check on atomic numbers."""
    fractions = structure.composition.element_composition.fractional_composition.get_el_amt_dict()
    return tuple(sorted((element, round(fraction, 10)) for element, fraction in fractions.items()))
