"""METRe in the evaluation (docs/method.md#metre): each test crystal matched against the samples drawn for the
other test crystals of its reduced composition, with the one-to-one matching's guards, in the same parallel jobs.

scores.metre is the definition: every test crystal against every generated crystal of its reduced composition.
In CSP the samples drawn for a test crystal have its composition, so those are the samples of the test crystals
of its reduced composition, and its own samples were matched already (metrics.match_one). What is left are the
cross pairs. They are cut into tiles, a block of test crystals against a block of the others' samples, which
the matching workers run beside the one-to-one jobs; a tile reduces each of its structures once. A crystal's
METRe rms is the smaller of its own best (match_one's) and its tiles' bests: the number scores.metre gives.

The guards are match_one's: a sample counts only when valid (metrics.validity_problem) and tractable
(metrics.tractable_structure), each reduction and each pair has MATCH_TIMEOUT_S of CPU time, a pair the matcher
fails on is no match, and with one sample per crystal the test crystal must be valid.

The cross pairs grow with the square of the crystals sharing a composition (on Carbon-24 every test crystal
meets every sample): past a limit METRe is left out, and the evaluation says so.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pymatgen.analysis.structure_matcher import StructureMatcher

from equicsp.data.cells import reduced_composition
from equicsp.evaluation.matching import MATCHER_TOLERANCES, ReducedStructure, reduce_for_matching, rms_dist
from equicsp.evaluation.metrics import (
    MATCH_TIMEOUT_S,
    CrystalArrays,
    CrystalResult,
    match_one,
    time_limit,
    tractable_structure,
    validity_problem,
)

OneToOneJob = tuple[int, CrystalArrays, list[CrystalArrays]]  # csp.MatchJob: (dataset index, truth, its samples)
REFERENCES_PER_TILE = 16
SAMPLES_PER_TILE = 64
METRE_PAIRS = 10**6  # the default limit on METRe's cross pairs (EvaluationSettings.metre_pairs)


@dataclass(frozen=True)
class Reference:
    index: int  # in the dataset
    truth: CrystalArrays
    must_be_valid: bool  # one sample per crystal: the published protocol asks the ground truth to be valid


@dataclass(frozen=True)
class MetreTile:
    """Test crystals of one reduced composition against the samples drawn for crystals of the same composition."""

    references: tuple[Reference, ...]
    candidates: tuple[tuple[int, CrystalArrays], ...]  # (dataset index of the crystal it was drawn for, sample)


def cross_pairs(jobs: list[OneToOneJob]) -> int:
    """How many (test crystal, another crystal's sample) pairs of one reduced composition METRe adds."""
    samples: dict[tuple, list[int]] = defaultdict(list)
    for _, truth, predictions in jobs:
        samples[reduced_composition(truth.atom_types)].append(len(predictions))
    return sum((len(group) - 1) * sum(group) for group in samples.values())


def metre_tiles(jobs: list[OneToOneJob]) -> list[MetreTile]:
    """The cross pairs of every reduced composition shared by two or more test crystals, cut into tiles."""
    groups: dict[tuple, list[OneToOneJob]] = defaultdict(list)
    for job in jobs:
        groups[reduced_composition(job[1].atom_types)].append(job)
    tiles = []
    for group in groups.values():
        if len(group) < 2:
            continue
        owners_per_tile = max(1, SAMPLES_PER_TILE // max(1, max(len(job[2]) for job in group)))
        for start in range(0, len(group), REFERENCES_PER_TILE):
            references = tuple(Reference(index=index, truth=truth, must_be_valid=len(predictions) <= 1)
                               for index, truth, predictions in group[start:start + REFERENCES_PER_TILE])
            for first in range(0, len(group), owners_per_tile):
                candidates = tuple((index, sample) for index, _, predictions in group[first:first + owners_per_tile]
                                   for sample in predictions)
                if any(owner != reference.index for reference in references for owner, _ in candidates):
                    tiles.append(MetreTile(references=references, candidates=candidates))
    return tiles


def match_tile(tile: MetreTile) -> list[tuple[int, float]]:
    """(dataset index, best rms over the tile's samples of other crystals, nan when none matches) per reference."""
    matcher = StructureMatcher(**MATCHER_TOLERANCES)
    samples = [(owner, _reduced_sample(matcher, sample)) for owner, sample in tile.candidates]
    return [(reference.index, _best_rms(matcher, reference, samples)) for reference in tile.references]


def _guarded(work: Callable[..., Any], *args: object) -> Any:
    """work(*args) within the matching time limit, warnings silenced; None when it raises."""
    try:
        with warnings.catch_warnings(), time_limit(MATCH_TIMEOUT_S):
            warnings.simplefilter("ignore")
            return work(*args)
    except Exception:  # e.g. Niggli reduction of an extreme lattice, or the time limit: no match, as in match_one
        return None


def _reduced_sample(matcher: StructureMatcher, sample: CrystalArrays) -> ReducedStructure | None:
    """A sample as the matcher compares it, or None when it is invalid, intractable or cannot be reduced."""
    if validity_problem(sample):
        return None
    structure, _ = tractable_structure(sample)
    return None if structure is None else _guarded(reduce_for_matching, matcher, structure)


def _best_rms(matcher: StructureMatcher, reference: Reference,
              samples: list[tuple[int, ReducedStructure | None]]) -> float:
    others = [sample for owner, sample in samples if owner != reference.index and sample is not None]
    if not others or (reference.must_be_valid and validity_problem(reference.truth)):
        return math.nan
    target = _guarded(lambda: reduce_for_matching(matcher, reference.truth.to_structure()))
    if target is None:
        return math.nan
    found = [_guarded(rms_dist, matcher, sample, target) for sample in others]
    return min((answer[0] for answer in found if answer is not None), default=math.nan)


def match_work(job: OneToOneJob | MetreTile) -> CrystalResult | list[tuple[int, float]]:
    """One job of either kind: what a matching process or Ray task runs."""
    return match_tile(job) if isinstance(job, MetreTile) else match_one(job)


@dataclass(frozen=True)
class MatchingWork:
    """The one-to-one jobs followed by METRe's tiles (when METRe is computed), run by one parallel map."""

    jobs: list  # OneToOneJob, then MetreTile
    num_crystals: int  # the one-to-one jobs at the front of jobs
    metre: bool

    def results(self, outputs: list) -> list[CrystalResult]:
        """The per-crystal results (in job order) of outputs[i] = match_work(jobs[i]), with METRe's rms when computed."""
        results, tiles = outputs[:self.num_crystals], outputs[self.num_crystals:]
        return with_metre(results, tiles) if self.metre else results


def matching_work(jobs: list[OneToOneJob], metre_pairs: int = METRE_PAIRS) -> MatchingWork:
    """The matching of jobs, METRe included when its cross pairs number at most metre_pairs (0: never)."""
    pairs = cross_pairs(jobs)
    metre = metre_pairs > 0 and pairs <= metre_pairs
    if metre_pairs and not metre:
        print(f"equicsp: METRe left out: it would match {pairs} pairs of test crystals sharing a reduced composition "
              f"with each other's samples, over the limit of {metre_pairs} (--metre-pairs)", file=sys.stderr)
    return MatchingWork(jobs=list(jobs) + (metre_tiles(jobs) if metre else []), num_crystals=len(jobs), metre=metre)


def with_metre(results: list[CrystalResult], tiles: list[list[tuple[int, float]]]) -> list[CrystalResult]:
    """Each result with METRe's rms: its own best, or a better one from a tile."""
    best = {result.index: result.rms if result.matched else math.nan for result in results}
    for part in tiles:
        for index, rms in part:
            if not math.isnan(rms) and (math.isnan(best[index]) or rms < best[index]):
                best[index] = rms
    return [replace(result, metre_rms=best[result.index]) for result in results]
