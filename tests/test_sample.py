"""`python -m equicsp.sample`: non-finite crystals are never written, bad options and output folders are sentences."""

import pytest
import torch
from conftest import FAST

from equicsp.checkpoint import save_checkpoint
from equicsp.config import make_config
from equicsp.denoiser import build_denoiser
from equicsp.sample import main as sample_main


def checkpoint(path, poisoned: bool = False):
    config = make_config("smoke", "equicsp", FAST)
    torch.manual_seed(0)
    model = build_denoiser(config)
    if poisoned:  # what a diverged run used to leave behind
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
    save_checkpoint(path, config, model)
    return path


def test_a_non_finite_crystal_is_reported_and_never_written(tmp_path, capsys):
    path = checkpoint(tmp_path / "nan.pt", poisoned=True)
    with pytest.raises(SystemExit) as stopped:
        sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--num-samples", "2", "--out", str(tmp_path / "cifs")])
    assert stopped.value.code not in (0, None)
    assert "2 of 2 sampled crystals" in str(stopped.value.code)
    assert "SrTiO3_0.cif: not written: non-finite" in capsys.readouterr().err
    assert not list((tmp_path / "cifs").glob("*.cif"))


def test_bad_sampling_options_are_one_sentence(tmp_path):
    path = checkpoint(tmp_path / "model.pt")
    with pytest.raises(SystemExit, match="error: .*sampler.step_lr must be a finite number"):
        sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--out", str(tmp_path), "--step-lr", "nan"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="error: device 'cuda' asked for, but CUDA is not available"):
            sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--out", str(tmp_path), "--device", "cuda"])


def test_an_unwritable_out_fails_before_sampling(tmp_path, monkeypatch):
    config = make_config("smoke", "equicsp", FAST)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", config, build_denoiser(config))
    (tmp_path / "file.txt").write_text("")

    def sampled(*args, **kwargs):
        raise AssertionError("sampled although the output folder cannot be written")

    monkeypatch.setattr("equicsp.sample.Sampler.sample", sampled)
    out = tmp_path / "file.txt" / "sub"
    with pytest.raises(SystemExit, match=f"error: cannot write to output folder {out}: Not a directory"):
        sample_main(["--checkpoint", str(tmp_path / "best.pt"), "--formula", "SrTiO3", "--out", str(out)])
