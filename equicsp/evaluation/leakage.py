"""Leakage-aware scores: which test crystals a training crystal already answers.

Random splits of Perov-5 or MP-20 put duplicates and polymorph twins of training crystals
in the test set, so part of a CSP match rate is recall. A test crystal counts as leaked when
a training crystal of the same reduced composition matches it under the benchmark's
StructureMatcher settings. The answer depends on the two sets' contents only, so it is
cached under the cache directory and computed once per (train, test) pair. This goes
beyond the published protocol: the usual match rate and RMSE are reported unchanged beside it.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher

from equicsp.data.cache import cache_dir, cache_key, store_cached_text
from equicsp.data.cells import reduced_composition
from equicsp.data.crystals import CrystalDataset
from equicsp.evaluation.matching import MATCHER_TOLERANCES
from equicsp.evaluation.metrics import MATCH_TIMEOUT_S, CrystalArrays, CrystalResult, parallel_map, time_limit

LEAKAGE_VERSION = 2  # 2: a match is get_rms_dist's answer, as in the CSP score (1 asked fit, which is stricter)

LeakJob = tuple[CrystalArrays, list[CrystalArrays]]  # (test crystal, training crystals of its reduced composition)


def crystal_arrays(dataset: CrystalDataset, index: int) -> CrystalArrays:
    item = dataset[index]
    return CrystalArrays.of(item.atom_types, item.frac_coords, item.lengths[0], item.angles[0])


def is_leaked(job: LeakJob) -> bool:
    """Whether any of the candidate training crystals matches the test crystal."""
    test, candidates = job
    if not candidates:
        return False
    matcher = StructureMatcher(**MATCHER_TOLERANCES)
    structure = test.to_structure()
    for candidate in candidates:
        try:
            with warnings.catch_warnings(), time_limit(MATCH_TIMEOUT_S):
                warnings.simplefilter("ignore")
                if matcher.get_rms_dist(structure, candidate.to_structure()) is not None:
                    return True
        except Exception:  # a pair the matcher cannot handle in time is not counted as leaked
            continue
    return False


def leaked_test_crystals(train: CrystalDataset, test: CrystalDataset, processes: int | None = None,
                         show_progress: bool = True) -> list[bool]:
    """One flag per test crystal (dataset order): a training crystal of its reduced composition matches it."""
    key = cache_key(LEAKAGE_VERSION, train.content_key(), test.content_key(), MATCHER_TOLERANCES)
    path = cache_dir() / "leakage" / f"{key}.json"
    if path.exists():
        try:
            flags = json.loads(path.read_text())
            if isinstance(flags, list) and len(flags) == len(test):
                return [bool(flag) for flag in flags]
        except ValueError:
            pass  # unreadable: computed again and rewritten below
    by_composition: dict[tuple, list[int]] = {}
    for index in range(len(train)):
        composition = reduced_composition(train[index].atom_types.tolist())
        by_composition.setdefault(composition, []).append(index)
    jobs = []
    for index in range(len(test)):
        candidates = by_composition.get(reduced_composition(test[index].atom_types.tolist()), [])
        jobs.append((crystal_arrays(test, index), [crystal_arrays(train, i) for i in candidates]))
    flags = parallel_map(is_leaked, jobs, processes, "leakage", show_progress)
    store_cached_text(json.dumps(flags), path)
    return flags


@dataclass
class LeakageSummary:
    leaked_fraction: float  # of the evaluated test crystals that could be read
    unleaked_match_rate: float
    unleaked_rmse: float  # nan when no unleaked crystal matched
    num_unleaked: int


def summarise_leakage(results: list[CrystalResult], leaked: list[bool]) -> LeakageSummary:
    """Match rate and RMSE over the crystals no training crystal answers.

    results are per test crystal with `index` its dataset position; rows of the test file that
    could not be read (index -1) cannot be checked and count as unleaked, as they count as
    not matched in the usual score.
    """
    unleaked = [r for r in results if r.index < 0 or not leaked[r.index]]
    rms = [r.rms for r in unleaked if r.matched]
    checked = [leaked[r.index] for r in results if r.index >= 0]  # the evaluated crystals only (--limit)
    return LeakageSummary(leaked_fraction=sum(checked) / max(len(checked), 1),
                          unleaked_match_rate=len(rms) / len(unleaked) if unleaked else math.nan,
                          unleaked_rmse=float(np.mean(rms)) if rms else math.nan,
                          num_unleaked=len(unleaked))
