"""The sweep's report: the ablation table (Markdown and CSV), per-cell CSV, bar chart and learning curves."""

from __future__ import annotations

import csv
import math
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from equicsp.config import ARMS
from equicsp.evaluation.plots import ablation_bars, arm_learning_curves, generation_bars
from equicsp.platform import tracking
from equicsp.sweep.final import CellResult
from equicsp.sweep.intervals import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, REFERENCE_ARM, arm_intervals, interval_columns
from equicsp.sweep.spec import SweepSpec
from equicsp.task import task_of


def generates(spec: SweepSpec) -> bool:
    """A generation sweep's table scores generated crystals; a CSP sweep's, predicted structures."""
    return task_of(spec.task).diffuses_types


def _mean_spread(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def ablation_table(cells: list[CellResult], spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per arm: test match rate and RMSE as mean and standard deviation over seeds, with their bootstrap
    intervals and the arm's difference from EquiCSP (sweep/intervals.py), and the corrected RMSE and METRe."""
    if generates(spec):
        return generation_table(cells, spec)
    rows = []
    for arm in spec.arms:
        mine = [cell for cell in cells if cell.arm == arm]
        if not mine:
            continue
        match_mean, match_std = _mean_spread([100 * cell.test_match_rate for cell in mine])
        rmse_mean, rmse_std = _mean_spread([cell.test_rmse for cell in mine])
        owner = mine[0].model_of or arm
        rows.append({"arm": arm, "variant": ARMS[arm].label, "seeds": len(mine),
                     "model": "own" if owner == arm else f"shares {ARMS[owner].label}'s",
                     "match_rate_mean": match_mean, "match_rate_std": match_std,
                     "rmse_mean": rmse_mean, "rmse_std": rmse_std,
                     **interval_columns(arm_intervals(cells, arm)),
                     "crmse_mean": _mean_spread([cell.test_crmse for cell in mine])[0],
                     "metre_mean": _mean_spread([100 * cell.test_metre for cell in mine])[0],
                     "metre_rmse_mean": _mean_spread([cell.test_metre_rmse for cell in mine])[0],
                     "val_match_rate_mean": _mean_spread([100 * cell.val_match_rate for cell in mine])[0],
                     "leaked_mean": _mean_spread([100 * cell.leaked_fraction for cell in mine])[0],
                     "unleaked_match_rate_mean": _mean_spread([100 * cell.unleaked_match_rate for cell in mine])[0],
                     "unleaked_rmse_mean": _mean_spread([cell.unleaked_rmse for cell in mine])[0],
                     "step_lr": " ".join(f"{cell.step_lr:.3g}" for cell in mine),
                     "run": " ".join(cell.training_run_id for cell in mine),  # the model: sample --run-id RUN
                     "searched": "; ".join(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in cell.searched.items()) for cell in mine)})
    return rows


def _number(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


SMOKE_NOTE = "A smoke run tests the machinery, not the method: too little training to rank the arms."


def is_smoke(spec: SweepSpec) -> bool:
    return spec.preset == "smoke" or "smoke" in spec.name


def table_markdown(table: list[dict[str, Any]], spec: SweepSpec) -> str:
    if generates(spec):
        return generation_markdown(table, spec)
    lines = [f"# Ablation: {spec.name} ({spec.preset}, {len(spec.seeds)} seed(s), k = {spec.test_samples})", "",
             "| variant | model | match rate (%) | RMSE | Δ match rate (pp) | Δ RMSE | cRMSE | METRe (%) | "
             "val match rate (%) | step_lr | searched | run |"
             + (" leaked (%) | unleaked match rate (%) | unleaked RMSE |" if spec.leakage else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if spec.leakage else "")]
    for row in table:
        spread = row["seeds"] > 1  # one seed has no spread to show
        match = f"{row['match_rate_mean']:.2f}" + (f" ± {row['match_rate_std']:.2f}" if spread else "") \
            + _interval(row, "match_rate", ".2f")
        rmse = "n/a" if math.isnan(row["rmse_mean"]) else \
            f"{row['rmse_mean']:.4f}" + (f" ± {row['rmse_std']:.4f}" if spread else "") + _interval(row, "rmse", ".4f")
        lines.append(f"| {row['variant']} | {row['model']} | {match} | {rmse} | {_difference(row, 'match_rate', '+.2f')} | "
                     f"{_difference(row, 'rmse', '+.4f')} | {_number(row['crmse_mean'], '.4f')} | "
                     f"{_number(row['metre_mean'], '.2f')} | "
                     f"{row['val_match_rate_mean']:.1f} | {row['step_lr']} | {row['searched'] or '-'} | "
                     f"{' '.join(run[:8] for run in row['run'].split())} |"
                     + (f" {_number(row['leaked_mean'], '.1f')} | {_number(row['unleaked_match_rate_mean'], '.2f')} | "
                        f"{_number(row['unleaked_rmse_mean'], '.4f')} |" if spec.leakage else ""))
    seeds = max((row["seeds"] for row in table), default=0)
    spread = f"Mean over {seeds} seeds ± standard deviation" if seeds > 1 else "One seed: no spread over seeds"
    note = (f"\n\n{spread}; each seed's best trial, at its tuned step size. "
            f"In brackets, the 95 % bootstrap interval over the test crystals ({BOOTSTRAP_RESAMPLES} resamples of the "
            f"crystals, each with all its seeds, seed {BOOTSTRAP_SEED}). Δ: the arm minus {ARMS[REFERENCE_ARM].label} "
            "on the same resampled crystals (match rate in percentage points), * where its interval excludes 0. "
            "cRMSE counts a crystal without a match as stol; METRe matches each test crystal against the samples "
            "of every test crystal of its reduced composition (docs/method.md#uncertainty and #metre). "
            "Arms that differ only in a sampling-time switch (the PM correction) sample one trained model: "
            "the model column names whose. The run column is the start of each seed's training run id "
            "(the CSV holds the whole id): `python -m equicsp.sample --run-id RUN` samples that model.\n")
    if is_smoke(spec):
        note += f"\n**{SMOKE_NOTE}**\n"
    return "\n".join(lines) + note


def _interval(row: dict[str, Any], name: str, spec: str) -> str:
    low, high = row[f"{name}_low"], row[f"{name}_high"]
    return "" if math.isnan(low) else f" [{low:{spec}}, {high:{spec}}]"


def _difference(row: dict[str, Any], name: str, spec: str) -> str:
    """An arm's difference from EquiCSP with its interval, * where the interval excludes 0; - without one."""
    if math.isnan(row[f"{name}_diff"]):
        return "-"
    return (f"{row[f'{name}_diff']:{spec}}{_interval(row, f'{name}_diff', spec)}"
            + (" *" if row[f"{name}_diff_resolved"] else ""))


def write_sweep_report(cells: list[CellResult], table: list[dict[str, Any]], spec: SweepSpec, uri: str,
                       parent: str) -> dict[str, Path]:
    """The table (Markdown + CSV), the per-cell CSV, the bar chart and learning curves, logged to the parent."""
    tracker = tracking.Tracker(uri)
    out = Path(tempfile.mkdtemp(prefix="equicsp-sweep-"))
    files = {"table_md": out / "ablation_table.md", "table_csv": out / "ablation_table.csv",
             "cells_csv": out / "ablation_cells.csv", "bars": out / "ablation_bars.png",
             "curves": out / "learning_curves.png"}
    files["table_md"].write_text(table_markdown(table, spec))
    _write_csv(files["table_csv"], table)
    # The per-crystal rms stay out of the cells' CSV (thousands of numbers a cell): each evaluation run logs them.
    _write_csv(files["cells_csv"], [{**{key: value for key, value in asdict(cell).items() if key not in PER_CRYSTAL},
                                     "searched": cell.searched} for cell in cells])
    title = spec.name + (" (smoke: tests the machinery, not the method)" if is_smoke(spec) else "")
    if generates(spec):
        generation_bars(table, files["bars"], title=title)
    else:
        ablation_bars(table, files["bars"], title=title)
    curves: dict[str, list[tuple[int, list[tuple[int, float]], list[tuple[int, float]]]]] = {cell.arm: [] for cell in cells}
    for cell in cells:
        curves[cell.arm].append((cell.seed, tracker.metric_history(cell.training_run_id, "val_total"),
                                 tracker.metric_history(cell.training_run_id, "train_total")))
    arm_learning_curves(curves, files["curves"], labels={name: arm.label for name, arm in ARMS.items()})
    metrics = {}
    for row in table if generates(spec) else ():
        metrics.update({f"{row['arm']}/{key}": row[f"{key}_mean"] / scale for key, _, scale in GENERATION_COLUMNS
                        if not math.isnan(row[f"{key}_mean"])})  # as the generation runs log them: fractions
    for row in table if not generates(spec) else ():
        metrics[f"{row['arm']}/match_rate"] = row["match_rate_mean"] / 100
        if not math.isnan(row["rmse_mean"]):
            metrics[f"{row['arm']}/rmse"] = row["rmse_mean"]
        if not math.isnan(row["unleaked_match_rate_mean"]):
            metrics[f"{row['arm']}/unleaked_match_rate"] = row["unleaked_match_rate_mean"] / 100
        metrics.update(interval_metrics(row))
    tracker.log_metrics(parent, metrics)
    for path in files.values():
        tracker.log_artifact(parent, path)
    tracker.client.set_terminated(parent, "FINISHED")
    return files


PER_CRYSTAL = ("rms", "metre_rms")  # CellResult's per-crystal fields


def interval_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A CSP row's finite intervals, differences from EquiCSP and mended scores as parent-run metrics named
    ARM/NAME (match rates as fractions, as the evaluation runs log them; a resolved difference as 1)."""
    names = [name for name in row if name.endswith(("_low", "_high", "_diff"))
             or (name.endswith("_resolved") and not math.isnan(row[name.removesuffix("_resolved")]))]
    names += ["crmse_mean", "metre_mean", "metre_rmse_mean"]
    metrics = {}
    for name in names:
        value = float(row[name])
        scale = 100.0 if name.startswith(("match_rate", "metre_mean")) and not name.endswith("_resolved") else 1.0
        if not math.isnan(value):
            metrics[f"{row['arm']}/{name.removesuffix('_mean')}"] = value / scale
    return metrics


# The generation table's columns (the paper's Table 6): metric name, heading, scale.
GENERATION_COLUMNS = (("struct_valid", "struct. valid (%)", 100), ("comp_valid", "comp. valid (%)", 100),
                      ("cov_recall", "COV-R (%)", 100), ("cov_precision", "COV-P (%)", 100),
                      ("wdist_density", "wdist density", 1), ("wdist_num_elems", "wdist #elements", 1))


def generation_table(cells: list[CellResult], spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per arm: each generation metric as mean and standard deviation over seeds."""
    rows = []
    for arm in spec.arms:
        mine = [cell for cell in cells if cell.arm == arm]
        if not mine:
            continue
        owner = mine[0].model_of or arm
        row = {"arm": arm, "variant": ARMS[arm].label, "seeds": len(mine),
               "model": "own" if owner == arm else f"shares {ARMS[owner].label}'s"}
        for key, _, scale in GENERATION_COLUMNS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_spread(
                [scale * cell.generation.get(key, math.nan) for cell in mine])
        row["step_lr"] = " ".join(f"{cell.step_lr:.3g}" for cell in mine)
        row["searched"] = "; ".join(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in cell.searched.items()) for cell in mine)
        rows.append(row)
    return rows


def generation_markdown(table: list[dict[str, Any]], spec: SweepSpec) -> str:
    lines = [f"# Ablation (generation): {spec.name} ({spec.preset}, {len(spec.seeds)} seed(s), "
             f"{spec.num_generated} crystals per cell)", "",
             "| variant | model | " + " | ".join(heading for _, heading, _ in GENERATION_COLUMNS)
             + " | step_lr (config's) | searched |",
             "|---|---|" + "---|" * len(GENERATION_COLUMNS) + "---|---|"]
    for row in table:
        spread = row["seeds"] > 1
        values = [_number(row[f"{key}_mean"], ".2f" if scale == 100 else ".4f")
                  + (f" ± {_number(row[f'{key}_std'], '.2f' if scale == 100 else '.4f')}"
                     if spread and not math.isnan(row[f"{key}_mean"]) else "")
                  for key, _, scale in GENERATION_COLUMNS]
        lines.append(f"| {row['variant']} | {row['model']} | " + " | ".join(values)
                     + f" | {row['step_lr']} | {row['searched'] or '-'} |")
    note = ("\n\nMean ± standard deviation over seeds; each seed's trial with the lowest validation loss. "
            "Validity over every generated crystal; coverage and Wasserstein distances against the test split "
            "(docs/method.md#generation-metrics). No step-size search for generation: every model samples at "
            "its config's step_lr. Arms that differ only in a sampling-time switch (the PM correction) sample "
            "one trained model: the model column names whose.\n")
    return "\n".join(lines) + note


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["arm"])
        writer.writeheader()
        writer.writerows(rows)
