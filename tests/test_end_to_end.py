"""End to end on the CPU: a tiny EquiCSP learns a handful of Perov-5 crystals and samples them back."""

import csv
import sys

import pytest

from equicsp.config import make_config
from equicsp.csp import run_csp
from equicsp.train import load_splits, train

csv.field_size_limit(sys.maxsize)


@pytest.fixture
def memorise_data_dir(tmp_path, tiny_csv):
    """Eight crystals; the training file repeats them eight times so one step sees many noise draws."""
    with open(tiny_csv, newline="") as handle:
        rows = list(csv.reader(handle))
    folder = tmp_path / "memorise"
    folder.mkdir()
    for split, copies in (("train", 8), ("val", 1), ("test", 1)):
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(rows[0])
            writer.writerows(rows[1:] * copies)
    return folder


@pytest.mark.slow
def test_a_tiny_model_reproduces_its_training_crystals(memorise_data_dir, tmp_path):
    config = make_config("smoke", "equicsp", {
        "data.path": str(memorise_data_dir), "model.hidden_dim": 128, "model.num_layers": 3,
        "optim.epochs": 3000, "optim.batch_size": 64, "optim.plateau_patience": 50,
        "run.checkpoint_every": 1000, "sampler.step_lr": 2e-4})
    untrained = train(make_config("smoke", "equicsp", {**{k: v for k, v in config.flat().items()
                                                            if k.startswith(("data.", "model.", "sampler."))},
                                                         "optim.epochs": 1}),
                      tmp_path / "untrained", show_progress=False)
    loop = train(config, tmp_path / "run", show_progress=False)
    crystals = load_splits(config, ("test",), show_progress=False)["test"]
    trained = run_csp(loop.model, config, crystals, num_samples=8, seed=0, show_progress=False)
    baseline = run_csp(untrained.model, config, crystals, num_samples=8, seed=0, show_progress=False)
    assert trained.summary.match_rate >= 0.6, trained.per_crystal
    assert baseline.summary.match_rate <= 0.25
    assert trained.summary.match_rate > baseline.summary.match_rate
