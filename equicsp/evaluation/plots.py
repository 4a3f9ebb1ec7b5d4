"""Figures a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from equicsp.model.objective import GENERATION_LOSS_NAMES  # noqa: E402

LOSS_COMPONENTS = GENERATION_LOSS_NAMES  # type_noise: generation only


def _save(figure, path: Path, title: str = "", dpi: int = 110) -> Path:
    if title:
        figure.suptitle(title)
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
    """RMSE distribution of the matches, and match rate by number of atoms and by number of elements."""
    from pymatgen.core import Composition

    usable = [r for r in results if r.index >= 0]
    figure, (histogram, by_atoms, by_elements) = plt.subplots(1, 3, figsize=(13, 3.8))
    rms = [r.rms for r in usable if r.matched]
    histogram.hist(rms, bins=20, color="C0")
    histogram.set_xlabel("RMS distance of matches (normalised)")
    histogram.set_ylabel("crystals")
    histogram.set_title(f"{len(rms)} of {len(results)} matched")
    groups = (("number of atoms", by_atoms, lambda r: r.num_atoms),
              ("number of elements", by_elements, lambda r: len(Composition(r.formula).elements)))
    for label, axis, key in groups:
        rates: dict[int, list[bool]] = {}
        for result in usable:
            rates.setdefault(key(result), []).append(result.matched)
        keys = sorted(rates)
        axis.bar([str(k) for k in keys], [100 * sum(rates[k]) / len(rates[k]) for k in keys], color="C1")
        for position, k in enumerate(keys):
            axis.annotate(f"n={len(rates[k])}", (position, 0), ha="center", va="bottom", fontsize=7)
        axis.set_xlabel(label)
        axis.set_ylabel("match rate (%)")
        axis.set_ylim(0, 100)
    return _save(figure, path, title)


def ablation_bars(table: list[dict], path: Path, title: str = "") -> Path:
    """Match rate and RMSE per arm (labelled as in the table), with the standard deviation over seeds as error
    bars where a row has more than one seed (one seed has no spread to draw)."""
    arms = [row.get("variant", row["arm"]) for row in table]
    figure, (rates, errors) = plt.subplots(1, 2, figsize=(11, 4))
    positions = range(len(arms))
    spread = lambda name: [row[name] if row.get("seeds", 1) > 1 else 0.0 for row in table]  # noqa: E731
    several = any(row.get("seeds", 1) > 1 for row in table)
    rates.bar(positions, [row["match_rate_mean"] for row in table], yerr=spread("match_rate_std") if several else None,
              color="C0", capsize=3)
    rates.set_ylabel("test match rate (%)")
    errors.bar(positions, [row["rmse_mean"] for row in table], yerr=spread("rmse_std") if several else None,
               color="C3", capsize=3)
    errors.set_ylabel("test RMSE (matched)")
    for axis in (rates, errors):
        axis.set_xticks(list(positions), arms, rotation=35, ha="right")
    return _save(figure, path, title)


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
    """One panel per arm: validation (solid) and training (dashed) total loss per epoch, a line per seed."""
    arms = list(curves)
    columns = min(4, max(1, len(arms)))
    rows = -(-len(arms) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False, sharey=True)
    for axis, arm in zip(axes.flat, arms):
        for index, (seed, validation, training) in enumerate(curves[arm]):
            color = f"C{index}"
            if validation:
                axis.plot(*zip(*validation), color=color, label=f"seed {seed} val")
            if training:
                axis.plot(*zip(*training), color=color, linestyle="--", alpha=0.6, label=f"seed {seed} train")
        axis.set_yscale("log")
        axis.set_title((labels or {}).get(arm, arm), fontsize=9)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(arms):]:
        axis.set_visible(False)
    axes[0][0].set_ylabel("total loss")
    return _save(figure, path, dpi=100)


def generation_histograms(generated, reference, path: Path, title: str = "") -> Path:
    """Density and number of elements: valid generated crystals against the reference (test) set."""
    import math

    valid = [c for c in generated if c.valid and math.isfinite(c.density)]
    reference = [c for c in reference if math.isfinite(c.density)]
    figure, (density, elements) = plt.subplots(1, 2, figsize=(10, 3.8))
    density.hist([c.density for c in reference], bins=30, density=True, alpha=0.5, color="C0", label="test")
    if valid:
        density.hist([c.density for c in valid], bins=30, density=True, alpha=0.5, color="C1",
                     label=f"generated (valid, {len(valid)})")
    density.set_xlabel("density (g/cm$^3$)")
    density.set_ylabel("frequency")
    density.legend(fontsize=8)
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
