"""`python -m equicsp.sample`: non-finite crystals are never written, bad options and output folders are sentences."""

import pytest
import torch
from conftest import FAST

from equicsp.cli.sample import main as sample_main
from equicsp.config import make_config
from equicsp.engine.checkpoint import save_checkpoint
from equicsp.model.denoiser import build_denoiser


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
        sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--out", str(tmp_path / "out"), "--step-lr", "nan"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="error: device 'cuda' asked for, but CUDA is not available"):
            sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--out", str(tmp_path / "out"), "--device", "cuda"])


def test_an_unwritable_out_fails_before_sampling(tmp_path, monkeypatch):
    config = make_config("smoke", "equicsp", FAST)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", config, build_denoiser(config))
    (tmp_path / "file.txt").write_text("")

    def sampled(*args, **kwargs):
        raise AssertionError("sampled although the output folder cannot be written")

    monkeypatch.setattr("equicsp.cli.sample.Sampler.sample", sampled)
    out = tmp_path / "file.txt" / "sub"
    with pytest.raises(SystemExit, match=f"error: cannot write to output folder {out}: .*file.txt is a file"):
        sample_main(["--checkpoint", str(tmp_path / "best.pt"), "--formula", "SrTiO3", "--out", str(out)])


class FakeSampler:
    """A cubic 4 A cell per composition, atoms spread along the diagonal; `close` puts the last two 0.3 A apart."""

    close = False
    seen: dict = {}

    def __init__(self, model, diffusion, config, device, precision):
        FakeSampler.seen["step_lr"] = config.sampler.step_lr

    def sample(self, compositions, num_samples=1, seed=0):
        from equicsp.engine.sampler import SampledCrystal

        crystals = []
        for index, types in enumerate(compositions):
            n = len(types)
            coords = torch.tensor([[i / n, i / n, i / n] for i in range(n)], dtype=torch.float64)
            if self.close:
                coords[-1] = coords[-2] + torch.tensor([0.3 / 4, 0.0, 0.0], dtype=torch.float64)
            for sample in range(num_samples):
                crystals.append(SampledCrystal(index, sample, types, coords, torch.full((3,), 4.0, dtype=torch.float64),
                                               torch.full((3,), 90.0, dtype=torch.float64)))
        return crystals


def test_each_cif_is_reported_with_its_validity_and_atoms_too_close_are_flagged(tmp_path, capsys, monkeypatch):
    path = checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr("equicsp.cli.sample.Sampler", FakeSampler)
    monkeypatch.setattr(FakeSampler, "close", True)
    sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--out", str(tmp_path / "cifs")])
    output = capsys.readouterr()
    assert "SrTiO3_0.cif: SrTiO3, a b c = 4.000 4.000 4.000" in output.out
    # Two flags: the structure (a distance) and the composition (SMACT), not one mixed label.
    assert "closest atoms 0.30 A; structure INVALID (atoms 0.30 A apart (< 0.5)); composition (SMACT) valid" in output.out
    assert "1 of 1 written crystals are INVALID" in output.err and "warning" not in output.err
    monkeypatch.setattr(FakeSampler, "close", False)
    sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--formula", "NaCl2", "--out", str(tmp_path / "cifs"),
                 "--force"])
    output = capsys.readouterr()
    assert "SrTiO3_0.cif: SrTiO3" in output.out and "structure valid; composition (SMACT) valid" in output.out
    assert "NaCl2_0.cif: NaCl2" in output.out and "structure valid; composition (SMACT) INVALID" in output.out
    assert "1 of 2 written crystals are INVALID" in output.err


def test_a_composition_unlike_any_training_crystal_is_warned_about(tmp_path, capsys, monkeypatch):
    path = checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr("equicsp.cli.sample.Sampler", FakeSampler)
    sample_main(["--checkpoint", str(path), "--formula", "SrTiO", "--formula", "BaTiO3", "--formula", "UTiO3",
                 "--out", str(tmp_path / "cifs")])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: SrTiO: no training crystal has its element ratios (1:1:1)")
    assert "the model has not seen such a composition" in warnings[0]
    assert warnings[1].startswith("warning: UTiO3: no training crystal holds U")


def test_formula_units_sample_each_cell_size_named_by_its_formula(tmp_path, capsys, monkeypatch):
    path = checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr("equicsp.cli.sample.Sampler", FakeSampler)
    out = tmp_path / "cifs"
    sample_main(["--checkpoint", str(path), "--formula", "Sr2Ti2O6", "--formula-units", "1,2", "--out", str(out)])
    assert sorted(p.name for p in out.glob("*.cif")) == ["Sr2Ti2O6_0.cif", "SrTiO3_0.cif"]
    with pytest.raises(SystemExit, match="give whole numbers"):
        sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--formula-units", "two", "--out", str(out),
                     "--force"])
    capsys.readouterr()
    sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--formula-units", "auto", "--out", str(out),
                 "--force"])
    assert "SrTiO3: [1] formula units, as training crystals with ratios 1:1:3" in capsys.readouterr().out  # Perov-5
    config = make_config("smoke", "equicsp", {**FAST, "data.path": str(tmp_path / "nowhere")})
    save_checkpoint(tmp_path / "elsewhere.pt", config, build_denoiser(config))
    with pytest.raises(SystemExit, match="auto needs the model's training data.*nowhere.*--formula-units 1,2,4"):
        sample_main(["--checkpoint", str(tmp_path / "elsewhere.pt"), "--formula", "SrTiO3", "--formula-units", "auto",
                     "--out", str(out), "--force"])


def test_auto_formula_units_are_the_sizes_training_saw_for_the_family():
    from types import SimpleNamespace

    from equicsp.data.cells import units_seen_in_training

    cells = [[38, 22, 8, 8, 8], [56, 56, 40, 40, 8, 8, 8, 8, 8, 8], [11, 17], [11, 11, 17, 17], [3, 3, 3, 3, 3]]
    types = torch.tensor([z for cell in cells for z in cell])
    offsets = torch.tensor([0] + [len(cell) for cell in cells]).cumsum(0)
    training = SimpleNamespace(atom_types=types, offsets=offsets)
    assert units_seen_in_training("CaTiO3", training, max_atoms=20)[0] == [1, 2]  # ABX3 family: 1 and 2 units
    assert units_seen_in_training("CaTiO3", training, max_atoms=8)[0] == [1]  # within max_atoms
    assert units_seen_in_training("KBr", training, max_atoms=20)[0] == [1, 2]
    assert units_seen_in_training("Li2O3", training, max_atoms=20)[0] == [1, 2]  # 5 atoms per unit, as the ABX3
    units, reason = units_seen_in_training("Al2O3W4", training, max_atoms=20)
    assert units == [1] and "no training formula like it" in reason


def test_a_logged_run_samples_at_the_step_size_its_sweep_tuned(tmp_path, capsys, monkeypatch):
    from equicsp.platform import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.Tracker(uri)
    experiment = tracker.ensure_experiment("equicsp")
    run = tracker.open_keyed_run(experiment, "k", "equicsp-s0-smoke", "training", {}, {})
    tracker.log_artifact(run, checkpoint(tmp_path / "best.pt"), "checkpoints")
    tracker.log_metrics(run, {"tuned_step_lr": 1.23e-4})
    monkeypatch.setattr("equicsp.cli.sample.Sampler", FakeSampler)
    arguments = ["--run-id", run[:8], "--tracking-uri", uri, "--formula", "SrTiO3", "--out", str(tmp_path / "cifs")]
    sample_main(arguments)  # the 8 digits a sweep's table prints
    assert FakeSampler.seen["step_lr"] == pytest.approx(1.23e-4)
    output, said = capsys.readouterr()
    assert f"run {run[:8]}: {run} (equicsp-s0-smoke" in said
    assert f"/#/experiments/{experiment}/runs/{run}" in output and "step_lr 0.000123: the step size a sweep tuned" in output
    sample_main(arguments + ["--step-lr", "5e-5", "--force"])
    assert FakeSampler.seen["step_lr"] == pytest.approx(5e-5)


def test_a_checkpoint_carrying_a_tuned_step_size_is_sampled_with_it(tmp_path, capsys, monkeypatch):
    config = make_config("smoke", "equicsp", FAST)
    save_checkpoint(tmp_path / "tuned.pt", config, build_denoiser(config), tuned_step_lr=2.5e-4)
    monkeypatch.setattr("equicsp.cli.sample.Sampler", FakeSampler)
    sample_main(["--checkpoint", str(tmp_path / "tuned.pt"), "--formula", "SrTiO3", "--out", str(tmp_path / "cifs")])
    assert FakeSampler.seen["step_lr"] == pytest.approx(2.5e-4)
    assert "step_lr 0.00025: the step size a sweep tuned" in capsys.readouterr().out


def test_bad_inputs_are_one_sentence_before_any_sampling(tmp_path, monkeypatch):
    """A formula without atoms (it wrote a zero-atom CIF) and a generation model (torch's "mat1 and mat2 must have
    the same dtype") are refused with their reason, the model naming the command it belongs to."""
    path = checkpoint(tmp_path / "model.pt")
    monkeypatch.setattr("equicsp.cli.sample.Sampler", FakeSampler)
    with pytest.raises(SystemExit, match="error: formula 'H0' has no atoms"):
        sample_main(["--checkpoint", str(path), "--formula", "H0", "--out", str(tmp_path / "h0")])
    assert not (tmp_path / "h0").exists()
    config = make_config("smoke", "equicsp", {**FAST, "diffusion.task": "generation"})
    save_checkpoint(tmp_path / "generation.pt", config, build_denoiser(config), num_atoms_distribution=[0, 1])
    with pytest.raises(SystemExit, match="error: this is a generation model.*python -m equicsp.generate"):
        sample_main(["--checkpoint", str(tmp_path / "generation.pt"), "--formula", "SrTiO3", "--out", str(tmp_path / "g")])


def test_cifs_reach_out_whole_replacing_an_earlier_run_only_with_force(tmp_path, capsys, monkeypatch):
    """Sampling again into a folder kept the earlier CIFs beside the new ones; a Ctrl-C left half a run."""
    path = checkpoint(tmp_path / "model.pt")
    out = tmp_path / "cifs"
    monkeypatch.setattr("equicsp.cli.sample.Sampler", FakeSampler)
    sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--num-samples", "3", "--out", str(out)])
    assert len(list(out.glob("*.cif"))) == 3
    with pytest.raises(SystemExit, match=f"error: output folder {out} already holds 3 file.*--force"):
        sample_main(["--checkpoint", str(path), "--formula", "NaCl", "--out", str(out)])
    sample_main(["--checkpoint", str(path), "--formula", "NaCl", "--out", str(out), "--force"])
    assert [p.name for p in out.iterdir()] == ["NaCl_0.cif"]

    def interrupted_while_writing(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("equicsp.cli.sample.validity_line", interrupted_while_writing)
    with pytest.raises(SystemExit) as stopped:
        sample_main(["--checkpoint", str(path), "--formula", "SrTiO3", "--out", str(out), "--force"])
    assert stopped.value.code == 130
    assert f"interrupted: no CIF was written to {out} (it keeps what it held)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["NaCl_0.cif"]
