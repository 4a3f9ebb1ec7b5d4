"""Figures a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_COMPONENTS = ("total", "lattice", "coord", "score", "perm")


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
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
