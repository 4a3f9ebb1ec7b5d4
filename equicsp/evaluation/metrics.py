"""The CSP evaluation protocol (docs/method.md#evaluation): validity, match rate, RMSE, best of k.

As the published evaluation (CDVAE's and DiffCSP's compute_metrics) does it: a prediction counts
only when it is valid (SMACT charge-neutral composition, no two atoms closer than 0.5 A, volume at
least 0.1 A^3) and pymatgen's StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3) finds an rms
distance; with one sample the ground truth must be valid too, with k samples (best of k) it need not.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import signal
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Element, Lattice, Structure
from smact import Element as SmactElement
from smact import metals, neutral_ratios
from tqdm.auto import tqdm

from equicsp.evaluation.matching import MATCHER_TOLERANCES, ReducedStructure, reduce_for_matching, rms_dist
from equicsp.evaluation.scores import corrected_rmse

MIN_DISTANCE = 0.5  # Angstrom
MIN_VOLUME = 0.1  # Angstrom^3
# Raised whenever a change to the scoring rules can change a score: evaluations logged under an earlier version
# are not reused (2: the published evaluation's SMACT test and cut-offs, best of k without the ground truth's validity;
# generation: CDVAE's Magpie statistics, CrystalNN failures invalid; 3: corrected RMSE and METRe added).
SCORE_VERSION = 3
# pymatgen's Niggli reduction can loop for minutes on an extreme sampled lattice.
MATCH_TIMEOUT_S = 20.0
MAX_CELL_LENGTH = 1000.0  # Angstrom
MAX_CELL_ELONGATION = 100.0
MAX_CELL_FLATNESS = 1000.0


class MatchTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise MatchTimeout after `seconds` of this process's CPU time (SIGPROF; a no-op off the main thread).

    CPU time rather than wall time: on a loaded machine a slow but legitimate match would otherwise
    time out, and the scores would depend on what else ran. The CPU time is the whole process's (all
    its threads), and the timer is one per process: these blocks do not nest.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise MatchTimeout(f"no answer within {seconds:g} s of CPU time")

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


@dataclass(frozen=True)
class CrystalArrays:
    """A crystal as plain arrays: cheap to send to a worker process."""

    atom_types: tuple[int, ...]
    frac_coords: tuple[tuple[float, float, float], ...]
    lengths: tuple[float, float, float]
    angles: tuple[float, float, float]

    @classmethod
    def of(cls, atom_types, frac_coords, lengths, angles) -> CrystalArrays:
        as_list = lambda values: np.asarray(values, dtype=float).tolist()  # noqa: E731
        return cls(tuple(int(z) for z in np.asarray(atom_types).tolist()),
                   tuple(tuple(row) for row in as_list(frac_coords)),
                   tuple(as_list(lengths)), tuple(as_list(angles)))

    def to_structure(self) -> Structure:
        # pymatgen takes atomic numbers as species; its annotation (CompositionLike) leaves int out.
        return Structure(Lattice.from_parameters(*self.lengths, *self.angles), list(self.atom_types),  # type: ignore[arg-type]
                         list(self.frac_coords), coords_are_cartesian=False)


def structure_of(crystal) -> Structure:
    """A pymatgen Structure of anything with atom_types, frac_coords, lengths and angles (e.g. a sampled crystal)."""
    return CrystalArrays.of(crystal.atom_types, crystal.frac_coords, crystal.lengths, crystal.angles).to_structure()


@dataclass
class CrystalResult:
    index: int
    formula: str
    num_atoms: int
    matched: bool
    rms: float  # nan when not matched
    best_sample: int  # -1 when not matched
    valid_samples: int
    num_samples: int
    reason: str  # "" when matched
    matcher_failures: int = 0  # valid samples StructureMatcher raised on or ran out of time with (counted not matched)
    leaked: bool | None = None  # a training crystal matches this test crystal (None: not checked)
    # METRe's best rms against every sample of this crystal's reduced composition (cross_matching.py); nan when
    # none matches, None when METRe was not computed
    metre_rms: float | None = None


# The published evaluation skips the search when the oxidation states make more combinations than this.
MAX_OXIDATION_COMBINATIONS = 10**7


@lru_cache(maxsize=65536)
def composition_valid(atom_types: tuple[int, ...]) -> bool:
    """The published evaluation's SMACT test (CDVAE's smact_validity, which DiffCSP and EquiCSP run, on SMACT 2.2):
    one element, or metals only, is valid; otherwise some combination of SMACT's 2014 oxidation states must be
    charge neutral at the reduced stoichiometry and pass the Pauling electronegativity test.

    Written on SMACT's pieces rather than calling today's smact_validity, which differs from that protocol where
    an element has no Pauling electronegativity (Pm, noble gases): SMACT 2.2 raised a TypeError comparing a cation
    with an anion and the protocol counted the test passed, where today's SMACT fails it. (Today's data also
    corrects Zr's electronegativity, 0.33 in SMACT 2.2, to 1.33, and Ir's lowest oxidation state, -2, to -3;
    the corrections are kept.)
    """
    counts = {z: atom_types.count(z) for z in sorted(set(atom_types))}  # by atomic number, as the protocol orders them
    symbols = [Element.from_Z(z).symbol for z in counts]
    if len(symbols) == 1 or all(symbol in metals for symbol in symbols):
        return True
    divisor = math.gcd(*counts.values())
    stoichs = [(count // divisor,) for count in counts.values()]
    elements = [SmactElement(symbol) for symbol in symbols]
    states = [element.oxidation_states_smact14 or [] for element in elements]
    if math.prod(len(options) for options in states) > MAX_OXIDATION_COMBINATIONS:
        return False
    electronegativities = [element.pauling_eneg for element in elements]
    threshold = max(stoich for (stoich,) in stoichs)
    return any(neutral_ratios(oxidations, stoichs=stoichs, threshold=threshold)
               and pauling_test_as_published(oxidations, electronegativities)
               for oxidations in itertools.product(*states))


def pauling_test_as_published(oxidations: tuple[int, ...], electronegativities: list[float | None]) -> bool:
    """SMACT 2.2's Pauling test, pair by pair in order: a cation must be less electronegative than an anion. A pair
    of a cation and an anion with an electronegativity missing passes the whole test (the TypeError the protocol
    caught); any other pair with one missing fails it."""
    for (ox1, en1), (ox2, en2) in itertools.combinations(zip(oxidations, electronegativities), 2):
        if (ox1 > 0 and ox2 < 0) or (ox1 < 0 and ox2 > 0):
            if en1 is None or en2 is None:
                return True
            if (ox1 > 0 and en1 >= en2) or (ox1 < 0 and en1 <= en2):
                return False
        elif en1 is None or en2 is None:
            return False
    return True


def structure_problem(structure) -> str:
    """"" for a structurally valid crystal, else why not."""
    if not math.isfinite(structure.volume) or structure.volume < MIN_VOLUME:
        return f"volume {structure.volume:.3g} A^3 < {MIN_VOLUME}"
    closest = closest_distance(structure)
    if closest < MIN_DISTANCE:
        return f"atoms {closest:.2f} A apart (< {MIN_DISTANCE})"
    return ""


def closest_distance(structure) -> float:
    """The shortest distance between two atoms (periodic images included); inf for a single atom."""
    if len(structure) < 2:
        return math.inf
    return float((structure.distance_matrix + np.eye(len(structure)) * 1e6).min())


def validity_problem(crystal: CrystalArrays) -> str:
    """"" when the crystal is valid (composition and structure), else the reason."""
    if not composition_valid(tuple(sorted(crystal.atom_types))):
        return "composition not SMACT-valid"
    return structural_problem(crystal)


def structural_problem(crystal: CrystalArrays) -> str:
    """"" when the crystal's lattice and coordinates are finite and structure_problem finds nothing, else why not."""
    if not all(math.isfinite(v) for v in crystal.lengths + crystal.angles):
        return "non-finite lattice"
    if not np.isfinite(crystal.frac_coords).all():
        return "non-finite coordinates"
    try:
        return structure_problem(crystal.to_structure())
    except Exception as error:  # a degenerate lattice pymatgen cannot build
        return f"invalid lattice: {error}"


def extreme_lattice_problem(crystal: CrystalArrays) -> str:
    """Why a valid crystal's cell is too degenerate to hand to StructureMatcher, or "".

    pymatgen's Niggli reduction can run for hours (inside numpy, where no signal interrupts it) on a very long or very
    flat sampled cell. Such a cell (over 1000 A, or a hundred times longer or a thousand times flatter than its atoms'
    spacing) is reported as not matched without asking the matcher.
    """
    a, b, c = crystal.lengths
    alpha, beta, gamma = np.radians(crystal.angles)
    cosines = np.cos([alpha, beta, gamma])
    volume = a * b * c * math.sqrt(max(1 - (cosines**2).sum() + 2 * cosines.prod(), 0.0))
    spacing = (volume / len(crystal.atom_types)) ** (1 / 3)
    if max(a, b, c) > MAX_CELL_LENGTH:
        return f"cell length {max(a, b, c):.3g} A > {MAX_CELL_LENGTH} A"
    if max(a, b, c) > MAX_CELL_ELONGATION * spacing:
        return f"cell length {max(a, b, c):.3g} A > {MAX_CELL_ELONGATION} x atomic spacing {spacing:.3g} A"
    if a * b * c > MAX_CELL_FLATNESS * volume:
        return f"cell flatter than abc / V = {MAX_CELL_FLATNESS}"
    return ""


def tractable_structure(crystal: CrystalArrays) -> tuple[Structure | None, str]:
    """The crystal as a Structure safe to hand to StructureMatcher or CrystalNN, or None and why not
    (extreme_lattice_problem).

    A cell that looks extreme may be a skewed basis of an ordinary lattice, which the matcher would reduce and
    match: such a cell is judged, and used, by its LLL-reduced basis (the same lattice and structure).
    """
    problem = extreme_lattice_problem(crystal)
    if not problem:
        return crystal.to_structure(), ""
    try:
        with time_limit(MATCH_TIMEOUT_S):
            reduced = crystal.to_structure().get_reduced_structure("LLL")
    except Exception:
        return None, problem
    lattice = reduced.lattice
    reduced_crystal = CrystalArrays.of(crystal.atom_types, reduced.frac_coords, lattice.abc, lattice.angles)
    if extreme_lattice_problem(reduced_crystal):
        return None, problem
    return reduced, ""


def match_one(job: tuple[int, CrystalArrays, list[CrystalArrays]]) -> CrystalResult:
    """Best-of-k match of the predictions for one ground truth.

    As the published evaluation: with one sample the ground truth must be valid (its RecEval), with several it
    need not be (its RecEvalBatch checks only the predictions).
    """
    index, truth, predictions = job
    formula = _formula(truth.atom_types) if truth.atom_types else ""
    result = CrystalResult(index=index, formula=formula, num_atoms=len(truth.atom_types), matched=False, rms=math.nan,
                           best_sample=-1, valid_samples=0, num_samples=len(predictions), reason="")
    problem = validity_problem(truth) if len(predictions) <= 1 else ""
    if problem:
        result.reason = f"ground truth invalid: {problem}"
        return result
    if not predictions:
        result.reason = "no sample"
        return result
    matcher = StructureMatcher(**MATCHER_TOLERANCES)
    try:
        truth_structure = truth.to_structure()
    except Exception as error:
        result.reason = f"ground truth invalid: invalid lattice: {error}"
        return result
    target: list[ReducedStructure] = []  # the ground truth reduced once, at its first tractable sample
    reasons = []
    for sample, prediction in enumerate(predictions):
        problem = validity_problem(prediction)
        if problem:
            reasons.append(problem)
            continue
        result.valid_samples += 1
        structure, extreme = tractable_structure(prediction)
        if structure is None:
            reasons.append(f"not matched: {extreme}")
            continue
        try:
            with warnings.catch_warnings(), time_limit(MATCH_TIMEOUT_S):
                warnings.simplefilter("ignore")
                rms = guarded_rms(matcher, structure, truth_structure, target)
        except Exception as error:  # e.g. Niggli reduction of an extreme sampled lattice
            reasons.append(f"matcher failed: {type(error).__name__}: {error}")
            result.matcher_failures += 1
            continue
        if rms is not None and (not result.matched or rms[0] < result.rms):
            result.matched, result.rms, result.best_sample = True, float(rms[0]), sample
    if not result.matched:
        if not result.valid_samples:
            result.reason = f"no valid sample: {reasons[0]}"
        else:
            failed = f"; the matcher failed on {result.matcher_failures} of them" if result.matcher_failures else ""
            result.reason = "no match within tolerance" + (f" ({reasons[-1]}{failed})" if reasons else "")
    return result


def guarded_rms(matcher: StructureMatcher, structure: Structure, truth: Structure,
                target: list[ReducedStructure]) -> tuple[float, float] | None:
    """matcher.get_rms_dist(structure, truth), the same answer, with truth reduced only when target holds none yet.

    Called inside the caller's time limit: a reduction that raises leaves target empty, so the next sample tries
    again, as get_rms_dist would.
    """
    if not target:
        target.append(reduce_for_matching(matcher, truth))
    return rms_dist(matcher, reduce_for_matching(matcher, structure), target[0])


def _formula(atom_types: tuple[int, ...]) -> str:
    return Composition({Element.from_Z(z): atom_types.count(z) for z in set(atom_types)}).reduced_formula


@dataclass
class MatchSummary:
    match_rate: float
    rmse: float  # nan when nothing matched
    num_crystals: int
    num_matched: int
    num_samples: int
    valid_rate: float  # fraction of predictions that are valid
    matcher_failures: int = 0  # valid predictions the matcher raised on or ran out of time with
    crmse: float = math.nan  # corrected RMSE: a crystal without a match counts as stol (docs/method.md#corrected-rmse)
    metre: float = math.nan  # METRe's match rate (docs/method.md#metre); nan when METRe was not computed
    metre_rmse: float = math.nan
    metre_crmse: float = math.nan

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarise(results: list[CrystalResult]) -> MatchSummary:
    matched = [r.rms for r in results if r.matched]
    total_samples = sum(r.num_samples for r in results)
    valid = sum(r.valid_samples for r in results)
    stol = MATCHER_TOLERANCES["stol"]
    return MatchSummary(match_rate=len(matched) / max(len(results), 1),
                        rmse=float(np.mean(matched)) if matched else math.nan,
                        num_crystals=len(results), num_matched=len(matched),
                        num_samples=max((r.num_samples for r in results), default=0),
                        valid_rate=valid / total_samples if total_samples else 0.0,
                        matcher_failures=sum(r.matcher_failures for r in results),
                        crmse=corrected_rmse([r.rms if r.matched else None for r in results], stol),
                        **metre_scores(results, stol))


def metre_scores(results: list[CrystalResult], stol: float) -> dict[str, float]:
    """METRe's rate, RMSE and corrected RMSE over every row; all nan when METRe was not computed."""
    if all(r.metre_rms is None for r in results):
        return {}
    rms = [math.nan if r.metre_rms is None else r.metre_rms for r in results]
    matched = [value for value in rms if not math.isnan(value)]
    return dict(metre=len(matched) / len(results), metre_rmse=float(np.mean(matched)) if matched else math.nan,
                metre_crmse=corrected_rmse(rms, stol))


def evaluate_matches(truths: list[CrystalArrays], predictions: list[list[CrystalArrays]],
                     processes: int | None = None, indices: list[int] | None = None,
                     show_progress: bool = True) -> list[CrystalResult]:
    """Match every ground truth against its k predictions, in parallel worker processes."""
    if len(truths) != len(predictions):
        raise ValueError(f"{len(truths)} ground truths but {len(predictions)} prediction lists")
    indices = list(range(len(truths))) if indices is None else indices
    jobs = list(zip(indices, truths, predictions))
    return parallel_map(match_one, jobs, processes, "matching", show_progress)


def matching_chunk_size(jobs: int, workers: int) -> int:
    """Jobs per task: small, since StructureMatcher's time varies a lot between crystals."""
    return max(1, min(8, jobs // (workers * 16)))


def parallel_map(function, jobs: list, processes: int | None = None, desc: str = "matching",
                 show_progress: bool = True) -> list:
    """[function(job) for job in jobs] in worker processes (forked with pymatgen already imported)."""
    processes = processes or os.cpu_count() or 1
    progress = dict(total=len(jobs), desc=desc, unit="crystal", disable=not show_progress)
    if processes <= 1 or len(jobs) < 2:
        return [function(job) for job in tqdm(jobs, **progress)]
    with ProcessPoolExecutor(processes) as pool:
        return list(tqdm(pool.map(function, jobs, chunksize=matching_chunk_size(len(jobs), processes)), **progress))


def write_results_csv(results: list[CrystalResult], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0]).keys()) if results else ["index"])
        writer.writeheader()
        for result in results:
            writer.writerow(asdict(result))
