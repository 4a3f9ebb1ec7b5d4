"""End to end on the CPU: a tiny EquiCSP learns a handful of Perov-5 crystals and samples them back."""

import pytest

from equicsp.config import make_config
from equicsp.data.splits import load_splits
from equicsp.engine.checkpoint import load_model
from equicsp.engine.training import train
from equicsp.evaluation.csp import EvaluationSettings, Evaluator


@pytest.mark.slow
def test_a_tiny_model_reproduces_its_training_crystals(memorised_model, tmp_path):
    config, checkpoint = memorised_model
    _, model = load_model(checkpoint)
    untrained = train(make_config("smoke", "equicsp", {**{k: v for k, v in config.flat().items()
                                                            if k.startswith(("data.", "model.", "sampler."))},
                                                         "optim.epochs": 1}),
                      tmp_path / "untrained", show_progress=False)
    crystals = load_splits(config, ("test",), show_progress=False)["test"]
    settings = EvaluationSettings(num_samples=8, seed=0)
    trained = Evaluator.here(model).evaluate(config, crystals, settings, show_progress=False)
    baseline = Evaluator.here(untrained.model).evaluate(config, crystals, settings, show_progress=False)
    assert trained.summary.match_rate >= 0.6, trained.per_crystal
    assert baseline.summary.match_rate <= 0.25
    assert trained.summary.match_rate > baseline.summary.match_rate
