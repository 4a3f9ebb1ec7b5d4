"""Scoring generated crystals against a reference set (docs/method.md#generation-metrics).

The protocol of CDVAE, which DiffCSP and the paper report:
- validity over every generated crystal: structural (no two atoms closer than 0.5 A, volume at least
  0.1 A^3), compositional (SMACT), and valid: both, and CrystalNN did not fail on the structure (a cell
  too extreme to hand to CrystalNN stays valid, without a fingerprint);
- coverage from fingerprints: the mean over sites of CrystalNN's "ops" site fingerprint (structure),
  and the Magpie element-property fingerprint of the composition, standardised with CDVAE's fixed
  statistics (protocol/cdvae_magpie_scaler.json), to which the cut-offs belong. COV-R is the
  fraction of reference crystals whose nearest generated structure fingerprint is within
  delta_s and nearest generated composition fingerprint within delta_c (the two nearest are
  taken separately, as CDVAE's code does); COV-P the same for generated crystals against the
  reference set, divided by all generated crystals (one without fingerprints is not covered);
- Wasserstein distances of density (g/cm^3) and number of distinct elements, valid generated
  crystals against every reference crystal.
The formation-energy distance needs a trained property model and is not computed.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance
from tqdm.auto import tqdm

from equicsp.evaluation.metrics import (
    MIN_VOLUME,
    CrystalArrays,
    composition_valid,
    parallel_map,
    structure_problem,
    time_limit,
    tractable_structure,
)

FINGERPRINT_TIMEOUT_S = 60.0  # CrystalNN on a strange sampled cell can take very long


@dataclass(frozen=True)
class CoverageThresholds:
    structure: float  # delta_s, on the CrystalNN fingerprint
    composition: float  # delta_c, on the standardised Magpie fingerprint


# CDVAE's cut-offs per dataset; the bundled sample and the smoke preset are Perov-5.
COVERAGE_THRESHOLDS = {"perov_5": CoverageThresholds(0.2, 4.0), "carbon_24": CoverageThresholds(0.2, 4.0),
                       "mp_20": CoverageThresholds(0.4, 10.0), "smoke": CoverageThresholds(0.2, 4.0)}


def thresholds_for(preset: str) -> CoverageThresholds:
    """The preset's cut-offs; MP-20's, the loosest, for a dataset the paper does not report."""
    return COVERAGE_THRESHOLDS.get(preset, COVERAGE_THRESHOLDS["mp_20"])


@dataclass
class CrystalProperties:
    """What the metrics need of one crystal; the fingerprints are None when they could not be computed."""

    index: int
    formula: str
    num_atoms: int
    num_elements: int
    density: float  # g/cm^3; nan without a structure
    struct_valid: bool
    comp_valid: bool
    problem: str  # "" when valid, else the first reason it is not
    fingerprint_problem: str  # "" when both fingerprints exist
    structure_fp: np.ndarray | None = field(default=None, repr=False)  # (61,)
    composition_fp: np.ndarray | None = field(default=None, repr=False)  # (132,)
    crystalnn_failed: bool = False  # CrystalNN raised or ran out of time on this structure

    @property
    def valid(self) -> bool:
        """As the published evaluation: structurally and compositionally valid, and CrystalNN did not fail on it."""
        return self.struct_valid and self.comp_valid and not self.crystalnn_failed

    def row(self) -> dict[str, object]:
        """A CSV row: everything but the fingerprints."""
        row = {k: v for k, v in asdict(self).items() if k not in ("structure_fp", "composition_fp")}
        row["valid"] = self.valid
        return row


@lru_cache(maxsize=1)
def _featurizers():
    from matminer.featurizers.composition.composite import ElementProperty
    from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

    return CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie")


def describe(job: tuple[int, CrystalArrays]) -> CrystalProperties:
    """Validity, density, element count and both fingerprints of one crystal (runs in a worker)."""
    from pymatgen.core import Composition, Element

    index, crystal = job
    types = crystal.atom_types
    composition = Composition({Element.from_Z(z): types.count(z) for z in set(types)})
    comp_valid = composition_valid(tuple(sorted(types)))
    result = CrystalProperties(index, composition.reduced_formula, len(types), len(set(types)), math.nan, False,
                               comp_valid, "" if comp_valid else "composition not SMACT-valid", "")
    structure_fp, fingerprint_problem = None, ""
    if not all(math.isfinite(v) for v in crystal.lengths + crystal.angles + sum(crystal.frac_coords, ())):
        structure_problem_, structure = "non-finite lattice or coordinates", None
    else:
        try:
            structure = crystal.to_structure()
            structure_problem_ = structure_problem(structure)
        except Exception as error:  # a degenerate lattice pymatgen cannot build
            structure, structure_problem_ = None, f"invalid lattice: {error}"
    result.struct_valid = not structure_problem_
    result.problem = result.problem or structure_problem_
    if structure is not None and math.isfinite(structure.volume) and structure.volume > 0:
        result.density = float(structure.density)
    if structure is None or structure.volume < MIN_VOLUME:
        fingerprint_problem = f"no structure fingerprint: {structure_problem_}"
    else:
        tractable, fingerprint_problem = tractable_structure(crystal)
        if tractable is not None:
            structure_fp, fingerprint_problem = _structure_fingerprint(tractable)
            result.crystalnn_failed = structure_fp is None
    result.fingerprint_problem = fingerprint_problem
    if structure_fp is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result.composition_fp = np.asarray(_featurizers()[1].featurize(composition), dtype=float)
        result.structure_fp = structure_fp
    return result


def _structure_fingerprint(structure) -> tuple[np.ndarray | None, str]:
    """(the mean CrystalNN site fingerprint, "") or (None, why it failed)."""
    site_featurizer = _featurizers()[0]
    try:
        with warnings.catch_warnings(), time_limit(FINGERPRINT_TIMEOUT_S):
            warnings.simplefilter("ignore")
            sites = [site_featurizer.featurize(structure, i) for i in range(len(structure))]
    except Exception as error:  # CrystalNN fails on some sampled structures; CDVAE drops them too
        return None, f"CrystalNN failed: {type(error).__name__}: {error}"
    return np.asarray(sites, dtype=float).mean(axis=0), ""


def _describe_chunk(jobs: list[tuple[int, CrystalArrays]]) -> list[CrystalProperties]:
    return [describe(job) for job in jobs]


def describe_all(crystals: list[CrystalArrays], processes: int | None = None, show_progress: bool = True,
                 desc: str = "fingerprints") -> list[CrystalProperties]:
    """describe() of every crystal in parallel: Ray tasks when Ray is running, else worker processes."""
    jobs = list(enumerate(crystals))
    _featurizers()  # import matminer once, before the workers fork
    try:
        import ray

        on_ray = ray.is_initialized()
    except ImportError:
        on_ray = False
    if not on_ray:
        return parallel_map(describe, jobs, processes, desc, show_progress)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    chunk = max(1, min(16, len(jobs) // (cpus * 8)))
    task = ray.remote(num_cpus=1)(_describe_chunk)
    pending = [task.remote(jobs[start:start + chunk]) for start in range(0, len(jobs), chunk)]
    results: list[CrystalProperties] = []
    with tqdm(total=len(jobs), desc=desc, unit="crystal", disable=not show_progress) as progress:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            part = ray.get(done[0])
            results.extend(part)
            progress.update(len(part))
    return sorted(results, key=lambda result: result.index)


@dataclass(frozen=True)
class CompositionScaler:
    """Standardisation of the Magpie fingerprints; NaN entries (elements Magpie lacks data for) become 0."""

    means: np.ndarray
    stds: np.ndarray

    @classmethod
    @lru_cache(maxsize=1)
    def published(cls) -> CompositionScaler:
        """CDVAE's fixed statistics, with which DiffCSP and EquiCSP score every dataset: the composition cut-offs
        (4, 10) are distances on this scale. Statistics of the reference set would give another scale (on Perov-5,
        test crystals against the others, composition recall at 4 fell from 0.62 to 0.28)."""
        stored = json.loads((Path(__file__).parent.parent / "protocol" / "cdvae_magpie_scaler.json").read_text())
        return cls(np.asarray(stored["means"], dtype=float), np.asarray(stored["stds"], dtype=float))

    def transform(self, fingerprints: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(fingerprints), 0.0, (fingerprints - self.means) / self.stds)


def coverage(structure_fps: np.ndarray, composition_fps: np.ndarray, ref_structure_fps: np.ndarray,
             ref_composition_fps: np.ndarray, thresholds: CoverageThresholds,
             num_generated: int | None = None) -> dict[str, float]:
    """COV-R, COV-P and the mean nearest distances (AMSD, AMCD) from fingerprints already standardised.

    (G, S), (G, C) generated, (R, S), (R, C) reference; num_generated (default G) is COV-P's
    denominator: every generated crystal, those without fingerprints included.
    """
    num_generated = len(structure_fps) if num_generated is None else num_generated
    if len(structure_fps) == 0 or len(ref_structure_fps) == 0:
        return {"cov_recall": 0.0, "cov_precision": 0.0, "amsd_recall": math.nan, "amsd_precision": math.nan,
                "amcd_recall": math.nan, "amcd_precision": math.nan}
    structure_d = cdist(structure_fps, ref_structure_fps)  # (G, R)
    composition_d = cdist(composition_fps, ref_composition_fps)
    recall_s, recall_c = structure_d.min(axis=0), composition_d.min(axis=0)  # (R,)
    precision_s, precision_c = structure_d.min(axis=1), composition_d.min(axis=1)  # (G,)
    recalled = (recall_s <= thresholds.structure) & (recall_c <= thresholds.composition)
    precise = (precision_s <= thresholds.structure) & (precision_c <= thresholds.composition)
    return {"cov_recall": float(recalled.mean()), "cov_precision": float(precise.sum() / max(num_generated, 1)),
            "amsd_recall": float(recall_s.mean()), "amsd_precision": float(precision_s.mean()),
            "amcd_recall": float(recall_c.mean()), "amcd_precision": float(precision_c.mean())}


def property_distances(generated: list[CrystalProperties], reference: list[CrystalProperties]) -> dict[str, float]:
    """Wasserstein distances of density and number of elements: valid generated vs every reference crystal."""
    valid = [c for c in generated if c.valid and math.isfinite(c.density)]
    ref = [c for c in reference if math.isfinite(c.density)]
    if not valid or not ref:
        return {"wdist_density": math.nan, "wdist_num_elems": math.nan}
    return {"wdist_density": float(wasserstein_distance([c.density for c in valid], [c.density for c in ref])),
            "wdist_num_elems": float(wasserstein_distance([c.num_elements for c in valid],
                                                          [c.num_elements for c in ref]))}


def validity_rates(generated: list[CrystalProperties]) -> dict[str, float]:
    count = max(len(generated), 1)
    return {"struct_valid": sum(c.struct_valid for c in generated) / count,
            "comp_valid": sum(c.comp_valid for c in generated) / count,
            "valid": sum(c.valid for c in generated) / count}


def _fingerprint_arrays(crystals: list[CrystalProperties]) -> tuple[np.ndarray, np.ndarray]:
    usable = [(structure, composition) for structure, composition in ((c.structure_fp, c.composition_fp) for c in crystals)
              if structure is not None and composition is not None]
    if not usable:
        return np.zeros((0, 61)), np.zeros((0, 132))
    return np.stack([structure for structure, _ in usable]), np.stack([composition for _, composition in usable])


def generation_metrics(generated: list[CrystalProperties], reference: list[CrystalProperties] | None,
                       thresholds: CoverageThresholds) -> dict[str, float]:
    """Validity rates, and with a reference set the coverage and Wasserstein distances."""
    metrics = {"num_generated": float(len(generated)), **validity_rates(generated)}
    metrics["fingerprint_failures"] = float(sum(c.structure_fp is None for c in generated))
    if not reference:
        return metrics
    structure_fps, composition_fps = _fingerprint_arrays(generated)
    ref_structure_fps, ref_composition_fps = _fingerprint_arrays(reference)
    scaler = CompositionScaler.published()
    composition_fps, ref_composition_fps = scaler.transform(composition_fps), scaler.transform(ref_composition_fps)
    metrics.update(coverage(structure_fps, composition_fps, ref_structure_fps, ref_composition_fps, thresholds,
                            num_generated=len(generated)))
    metrics.update(property_distances(generated, reference))
    metrics.update(num_reference=float(len(reference)),
                   reference_without_fingerprints=float(len(reference) - len(ref_structure_fps)))
    return metrics
