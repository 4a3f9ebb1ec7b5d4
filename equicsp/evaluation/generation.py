"""Ab initio generation (docs/method.md#generation): crystals from nothing, written and scored.

A sample's atom count is drawn from the training set's distribution (stored in the
checkpoint), then its types, coordinates and lattice are sampled together. Sample i's
draws depend on (seed, i) only, so the crystals do not depend on the batch size or device.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from equicsp.config import Config
from equicsp.engine.sampler import SampledCrystal, Sampler
from equicsp.evaluation.generation_metrics import (
    CoverageThresholds,
    CrystalProperties,
    describe_all,
    generation_metrics,
    thresholds_for,
)
from equicsp.evaluation.metrics import CrystalArrays
from equicsp.evaluation.plots import generation_histograms
from equicsp.model.diffusion import Diffusion
from equicsp.model.noise import sample_keys
from equicsp.model.num_atoms import draw_atom_counts
from equicsp.task import task_of

GENERATION_COMPOSITION_INDEX = -1  # the key's composition part: no composition is given


class GenerationError(ValueError):
    pass


def num_atoms_distribution(checkpoint: dict[str, Any]) -> list[int]:
    """The training set's atom-count histogram stored in a generation checkpoint."""
    histogram = checkpoint.get("num_atoms_distribution")
    if not histogram:
        raise GenerationError("the checkpoint has no num_atoms_distribution: it is not a generation model "
                              "(train with --diffusion.task generation)")
    return [int(count) for count in histogram]


def generate(model: nn.Module, config: Config, histogram: list[int], num: int, seed: int = 0,
             device: torch.device | str = "cpu", precision: str = "fp32", batch_size: int | None = None,
             diffusion: Diffusion | None = None, show_progress: bool = True) -> list[SampledCrystal]:
    """num crystals, in batches of batch_size (default sampler.batch_size); crystal i is keyed by (seed, i)."""
    if not task_of(config).diffuses_types:
        raise GenerationError("this model predicts structures for given compositions (diffusion.task = csp)")
    if num < 1:
        raise GenerationError(f"the number of crystals must be >= 1, not {num}")
    diffusion = diffusion or Diffusion(config, device)
    sampler = Sampler(model, diffusion, config, device, precision)
    batch_size = batch_size or config.sampler.batch_size
    indices = torch.arange(num)
    counts = draw_atom_counts(histogram, indices, seed)
    keys = sample_keys(torch.full((num,), GENERATION_COMPOSITION_INDEX), indices)
    crystals: list[SampledCrystal] = []
    starts = range(0, num, batch_size)
    with tqdm(total=sampler.num_steps() * len(starts), desc="generating", unit="step",
              disable=not show_progress) as progress:
        for start in starts:
            stop = min(start + batch_size, num)
            types, x, lattice = sampler.generate_batch(counts[start:stop], keys[start:stop], seed, progress)
            lengths, angles = sampler.lattice.decode(lattice.float().cpu())
            sizes = counts[start:stop].tolist()
            crystals += [SampledCrystal(composition_index=GENERATION_COMPOSITION_INDEX, sample_index=start + offset,
                                        atom_types=atom_types, frac_coords=coords, lengths=length, angles=angle)
                         for offset, (atom_types, coords, length, angle)
                         in enumerate(zip(types.cpu().split(sizes), x.cpu().split(sizes), lengths, angles))]
    return crystals


def as_arrays(crystal: SampledCrystal) -> CrystalArrays:
    return CrystalArrays.of(crystal.atom_types, crystal.frac_coords, crystal.lengths, crystal.angles)


@dataclass
class GenerationReport:
    metrics: dict[str, float]
    generated: list[CrystalProperties]
    reference: list[CrystalProperties] | None
    thresholds: CoverageThresholds


def score_generated(crystals: list[SampledCrystal], reference: list[CrystalArrays] | None, preset: str,
                    thresholds: CoverageThresholds | None = None, processes: int | None = None,
                    show_progress: bool = True) -> GenerationReport:
    """Validity of every crystal, and with a reference set (the test split) coverage and Wasserstein distances."""
    thresholds = thresholds or thresholds_for(preset)
    generated = describe_all([as_arrays(c) for c in crystals], processes, show_progress, "generated")
    described = describe_all(reference, processes, show_progress, "reference") if reference else None
    return GenerationReport(generation_metrics(generated, described, thresholds), generated, described, thresholds)


def write_generated(crystals: list[SampledCrystal], report: GenerationReport | None, out: Path,
                    settings: dict[str, Any]) -> dict[str, Path]:
    """CIFs (one per crystal with a finite, buildable cell), samples.csv, summary.json and, with a reference, a figure."""
    out = Path(out)
    cif_dir = out / "cifs"
    cif_dir.mkdir(parents=True, exist_ok=True)
    properties = {p.index: p for p in report.generated} if report else {}
    rows = []
    for position, crystal in enumerate(crystals):
        name, problem = _write_cif(crystal, cif_dir)
        row = {"sample": crystal.sample_index, "num_atoms": int(crystal.atom_types.shape[0]), "cif": name,
               "cif_problem": problem}
        if position in properties:
            row.update({k: v for k, v in properties[position].row().items() if k not in ("index", "num_atoms")})
        rows.append(row)
    files = {"cifs": cif_dir, "samples": out / "samples.csv", "summary": out / "summary.json"}
    with open(files["samples"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["sample"])
        writer.writeheader()
        writer.writerows(rows)
    summary = {"settings": settings, "num_crystals": len(crystals), "cifs_written": sum(bool(r["cif"]) for r in rows)}
    if report:
        summary.update(metrics=report.metrics, thresholds={"structure": report.thresholds.structure,
                                                            "composition": report.thresholds.composition})
        if report.reference:
            files["figure"] = generation_histograms(report.generated, report.reference, out / "generation.png")
    files["summary"].write_text(json.dumps(summary, indent=2, default=_json_number) + "\n")
    return files


def _json_number(value: object) -> str | None:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _write_cif(crystal: SampledCrystal, folder: Path) -> tuple[str, str]:
    """(file name, "") or ("", why no CIF): never a CIF of a non-finite crystal."""
    values = torch.cat([crystal.frac_coords.flatten(), crystal.lengths.flatten(), crystal.angles.flatten()])
    if not torch.isfinite(values).all():
        return "", "non-finite lattice or coordinates"
    name = f"sample_{crystal.sample_index:06d}.cif"
    try:
        as_arrays(crystal).to_structure().to(filename=str(folder / name))
    except Exception as error:  # a degenerate lattice pymatgen cannot build
        return "", f"invalid lattice: {error}"
    return name, ""
