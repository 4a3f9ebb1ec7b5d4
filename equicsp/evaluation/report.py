"""An evaluation's files: the per-crystal CSV, the predicted CIFs, the summary, the data report and the figure."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path

from pymatgen.io.cif import CifWriter

from equicsp.data.crystals import CrystalDataset
from equicsp.engine.sampler import SampledCrystal
from equicsp.evaluation.csp import Evaluation
from equicsp.evaluation.metrics import structure_of, write_results_csv
from equicsp.evaluation.plots import evaluation_figure


def write_predictions(predictions: list[SampledCrystal], formulas: dict[int, str], path: Path) -> Path:
    """Every predicted structure as a CIF, in one zip archive (INDEX_FORMULA_SAMPLE.cif)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for crystal in sorted(predictions, key=lambda c: (c.composition_index, c.sample_index)):
            name = f"{crystal.composition_index:06d}_{formulas.get(crystal.composition_index, 'x')}_" \
                   f"{crystal.sample_index}.cif"
            part = crystal.non_finite_part()
            try:
                text = f"# not writable as a structure: non-finite {part}\n" if part else str(CifWriter(structure_of(crystal)))
            except Exception as error:  # a sampled lattice pymatgen cannot build
                text = f"# not writable as a structure: {error}\n"
            archive.writestr(name, text)
    return path


def write_report(evaluation: Evaluation, dataset: CrystalDataset, out: Path) -> dict[str, Path]:
    """The per-crystal CSV, the CIF archive, the summary, the data report and the figure, in out/."""
    out.mkdir(parents=True, exist_ok=True)
    formulas = {r.index: r.formula for r in evaluation.per_crystal if r.index >= 0}
    files = {"per_crystal": out / "per_crystal.csv", "predictions": out / "predictions.zip",
             "summary": out / "summary.json", "data_report": out / "data_report.json",
             "figure": out / "evaluation.png"}
    write_results_csv(evaluation.per_crystal, files["per_crystal"])
    write_predictions(evaluation.predictions, formulas, files["predictions"])
    files["summary"].write_text(json.dumps(summary_record(evaluation), indent=1))
    files["data_report"].write_text(dataset.report.to_json())
    evaluation_figure(evaluation.per_crystal, files["figure"])
    return files


def summary_record(evaluation: Evaluation) -> dict[str, float]:
    """The metrics logged for an evaluation (rmse left out when nothing matched)."""
    summary = evaluation.summary
    total_s = evaluation.startup_s + evaluation.sampling_s + evaluation.matching_s
    record = {**asdict(summary), "startup_s": evaluation.startup_s, "sampling_s": evaluation.sampling_s,
              "matching_s": evaluation.matching_s, "total_s": total_s,
              "crystals_per_s": summary.num_crystals / total_s if total_s else 0.0}
    if evaluation.leakage is not None:
        record.update(asdict(evaluation.leakage))
    return {key: float(value) for key, value in record.items() if not math.isnan(value)}


def copy_report(files: dict[str, Path], out: Path, run_id: str | None = None) -> dict[str, Path]:
    """The report's files copied into out; an error that says where the evaluation is kept when it fails."""
    copied = {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, path in files.items():
            copied[name] = Path(shutil.copy(path, out / path.name))
    except OSError as error:
        logged = f" (the evaluation is logged as MLflow run {run_id})" if run_id else ""
        raise OSError(f"cannot write the report to {out}: {error.strerror or error}{logged}") from None
    return copied
