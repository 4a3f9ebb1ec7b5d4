"""An evaluation's files: per_crystal.csv reads back as the results it was written from."""

import math
from dataclasses import replace
from types import SimpleNamespace

from equicsp.config import ARMS, Config
from equicsp.evaluation.metrics import CrystalResult, write_results_csv
from equicsp.evaluation.report import figure_title, read_results_csv


def test_per_crystal_csv_reads_back_as_the_same_results_in_the_same_order(tmp_path):
    results = [CrystalResult(index=3, formula="SrTiO3", num_atoms=5, matched=True, rms=0.0123456789012345,
                             best_sample=1, valid_samples=2, num_samples=2, reason="", leaked=False, metre_rms=0.01),
               CrystalResult(index=0, formula="C", num_atoms=8, matched=False, rms=math.nan, best_sample=-1,
                             valid_samples=0, num_samples=2, reason="no valid sample: x, y", matcher_failures=1,
                             metre_rms=math.nan),
               CrystalResult(index=-1, formula="", num_atoms=0, matched=False, rms=math.nan, best_sample=-1,
                             valid_samples=0, num_samples=2, reason="unusable row 7")]
    write_results_csv(results, tmp_path / "per_crystal.csv")
    back = read_results_csv(tmp_path / "per_crystal.csv")
    assert [r.index for r in back] == [3, 0, -1] and back[0] == results[0]
    assert math.isnan(back[1].rms) and math.isnan(back[1].metre_rms) and back[1].reason == results[1].reason
    assert back[2].metre_rms is None and back[2].leaked is None and back[1].matcher_failures == 1


def test_the_figure_title_names_the_arm_the_model_and_k():
    def evaluation(objective, k=20):
        config = replace(Config(), objective=objective)
        return SimpleNamespace(config=config, summary=SimpleNamespace(num_samples=k))

    assert figure_title(evaluation(ARMS["equicsp"].objective), "run 26104baf") == \
        "EquiCSP · run 26104baf · best of k = 20 · step_lr 5e-06"
    searched = replace(ARMS["no_vm"].objective, perm_loss_weight=0.3)  # a sweep searched a loss weight
    assert figure_title(evaluation(searched, k=1)).startswith("w/o von Mises · best of k = 1")
    assert figure_title(evaluation(ARMS["diffcsp"].objective)).startswith("DiffCSP ·")
    assert figure_title(evaluation(ARMS["none"].objective)).startswith("all switches off")
    odd = replace(ARMS["equicsp"].objective, von_mises=False, perm_loss=False)
    assert figure_title(evaluation(odd)).startswith("custom objective ·")
