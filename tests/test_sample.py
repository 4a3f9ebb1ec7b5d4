"""`python -m equicsp.sample`: an output folder that cannot be written fails before the sampling."""

import pytest
import torch
from conftest import FAST

from equicsp.checkpoint import save_checkpoint
from equicsp.config import make_config
from equicsp.denoiser import build_denoiser
from equicsp.sample import main as sample_main


def test_an_unwritable_out_fails_before_sampling(tmp_path, monkeypatch):
    config = make_config("smoke", "equicsp", FAST)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", config, build_denoiser(config.model, config.objective.frame_average))
    (tmp_path / "file.txt").write_text("")

    def sampled(*args, **kwargs):
        raise AssertionError("sampled although the output folder cannot be written")

    monkeypatch.setattr("equicsp.sample.Sampler.sample", sampled)
    out = tmp_path / "file.txt" / "sub"
    with pytest.raises(SystemExit, match=f"error: cannot write to output folder {out}: Not a directory"):
        sample_main(["--checkpoint", str(tmp_path / "best.pt"), "--formula", "SrTiO3", "--out", str(out)])
