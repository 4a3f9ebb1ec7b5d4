"""Figures a person would rather look at than read."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from equicsp.model.objective import GENERATION_LOSS_NAMES  # noqa: E402

LOSS_COMPONENTS = GENERATION_LOSS_NAMES  # type_noise: generation only


def _save(figure, path: Path, title: str = "", dpi: int = 110) -> Path:
    if title:
        figure.suptitle(title)
    if figure.get_layout_engine() is None:  # a figure made with layout="constrained" lays itself out
        figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def learning_curve(history: list[dict[str, float]], path: Path, title: str = "") -> Path:
    """Train and validation loss per component against epoch, log scale, plus the learning rate."""
    epochs = [row["epoch"] for row in history]
    figure, (losses, rate) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    for index, name in enumerate(LOSS_COMPONENTS):
        color = f"C{index}"
        train = [row.get(f"train_{name}", float("nan")) for row in history]
        if any(value > 0 for value in train):
            losses.plot(epochs, train, color=color, label=f"train {name}")
            losses.plot(epochs, [row.get(f"val_{name}", float("nan")) for row in history], color=color,
                        linestyle="--", label=f"val {name}")
    losses.set_yscale("log")
    losses.set_ylabel("loss")
    losses.legend(ncol=2, fontsize=8)
    losses.set_title(title)
    rate.plot(epochs, [row.get("lr", float("nan")) for row in history], color="k")
    rate.set_yscale("log")
    rate.set_xlabel("epoch")
    rate.set_ylabel("learning rate")
    return _save(figure, path)


def evaluation_figure(results, path: Path, title: str = "") -> Path:
    """The RMS distance of the matches, how many crystals ended each way (matched, no valid sample, ...), and the
    match rate by number of atoms and by number of elements. A panel that would hold one bar is left out: one
    outcome is the histogram's title, and one group (every Perov-5 crystal has 5 atoms) the overall match rate."""
    from pymatgen.core import Composition

    usable = [r for r in results if r.index >= 0]
    groups = {label: _matched_by(usable, key) for label, key in (
        ("number of atoms", lambda r: r.num_atoms), ("number of elements", lambda r: len(Composition(r.formula).elements)))}
    groups = {label: matched for label, matched in groups.items() if len(matched) > 1}
    outcomes = _outcome_counts(results)
    draw: dict[str, Callable[[Axes], None]] = {
        "rms": lambda axis: _rms_histogram(axis, [r.rms for r in usable if r.matched], outcomes),
        **({"outcomes": lambda axis: _outcome_bars(axis, outcomes)} if len(outcomes) > 1 else {}),
        **{label: partial(_match_rate_bars, label=label, matched=matched) for label, matched in groups.items()}}
    width = {name: max(1.0, len(groups[name]) / 7) if name in groups else 1.0 for name in draw}  # 20 sizes: wider
    # The two summaries in one row, the groupings beside them, or in a row below when both have a panel (MP-20).
    rows = [list(draw)] if len(groups) < 2 else [[n for n in draw if n not in groups], list(groups)]
    figure = plt.figure(figsize=(4.3 * len(rows[0]) if len(rows) == 1 else 13, 3.9 * len(rows)), layout="constrained")
    for part, names in zip(figure.subfigures(len(rows), 1, squeeze=False)[:, 0], rows):
        for axis, name in zip(part.subplots(1, len(names), squeeze=False, width_ratios=[width[n] for n in names]).flat, names):
            draw[name](axis)
    return _save(figure, path, title)


def _matched_by(results, key) -> dict[int, list[bool]]:
    """{group: whether each of its crystals matched}, groups in increasing order."""
    matched: dict[int, list[bool]] = {}
    for result in results:
        matched.setdefault(key(result), []).append(result.matched)
    return dict(sorted(matched.items()))


def _rms_histogram(axis, rms: list[float], outcomes: dict[str, int]) -> None:
    total = sum(outcomes.values())
    if rms:
        axis.hist(rms, bins=20, color="C0")
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        axis.set_xticks([])
        axis.set_yticks([])
        axis.text(0.5, 0.5, "no matches", transform=axis.transAxes, ha="center", va="center", color="0.4")
    axis.set_xlabel("RMS distance of matches (normalised)")
    axis.set_ylabel("crystals")
    if len(outcomes) == 1:  # no outcome panel: the title says how they all ended
        axis.set_title(f"all {total} test crystals: {next(iter(outcomes))}", fontsize=10)
    else:
        axis.set_title(f"{len(rms)} of {total} matched ({100 * len(rms) / max(total, 1):.1f} %)", fontsize=10)


# A crystal's outcome: matched, or the start of the reason that metrics.match_one (or csp.unusable_rows) gives.
OUTCOMES = ("matched", "no match within tolerance", "no valid sample", "ground truth invalid", "no sample",
            "unusable")


def _outcome(result) -> str:
    return "matched" if result.matched else next((o for o in OUTCOMES[1:] if result.reason.startswith(o)), "other")


def _outcome_counts(results) -> dict[str, int]:
    """{outcome: how many crystals ended so}, the outcomes that occur, in OUTCOMES' order."""
    counts = {outcome: 0 for outcome in (*OUTCOMES, "other")}
    for result in results:
        counts[_outcome(result)] += 1
    return {outcome: count for outcome, count in counts.items() if count}


def _outcome_bars(axis, counts: dict[str, int]) -> None:
    positions = list(range(len(counts)))[::-1]  # the first outcome on top
    bars = axis.barh(positions, list(counts.values()), color=["C2" if o == "matched" else "C7" for o in counts])
    axis.bar_label(bars, padding=3, fontsize=8)
    axis.set_yticks(positions, list(counts), fontsize=8)
    axis.set_xlim(0, 1.18 * max(counts.values()))  # room for the labels
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("crystals")
    axis.set_title("outcome per test crystal", fontsize=10)


def _match_rate_bars(axis, label: str, matched: dict[int, list[bool]]) -> None:
    """Match rate per group, its value on each bar and the group's size under its tick; the axis is scaled to the
    highest rate, not to 100 %."""
    rates = [100 * sum(flags) / len(flags) for flags in matched.values()]
    positions = list(range(len(rates)))
    bars = axis.bar(positions, rates, color="C1")
    axis.bar_label(bars, [f"{rate:.0f}" for rate in rates], padding=2, fontsize=7)
    axis.set_xticks(positions, [f"{key}\nn={len(flags)}" for key, flags in matched.items()], fontsize=7)
    axis.set_ylim(0, min(100.0, max(rates)) * 1.15 or 1.0)
    axis.set_xlabel(label)
    axis.set_ylabel("match rate (%)")


def ablation_bars(table: list[dict], path: Path, title: str = "") -> Path:
    """Match rate and RMSE per arm (labelled as in the table). Error bars: a row's 95 % bootstrap interval
    (NAME_low, NAME_high) where the table has one, else the standard deviation over seeds where a row has more
    than one seed (one seed and no interval: no bar). A * above an arm marks a difference from EquiCSP whose
    interval excludes 0. Each bar's value is written above it; the RMSE axis starts above 0 when the arms' values
    are close (its label says where), so that their differences show."""
    arms = [row.get("variant", row["arm"]) for row in table]
    figure, (rates, errors) = plt.subplots(1, 2, figsize=(13, 4.8))
    positions = list(range(len(arms)))
    for axis, name, color, label, digits in ((rates, "match_rate", "C0", "test match rate (%)", 1),
                                             (errors, "rmse", "C3", "test RMSE (matched)", 4)):
        heights = [row[f"{name}_mean"] for row in table]
        bars = _error_bars(table, name)
        axis.bar(positions, heights, yerr=bars, color=color, capsize=3)
        below, above = bars or ([0.0] * len(heights), [0.0] * len(heights))
        bottom = _zoomed_bottom([h - b for h, b in zip(heights, below)], [h + a for h, a in zip(heights, above)]) \
            if name == "rmse" else 0.0
        for position, row, height, top in zip(positions, table, heights, map(sum, zip(heights, above))):
            # The value above its error bar, with the * of a resolved difference; n/a: an arm without a match.
            text = ("n/a" if np.isnan(height) else f"{height:.{digits}f}") + (" *" if row.get(f"{name}_diff_resolved") else "")
            axis.annotate(text, (position, bottom if np.isnan(top) else top), xytext=(0, 2), textcoords="offset points",
                          ha="center", va="bottom", fontsize=7)
        axis.set_ylim(bottom, axis.get_ylim()[1] + 0.06 * (axis.get_ylim()[1] - bottom))  # room for the labels
        axis.set_ylabel(label + (f"\naxis starts at {bottom:.3g}, not 0" if bottom else ""))
        axis.set_xticks(positions, arms, rotation=35, ha="right")
        axis.set_xlim(-0.6, len(arms) - 0.4)  # an arm without a bar (n/a) keeps its place
    return _save(figure, path, title)


def _zoomed_bottom(lows: list[float], highs: list[float]) -> float:
    """Where an axis of close values (the RMSE of the arms, often within a few %) starts so that their differences
    show: below the lowest error bar by 60 % of the values' span; 0 when the values are far apart or only one."""
    lows, highs = [v for v in lows if np.isfinite(v)], [v for v in highs if np.isfinite(v)]
    if len(highs) < 2 or min(lows) <= 0 or min(lows) < 0.5 * max(highs) or max(highs) == min(lows):
        return 0.0
    bottom = min(lows) - 0.6 * (max(highs) - min(lows))
    if bottom <= 0:
        return 0.0
    step = 10.0 ** (np.floor(np.log10(bottom)) - 1)  # rounded down to two digits: 0.0379 -> 0.037
    return float(np.floor(bottom / step) * step)


def _error_bars(table: list[dict], name: str):
    """(2, arms) distances below and above each bar to its interval's ends, the seeds' spread, or None."""
    import math

    below, above = [], []
    for row in table:
        mean, low, high = row[f"{name}_mean"], row.get(f"{name}_low", math.nan), row.get(f"{name}_high", math.nan)
        spread = row.get(f"{name}_std", 0.0) if row.get("seeds", 1) > 1 else 0.0
        below.append(max(0.0, mean - low) if math.isfinite(low) else spread)
        above.append(max(0.0, high - mean) if math.isfinite(high) else spread)
    return [below, above] if any(below) or any(above) else None


def generation_bars(table: list[dict], path: Path, title: str = "") -> Path:
    """A generation sweep's validity and coverage per arm (%), mean with standard deviation over seeds as error bars."""
    arms = [row["arm"] for row in table]
    figure, axis = plt.subplots(figsize=(11, 4))
    metrics = (("struct_valid", "struct. valid"), ("comp_valid", "comp. valid"), ("cov_recall", "COV-R"),
               ("cov_precision", "COV-P"))
    width = 0.8 / len(metrics)
    for index, (key, label) in enumerate(metrics):
        axis.bar([position + (index - 1.5) * width for position in range(len(arms))],
                 [row[f"{key}_mean"] for row in table], width, yerr=[row[f"{key}_std"] for row in table],
                 color=f"C{index}", capsize=2, label=label)
    axis.set_ylabel("%")
    axis.set_xticks(list(range(len(arms))), arms, rotation=35, ha="right")
    axis.legend()
    return _save(figure, path, title)


def arm_learning_curves(curves: dict[str, list[tuple[int, list[tuple[int, float]], list[tuple[int, float]]]]],
                        path: Path, labels: dict[str, str] | None = None) -> Path:
    """One panel per arm: validation (solid) and training (dashed) total loss per epoch, a line per seed (a seed
    has one colour in every panel), on one log axis labelled in plain numbers; one key, in the first panel."""
    arms = list(curves)
    seeds = sorted({seed for runs in curves.values() for seed, _, _ in runs})
    color = {seed: f"C{index % 10}" for index, seed in enumerate(seeds)}
    columns = min(4, max(1, len(arms)))
    rows = -(-len(arms) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False, sharey=True)
    for axis, arm in zip(axes.flat, arms):
        for seed, validation, training in curves[arm]:
            if validation:
                axis.plot(*zip(*validation), color=color[seed])
            if training:
                axis.plot(*zip(*training), color=color[seed], linestyle="--", alpha=0.6)
        axis.set_yscale("log")
        axis.set_title((labels or {}).get(arm, arm), fontsize=9)
        axis.set_xlabel("epoch")
    for axis in list(axes.flat)[len(arms):]:
        axis.set_visible(False)
    for row in axes:
        row[0].set_ylabel("total loss")
    _plain_log_ticks(axes[0][0])  # the panels share their y axis, ticks included
    key = [Line2D([], [], color="k", label="validation"), Line2D([], [], color="k", linestyle="--", label="training"),
           *(Line2D([], [], color=color[seed], label=f"seed {seed}") for seed in seeds)]
    axes[0][0].legend(handles=key, fontsize=7, loc="upper right")
    return _save(figure, path, dpi=100)


def _plain_log_ticks(axis) -> None:
    """A log y axis labelled 0.3, 0.5, 1, 2 rather than 3 x 10^-1: 1-2-5 steps over a decade or two, every digit
    over a narrower span, decades only over a wider one."""
    low, high = axis.get_ylim()
    span = high / low if low > 0 else np.inf
    subs = np.arange(1.0, 10.0) if span < 3 else (1.0, 2.0, 5.0) if span < 100 else (1.0,)
    # matplotlib's stub says Sequence[float]; LogLocator takes any 1-d array of floats (np.asarray(subs, dtype=float)).
    axis.yaxis.set_major_locator(LogLocator(subs=subs))  # type: ignore[arg-type]
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(NullFormatter())


def robust_limits(values: list[float], share: float = 0.25) -> tuple[float, float]:
    """Axis limits that one outlier does not set: the 1st to 99th percentile widened by share of that span on each
    side, then cut to the data's own range (a distribution without far outliers is shown whole)."""
    if not values:
        return 0.0, 1.0
    low, high = (float(end) for end in np.percentile(values, [1, 99]))
    if high == low:  # one value (or 98 % of them alike): a window around it
        return low - 0.5 * (abs(low) or 1.0), high + 0.5 * (abs(high) or 1.0)
    margin = share * (high - low)
    return max(min(values), low - margin), min(max(values), high + margin)


def generation_histograms(generated, reference, path: Path, title: str = "") -> Path:
    """Density and number of elements: valid generated crystals against the reference (test) set."""
    import math

    valid = [c for c in generated if c.valid and math.isfinite(c.density)]
    reference = [c for c in reference if math.isfinite(c.density)]
    figure, (density, elements) = plt.subplots(1, 2, figsize=(10, 3.8))
    sets = (("test", [c.density for c in reference], "C0"), (f"generated (valid, {len(valid)})",
                                                              [c.density for c in valid], "C1"))
    pooled = [value for _, values, _ in sets for value in values]
    low, high = robust_limits(pooled)
    edges = np.linspace(low, high, 1 + int(np.clip(np.sqrt(len(pooled)), 10, 40)))  # few crystals: fewer bins
    outside = []
    for label, values, color in sets:
        shown = [value for value in values if low <= value <= high]
        if shown:
            density.hist(shown, bins=edges, density=True, alpha=0.5, color=color, label=label)
        if len(shown) < len(values):
            outside.append(f"{len(values) - len(shown)} {label.split()[0]}")
    if outside:  # say what the axis leaves out, and how far the farthest lies
        farthest = max(pooled, key=lambda value: max(low - value, value - high))
        density.text(0.98, 0.97, f"beyond the axis: {', '.join(outside)}\n(farthest {farthest:.3g} g/cm$^3$)",
                     transform=density.transAxes, ha="right", va="top", fontsize=7, color="0.3")
    density.set_xlim(low - 0.02 * (high - low), high + 0.02 * (high - low))
    density.set_xlabel("density (g/cm$^3$)")
    density.set_ylabel("frequency")
    density.legend(fontsize=8, loc="upper left")
    counts = sorted({c.num_elements for c in reference} | {c.num_elements for c in valid})
    width = 0.4
    for offset, (label, crystals, color) in enumerate((("test", reference, "C0"), ("generated", valid, "C1"))):
        total = max(len(crystals), 1)
        elements.bar([k + (offset - 0.5) * width for k in counts],
                     [sum(c.num_elements == k for c in crystals) / total for k in counts], width, color=color, label=label)
    elements.set_xticks(counts)
    elements.set_xlabel("number of elements")
    elements.set_ylabel("fraction")
    elements.legend(fontsize=8)
    return _save(figure, path, title)
