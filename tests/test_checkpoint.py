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


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo this should never run",))


def test_a_crafted_checkpoint_is_refused_without_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "crafted.pt"
    torch.save({"config": {}, "model": RunsCode()}, path)
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused: it refers to the Python object ") and "system" in message
    assert "weights_only" not in message and "trusted source" not in message
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable equicsp checkpoint"):
        load_model(tmp_path / "junk.pt")
