"""An evaluation's files: the per-crystal CSV, the predicted CIFs, the summary, the data report and the figure."""

from __future__ import annotations

import csv
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, cast

from pymatgen.io.cif import CifWriter

from equicsp.config import ARMS, ObjectiveConfig
from equicsp.data.crystals import CrystalDataset
from equicsp.engine.sampler import SampledCrystal
from equicsp.evaluation.csp import Evaluation
from equicsp.evaluation.metrics import CrystalResult, structure_of, write_results_csv
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


def write_report(evaluation: Evaluation, dataset: CrystalDataset, out: Path, model: str = "") -> dict[str, Path]:
    """The per-crystal CSV, the CIF archive, the summary, the data report and the figure, in out/; model names
    the model in the figure's title ("run 26104baf", "checkpoint runs/a/last.pt")."""
    out.mkdir(parents=True, exist_ok=True)
    formulas = {r.index: r.formula for r in evaluation.per_crystal if r.index >= 0}
    files = {"per_crystal": out / "per_crystal.csv", "predictions": out / "predictions.zip",
             "summary": out / "summary.json", "data_report": out / "data_report.json",
             "figure": out / "evaluation.png"}
    write_results_csv(evaluation.per_crystal, files["per_crystal"])
    write_predictions(evaluation.predictions, formulas, files["predictions"])
    files["summary"].write_text(json.dumps(summary_record(evaluation), indent=1))
    files["data_report"].write_text(dataset.report.to_json())
    evaluation_figure(evaluation.per_crystal, files["figure"], figure_title(evaluation, model))
    return files


def figure_title(evaluation: Evaluation, model: str = "") -> str:
    """Which arm (the row of Table 2 whose switches the sampling config has), which model, k and the step size."""
    arm = next((arm.label for arm in ARMS.values() if _switches(arm.objective) == _switches(evaluation.config.objective)),
               "custom objective")
    return " · ".join(part for part in (arm, model, f"best of k = {evaluation.summary.num_samples}",
                                        f"step_lr {evaluation.config.sampler.step_lr:g}") if part)


def _switches(objective: ObjectiveConfig) -> dict[str, object]:
    """An objective's switches: its loss weights left out (a sweep may search them), but for a weight of 0, which
    drops a loss term (the none and DiffCSP arms)."""
    return {name: value for name, value in asdict(objective).items() if not name.endswith("_weight") or value == 0}


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


# How each type of CrystalResult's fields is read back from per_crystal.csv ("" is None where None is allowed).
# Any: what a reader returns is the type its key names.
_READERS: dict[str, Callable[[str], Any]] = {
    "int": int, "str": str, "float": float, "bool": lambda text: text == "True",
    "bool | None": lambda text: None if text == "" else text == "True",
    "float | None": lambda text: None if text == "" else float(text)}


def read_results_csv(path: str | Path) -> list[CrystalResult]:
    """per_crystal.csv (write_results_csv) read back, in its order: the per-crystal results of a logged evaluation."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    # metrics.py has `from __future__ import annotations`: each field's type is the text of its annotation.
    known = {field.name: _READERS[cast(str, field.type)] for field in fields(CrystalResult)}
    return [CrystalResult(**{name: known[name](text) for name, text in row.items() if name in known}) for row in rows]
