"""The figures as a reader sees them: titles, axis limits, tick labels and the values written on them."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from equicsp.evaluation import plots
from equicsp.evaluation.metrics import CrystalResult


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plotting functions save, kept for inspection (they are still written to disk)."""
    figures = []
    save = plots._save

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def texts(axis) -> list[str]:
    return [text.get_text() for text in axis.texts]


def perovskites(count: int = 120, seed: int = 0) -> list[CrystalResult]:
    """Perov-5-like results: five atoms each, three to five elements, about half of them matched."""
    rng = np.random.default_rng(seed)
    results = []
    for index in range(count):
        formula = ("SrTiO3", "BaTiO2N", "KNbONF")[index % 3]
        matched = bool(rng.random() < 0.5)
        reason = "" if matched else ("no match within tolerance", "no valid sample: atoms 0.3 A apart")[index % 2]
        results.append(CrystalResult(index, formula, 5, matched, float(rng.gamma(2, 0.04)) if matched else math.nan,
                                     0 if matched else -1, 1, 1, reason))
    return results


def test_the_evaluation_figure_has_its_title_no_one_bar_panel_and_axes_scaled_to_the_data(drawn, tmp_path):
    title = "EquiCSP · run 26104baf · best of k = 1 · step_lr 5e-07"
    plots.evaluation_figure(perovskites(), tmp_path / "evaluation.png", title)
    figure = drawn[0]
    assert figure.get_suptitle() == title and (tmp_path / "evaluation.png").stat().st_size > 0
    axes = {axis.get_xlabel() or axis.get_title(): axis for axis in figure.axes}
    assert "number of atoms" not in axes  # every crystal has 5 atoms: one bar would say nothing
    by_elements = axes["number of elements"]
    assert len(by_elements.patches) == 3 and max(p.get_height() for p in by_elements.patches) < 80
    assert by_elements.get_ylim()[1] < 100  # scaled to the highest rate, not to 100 %
    assert [label.get_text() for label in by_elements.get_xticklabels()] == ["3\nn=40", "4\nn=40", "5\nn=40"]
    assert all(text.isdigit() for text in texts(by_elements))  # each bar's rate written on it
    histogram = axes["RMS distance of matches (normalised)"]
    assert histogram.get_ylabel() == "crystals" and all(float(t).is_integer() for t in histogram.get_yticks())
    assert "matched" in histogram.get_title()
    outcomes = axes["crystals"]
    heights = {label.get_text(): label.get_position()[1] for label in outcomes.get_yticklabels()}
    assert sorted(heights, key=heights.get) == ["no valid sample", "no match within tolerance", "matched"]  # on top
    assert sum(int(text) for text in texts(outcomes)) == 120
    assert all(float(t).is_integer() for t in outcomes.get_xticks())


def test_the_evaluation_figure_shows_a_panel_per_size_when_the_sizes_differ_and_none_for_one_outcome(drawn, tmp_path):
    mixed = [CrystalResult(i, "Fe2O3" if i % 2 else "LiFePO4", n, i % 3 == 0, 0.05 if i % 3 == 0 else math.nan,
                           0, 1, 20, "" if i % 3 == 0 else "no match within tolerance")
             for i, n in enumerate([5, 10, 14, 20] * 10)]
    plots.evaluation_figure(mixed, tmp_path / "mixed.png")
    labels = [axis.get_xlabel() for axis in drawn[0].axes]
    assert "number of atoms" in labels and "number of elements" in labels and "crystals" in labels
    failed = [CrystalResult(0, "SrTiO3", 5, False, math.nan, -1, 0, 1, "no valid sample: atoms 0.26 A apart")]
    plots.evaluation_figure(failed, tmp_path / "failed.png")
    (histogram,) = drawn[1].axes  # one outcome, one element count, one size: the histogram alone says it
    assert histogram.get_title() == "all 1 test crystals: no valid sample" and texts(histogram) == ["no matches"]


def crystals(densities, valid=True):
    return [SimpleNamespace(density=d, valid=valid, num_elements=3 + i % 2) for i, d in enumerate(densities)]


def test_one_density_outlier_does_not_squeeze_the_generation_histogram(drawn, tmp_path):
    rng = np.random.default_rng(1)
    test = rng.normal(5.5, 1.5, 400).clip(1.5, 11)
    generated = rng.normal(5.8, 1.4, 50).clip(1.5, 11)
    plots.generation_histograms(crystals(list(generated) + [260.0]), crystals(test), tmp_path / "outlier.png")
    density = drawn[0].axes[0]
    low, high = density.get_xlim()
    assert low < test.min() and max(test.max(), generated.max()) < high < 20  # the test distribution whole, not a sliver
    (note,) = texts(density)
    assert "1 generated" in note and "260" in note and "test" not in note
    plots.generation_histograms(crystals(generated), crystals(test), tmp_path / "clean.png")
    density = drawn[1].axes[0]
    assert texts(density) == [] and density.get_xlim()[0] < test.min() and density.get_xlim()[1] > test.max()


def test_robust_limits_cut_far_outliers_and_keep_a_plain_distribution_whole():
    values = list(np.linspace(2.0, 10.0, 200))
    assert plots.robust_limits(values) == (2.0, 10.0)
    low, high = plots.robust_limits(values + [260.0])
    assert low == 2.0 and 10.0 <= high < 13.0
    assert plots.robust_limits([]) == (0.0, 1.0)
    low, high = plots.robust_limits([4.0] * 10)
    assert low < 4.0 < high


def ablation_row(arm, rate, rmse, spread=0.001, resolved=False):
    return {"arm": arm, "variant": arm, "seeds": 3, "match_rate_mean": rate, "match_rate_std": 2.0,
            "rmse_mean": rmse, "rmse_std": spread, "rmse_diff_resolved": resolved}


def test_the_ablation_bars_carry_their_values_and_an_rmse_axis_that_shows_close_differences(drawn, tmp_path):
    table = [ablation_row("EquiCSP", 57.1, 0.0483), ablation_row("DiffCSP", 46.0, 0.0614, resolved=True),
             ablation_row("w/o von Mises", 57.2, 0.0498)]
    plots.ablation_bars(table, tmp_path / "bars.png")
    rates, errors = drawn[0].axes
    assert texts(rates) == ["57.1", "46.0", "57.2"] and rates.get_ylim()[0] == 0
    assert texts(errors) == ["0.0483", "0.0614 *", "0.0498"]
    bottom = errors.get_ylim()[0]
    assert 0 < bottom < 0.0483 - 0.001 and f"axis starts at {bottom:.3g}, not 0" in errors.get_ylabel()
    far = [ablation_row("EquiCSP", 57.1, 0.02), ablation_row("DiffCSP", 46.0, 0.09), ablation_row("none", 0.0, math.nan)]
    plots.ablation_bars(far, tmp_path / "far.png")
    rates, errors = drawn[1].axes
    assert errors.get_ylim()[0] == 0 and "not 0" not in errors.get_ylabel()
    assert texts(errors)[-1] == "n/a" and errors.get_xlim()[1] > 2  # an arm without a match keeps its place


def test_the_learning_curves_have_one_key_plain_log_ticks_and_one_colour_per_seed(drawn, tmp_path):
    epochs = np.arange(1, 101)
    loss = lambda scale: list(zip(epochs.tolist(), (0.3 + scale * np.exp(-epochs / 20)).tolist()))  # noqa: E731
    curves = {"equicsp": [(0, loss(3), loss(3.2)), (1, loss(2.8), loss(3))],
              "diffcsp": [(1, loss(3.5), loss(3.6)), (0, loss(3.4), loss(3.5))]}  # seeds in another order
    plots.arm_learning_curves(curves, tmp_path / "curves.png", labels={"equicsp": "EquiCSP", "diffcsp": "DiffCSP"})
    first, second = drawn[0].axes
    assert first.get_legend() is not None and second.get_legend() is None
    assert [t.get_text() for t in first.get_legend().get_texts()] == ["validation", "training", "seed 0", "seed 1"]
    labels = [label.get_text() for label in first.get_yticklabels() if label.get_text()]
    assert labels and all("10^" not in label and "times" not in label for label in labels)
    assert {float(label) for label in labels} >= {0.5, 1.0, 2.0}
    seed_zero = lambda axis, index: axis.lines[index].get_color()  # noqa: E731
    assert seed_zero(first, 0) == seed_zero(second, 2)  # seed 0 is drawn first in one panel, second in the other
