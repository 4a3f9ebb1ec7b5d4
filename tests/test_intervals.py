"""Every ablation row carries bootstrap intervals and its paired difference from EquiCSP, reproducibly."""

import csv
import math

import numpy as np
import pytest

from equicsp.evaluation.plots import ablation_bars
from equicsp.sweep.final import CellResult
from equicsp.sweep.intervals import arm_intervals, rms_table
from equicsp.sweep.report import _write_csv, ablation_table, interval_metrics, table_markdown
from equicsp.sweep.spec import SweepSpec

CRYSTALS = 400


def cell(arm: str, seed: int, rate: float, rms_level: float, stream: int) -> CellResult:
    """A cell whose test crystals match with probability rate at rms around rms_level."""
    rng = np.random.default_rng(stream)
    rms = np.where(rng.random(CRYSTALS) < rate, rms_level * rng.uniform(0.5, 1.5, CRYSTALS), math.nan)
    matched = rms[np.isfinite(rms)]
    return CellResult(arm, seed, f"run-{arm}-{seed}", "e", 1e-4, 0.5, float(np.isfinite(rms).mean()),
                      float(matched.mean()), model_of=arm, rms=tuple(rms.tolist()))


@pytest.fixture(scope="module")
def cells() -> list[CellResult]:
    """EquiCSP; DiffCSP far worse; an arm drawn like EquiCSP; three seeds each."""
    arms = (("equicsp", 0.6, 0.05), ("diffcsp", 0.3, 0.08), ("no_pm", 0.6, 0.05))
    return [cell(arm, seed, rate, level, 10 * index + seed) for index, (arm, rate, level) in enumerate(arms)
            for seed in (0, 1, 2)]


SPEC = SweepSpec(name="s", preset="perov_5", arms=("equicsp", "diffcsp", "no_pm"), seeds=(0, 1, 2))


def test_each_row_has_its_intervals_and_a_clear_difference_is_marked_where_a_like_arm_is_not(cells):
    table = {row["arm"]: row for row in ablation_table(cells, SPEC)}
    for row in table.values():
        assert row["match_rate_low"] < row["match_rate_mean"] < row["match_rate_high"]
        assert row["rmse_low"] < row["rmse_high"] and row["crmse_low"] < row["crmse_high"]
    assert math.isnan(table["equicsp"]["match_rate_diff"]) and not table["equicsp"]["match_rate_diff_resolved"]
    worse = table["diffcsp"]
    assert worse["match_rate_diff_high"] < 0 and worse["match_rate_diff_resolved"] and worse["rmse_diff_low"] > 0
    assert worse["match_rate_diff"] == pytest.approx(worse["match_rate_mean"] - table["equicsp"]["match_rate_mean"])
    assert not table["no_pm"]["match_rate_diff_resolved"]
    markdown = table_markdown(list(table.values()), SPEC)
    [diffcsp_line] = [line for line in markdown.splitlines() if line.startswith("| DiffCSP")]
    [no_pm_line] = [line for line in markdown.splitlines() if line.startswith("| w/o probabilistic")]
    assert diffcsp_line.count(" *") == 2 and " *" not in no_pm_line and "95 % bootstrap interval" in markdown


def test_the_intervals_are_reproducible_and_pool_a_crystals_seeds(cells):
    assert ablation_table(cells, SPEC) == ablation_table(cells, SPEC) or \
        repr(ablation_table(cells, SPEC)) == repr(ablation_table(cells, SPEC))
    assert rms_table(cells, "equicsp").shape == (CRYSTALS, 3)
    one_seed = arm_intervals([c for c in cells if c.seed == 0], "equicsp")["match_rate"]
    three_seeds = arm_intervals(cells, "equicsp")["match_rate"]
    assert three_seeds.high - three_seeds.low < one_seed.high - one_seed.low


def test_cells_without_per_crystal_rms_or_with_other_crystals_get_no_interval(cells):
    short = [CellResult("diffcsp", 0, "r", "e", 1e-4, 0.5, 0.3, 0.1, model_of="diffcsp", rms=(0.1, math.nan))]
    assert arm_intervals(short, "diffcsp").keys() == {"match_rate", "rmse", "crmse"}
    assert "match_rate_diff" not in arm_intervals(cells[:3] + short, "diffcsp")
    row = ablation_table([CellResult("diffcsp", 0, "r", "e", 1e-4, 0.5, 0.3, 0.1, model_of="diffcsp")], SPEC)[0]
    assert math.isnan(row["match_rate_low"]) and "[" not in table_markdown([row], SPEC).splitlines()[4]


def test_the_csv_metrics_and_bars_carry_the_intervals(cells, tmp_path):
    table = ablation_table(cells, SPEC)
    _write_csv(tmp_path / "table.csv", table)
    with open(tmp_path / "table.csv", newline="") as handle:
        rows = {row["arm"]: row for row in csv.DictReader(handle)}
    assert float(rows["diffcsp"]["match_rate_diff_high"]) < 0 and rows["diffcsp"]["match_rate_diff_resolved"] == "True"
    metrics = interval_metrics(table[1])
    assert metrics["diffcsp/match_rate_diff_resolved"] == 1.0 and -1 < metrics["diffcsp/match_rate_diff"] < 0
    assert 0 < metrics["diffcsp/match_rate_low"] < metrics["diffcsp/match_rate_high"] < 1
    assert "equicsp/match_rate_diff_resolved" not in interval_metrics(table[0])
    assert ablation_bars(table, tmp_path / "bars.png").stat().st_size > 0
