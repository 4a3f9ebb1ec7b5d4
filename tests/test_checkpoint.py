import pytest
import torch
from conftest import FAST

from equicsp.config import make_config
from equicsp.engine.checkpoint import CheckpointError, load_model, save_checkpoint
from equicsp.model.denoiser import build_denoiser


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    config = make_config("smoke", "equicsp", FAST)
    path = tmp_path / "model.pt"
    save_checkpoint(path, config, build_denoiser(config))
    stored = torch.load(path, weights_only=True)
    stored["config"]["model"]["hidden_dim"] = 32
    torch.save(stored, path)
    wanted = r"model.pt: the weights do not fit its config: .* has shape \(\d+, 16\), the config wants \(\d+, 32\)"
    with pytest.raises(CheckpointError, match=wanted):
        load_model(path)
