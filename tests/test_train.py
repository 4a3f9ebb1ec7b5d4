import subprocess
import sys

import pytest
from conftest import FAST

from equicsp.cli.train import main as train_main
from equicsp.config import make_config
from equicsp.engine.checkpoint import CheckpointError, load_model, read_checkpoint
from equicsp.engine.training import train


def fast_config(data_dir, **extra):
    return make_config("smoke", "equicsp", {**FAST, "data.path": str(data_dir), "run.checkpoint_every": 2, **extra})


def test_training_lowers_the_loss_and_writes_checkpoints(tiny_data_dir, tmp_path):
    loop = train(fast_config(tiny_data_dir, **{"optim.epochs": 12}), tmp_path / "run", show_progress=False)
    history = loop.state.history
    assert len(history) == 12
    assert history[-1]["train_total"] < history[0]["train_total"]
    for name in ("last.pt", "best.pt", "config.yaml"):
        assert (tmp_path / "run" / name).exists()
    stored = read_checkpoint(tmp_path / "run" / "last.pt")  # weights_only=True inside
    assert stored["epoch"] == 12 and set(stored) >= {"optimizer", "scheduler", "config", "model"}
    config, model = load_model(tmp_path / "run" / "best.pt")
    assert config.data.path == str(tiny_data_dir)


def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(tiny_data_dir, tmp_path):
    full = train(fast_config(tiny_data_dir, **{"optim.epochs": 6}), tmp_path / "full", show_progress=False)
    train(fast_config(tiny_data_dir, **{"optim.epochs": 4}), tmp_path / "split", show_progress=False)
    resumed = train(fast_config(tiny_data_dir, **{"optim.epochs": 6}), tmp_path / "split", show_progress=False)
    losses = lambda loop: [round(h["train_total"], 6) for h in loop.state.history]  # noqa: E731
    assert losses(resumed) == losses(full)


def test_same_seed_same_losses_other_seed_other_losses(tiny_data_dir, tmp_path):
    runs = [train(fast_config(tiny_data_dir, **{"optim.epochs": 2, "run.seed": seed}), tmp_path / f"r{i}",
                  show_progress=False) for i, seed in enumerate((0, 0, 1))]
    totals = [[h["train_total"] for h in run.state.history] for run in runs]
    assert totals[0] == totals[1] and totals[0] != totals[2]


def loop_on(config):
    import torch

    from equicsp.data.splits import load_splits
    from equicsp.engine.training import TrainingLoop

    datasets = load_splits(config, ("train", "val"), show_progress=False)
    return TrainingLoop(config, datasets["train"], datasets["val"], torch.device("cpu"), show_progress=False)


def test_best_pt_is_written_with_the_checkpoints_and_holds_the_best_epochs_weights(tiny_data_dir, tmp_path):
    import torch

    from equicsp.engine.training import run_epoch

    loop = loop_on(fast_config(tiny_data_dir, **{"optim.epochs": 6, "run.checkpoint_every": 3}))
    validation_metrics = loop._validation_metrics

    def worse_from_epoch_3(means):  # epochs 1 and 2 can improve, later ones cannot
        metrics = validation_metrics(means)
        return {**metrics, "val_total": metrics["val_total"] + (100.0 if loop.state.epoch >= 2 else 0.0)}

    loop._validation_metrics = worse_from_epoch_3
    out = tmp_path / "run"
    out.mkdir()
    weights = {}
    for epoch in range(1, 7):
        run_epoch(loop, out)
        weights[epoch] = {name: value.clone() for name, value in loop.model.state_dict().items()}
        assert (out / "best.pt").exists() == (epoch >= 3), f"best.pt waits for the checkpoint (epoch {epoch})"
    best = min(loop.state.history, key=lambda row: row["val_total"])
    stored = read_checkpoint(out / "best.pt")
    assert stored["epoch"] == best["epoch"] <= 2 and stored["best_val"] == best["val_total"]
    assert all(torch.equal(stored["model"][name], value) for name, value in weights[best["epoch"]].items())
    assert not any(torch.equal(stored["model"][name], value) for name, value in weights[6].items()
                   if value.dtype.is_floating_point and value.numel() > 1), "a copy, not the live weights"
    assert not {"optimizer", "scheduler", "history"} & set(stored), "best.pt is for sampling, last.pt for resuming"
    assert stored["tables_key"] == read_checkpoint(out / "last.pt")["tables_key"]
    config, _ = load_model(out / "best.pt")
    assert config.optim.epochs == 6


def test_a_run_diverging_before_its_first_checkpoint_still_writes_the_best_weights(tiny_data_dir, tmp_path,
                                                                                  monkeypatch):
    import dataclasses
    import math

    from equicsp.engine.training import TrainingDiverged
    from equicsp.model.objective import Objective

    plain = Objective.__call__

    def poisoned(self, batch, seed=0, step=0):
        loss = plain(self, batch, seed, step)
        poison = self.denoiser.training and step == 2  # epoch 2's training steps
        return dataclasses.replace(loss, total=loss.total * math.nan) if poison else loss

    monkeypatch.setattr(Objective, "__call__", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="epoch 2"):
        train(fast_config(tiny_data_dir, **{"optim.epochs": 4, "run.checkpoint_every": 3}), out, show_progress=False)
    assert read_checkpoint(out / "best.pt")["epoch"] == 1 and not (out / "last.pt").exists()


def test_bad_inputs_fail_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(["--local", "--preset", "smoke", "--objective.nope", "1", "--out", str(tmp_path)])
    assert "unrecognized arguments: --objective.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="objective.frame_average and objective.perm_loss exclude each other"):
        train_main(["--local", "--preset", "smoke", "--objective.frame_average", "true", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a folder"):
        train_main(["--local", "--preset", "smoke", "--data.path", str(tmp_path / "missing"), "--out", str(tmp_path)])
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / "junk.pt")


def test_train_and_sample_commands_run(tiny_data_dir, tmp_path):
    """The two user commands end to end, as a user types them."""
    overrides = [arg for key, value in FAST.items() for arg in (f"--{key}", str(value))]
    run = subprocess.run([sys.executable, "-m", "equicsp.train", "--local", "--preset", "smoke", "--data", str(tiny_data_dir),
                          "--optim.epochs", "2", "--out", str(tmp_path / "run"), *overrides],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "done: 2 epochs" in run.stdout
    sample = subprocess.run([sys.executable, "-m", "equicsp.sample", "--checkpoint", str(tmp_path / "run" / "last.pt"),
                             "--formula", "SrTiO3", "--num-samples", "2", "--out", str(tmp_path / "cifs")],
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    from pymatgen.core import Structure

    files = sorted((tmp_path / "cifs").glob("*.cif"))
    assert [f.name for f in files] == ["SrTiO3_0.cif", "SrTiO3_1.cif"]
    for file in files:
        assert "_chemical_formula_structural   SrTiO3" in file.read_text()
        # A two-epoch model's cell may be degenerate (volume ~0), which pymatgen's CIF reader refuses: such a
        # crystal is flagged INVALID; any other reads back.
        line = next(line for line in sample.stdout.splitlines() + sample.stderr.splitlines()
                    if line.startswith(file.name))
        if "INVALID" not in line:
            assert Structure.from_file(file).composition.reduced_formula == "SrTiO3"
    bad = subprocess.run([sys.executable, "-m", "equicsp.sample", "--checkpoint", str(tmp_path / "run" / "last.pt"),
                          "--formula", "Xx2O", "--out", str(tmp_path / "cifs")], capture_output=True, text=True)
    assert bad.returncode != 0 and "Xx2O" in bad.stderr


def fast_arguments(data_dir, out, **extra):
    overrides = {**FAST, "data.path": str(data_dir), "run.checkpoint_every": 2, **extra}
    return ["--local", "--preset", "smoke", "--out", str(out),
            *[arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]]


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_data_dir, tmp_path, monkeypatch):
    import math

    import torch

    from equicsp.engine.training import TrainingDiverged
    from equicsp.model.objective import Objective

    out = tmp_path / "run"
    train(fast_config(tiny_data_dir, **{"optim.epochs": 2}), out, show_progress=False)
    good = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")}
    calls = []
    plain = Objective.__call__

    def poisoned(self, batch, seed=0, step=0):
        loss = plain(self, batch, seed, step)
        if self.denoiser.training and step == 3:  # epoch 3's second batch blows up
            calls.append(step)
            if len(calls) == 2:
                loss.total = loss.total * math.nan
        return loss

    monkeypatch.setattr(Objective, "__call__", poisoned)
    with pytest.raises(TrainingDiverged, match="epoch 3, first at step 2 of 2"):
        train(fast_config(tiny_data_dir, **{"optim.epochs": 4}), out, show_progress=False)
    assert {name: (out / name).read_bytes() for name in good} == good, "the last good checkpoints are kept"
    assert all(torch.isfinite(value).all() for value in read_checkpoint(out / "last.pt")["model"].values())


def test_the_train_command_fails_on_a_nan_loss(tiny_data_dir, tmp_path):
    with pytest.raises(SystemExit, match="error: training diverged: non-finite training loss in epoch 1"):
        train_main(fast_arguments(tiny_data_dir, tmp_path / "run", **{"optim.lr": 1e6, "optim.epochs": 2}))
    assert not (tmp_path / "run" / "last.pt").exists() and not (tmp_path / "run" / "best.pt").exists()


def test_a_relaunch_with_another_config_is_refused_before_anything_is_written(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 2}))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(SystemExit, match=r"run.seed 0 -> 1.*--out.*--no-resume"):
        train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 2, "run.seed": 1}))
    with pytest.raises(SystemExit, match=r"model.hidden_dim 16 -> 32"):
        train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 2, "model.hidden_dim": 32}))
    with pytest.raises(SystemExit, match=r"objective_preset equicsp -> diffcsp"):
        train_main([*fast_arguments(tiny_data_dir, out, **{"optim.epochs": 2}), "--objective-preset", "diffcsp"])
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 3, "run.checkpoint_every": 3}))  # may change
    assert read_checkpoint(out / "last.pt")["epoch"] == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_device_is_one_sentence_before_anything_is_written(tiny_data_dir, tmp_path):
    with pytest.raises(SystemExit, match="error: device 'cuda' asked for, but CUDA is not available"):
        train_main(fast_arguments(tiny_data_dir, tmp_path / "run", **{"run.device": "cuda"}))
    assert not (tmp_path / "run").exists()


def test_out_folders_that_cannot_hold_the_run_are_one_sentence_before_any_work(tiny_data_dir, tmp_path, capsys):
    from filelock import FileLock

    with pytest.raises(SystemExit):
        train_main(fast_arguments(tiny_data_dir, ""))
    assert "--out: an empty path" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write to output folder .*file: .*file is a file, not a folder$"):
        train_main(fast_arguments(tiny_data_dir, tmp_path / "file"))
    with pytest.raises(SystemExit, match=r"^error: cannot write to output folder .*file/run: Not a directory$"):
        train_main(fast_arguments(tiny_data_dir, tmp_path / "file" / "run"))
    out = tmp_path / "run"
    out.mkdir()
    with FileLock(out / ".equicsp.lock"), \
            pytest.raises(SystemExit, match=rf"^error: {out} is in use by another training process"):
        train_main(fast_arguments(tiny_data_dir, out))
    # A launch whose data cannot be read leaves nothing that would refuse the corrected launch.
    with pytest.raises(SystemExit, match="not a folder"):
        train_main(fast_arguments(tiny_data_dir / "missing", out))
    assert not (out / "config.yaml").exists()
    (out / "last.pt.4242.tmp").write_bytes(b"half a checkpoint from a killed run")
    train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 2}))
    assert sorted(path.name for path in out.iterdir()) == [".equicsp.lock", "best.pt", "config.yaml", "last.pt"]


def test_a_read_only_or_full_out_is_one_sentence(tiny_data_dir, tmp_path):
    from filesystems import full_disk, read_only_disk

    with read_only_disk(tmp_path / "ro") as folder, \
            pytest.raises(SystemExit, match=rf"^error: cannot write to output folder {folder}/run: Read-only file system$"):
        train_main(fast_arguments(tiny_data_dir, folder / "run"))
    with full_disk(tmp_path / "small", "16k") as folder, \
            pytest.raises(SystemExit, match=rf"^error: cannot write to output folder {folder}: no space left on {folder}$"):
        train_main(fast_arguments(tiny_data_dir, folder))  # refused before the work
    with full_disk(tmp_path / "full", "2m") as folder:  # room for the first check's probe, not for this model's checkpoint
        with pytest.raises(SystemExit, match=rf"^error: no space left on {folder} \(writing (best|last)\.pt\)$"):
            train_main(fast_arguments(tiny_data_dir, folder, **{"optim.epochs": 2, "model.hidden_dim": 512}))
        assert not list(folder.glob("*.tmp"))


def test_ctrl_c_says_which_epoch_was_kept_and_the_same_command_resumes(tiny_data_dir, tmp_path, monkeypatch, capsys):
    import equicsp.engine.training as training

    real_epoch = training.run_epoch

    def interrupted_in_epoch_4(loop, out_dir):
        if loop.state.epoch == 3:
            raise KeyboardInterrupt
        return real_epoch(loop, out_dir)

    monkeypatch.setattr(training, "run_epoch", interrupted_in_epoch_4)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 4}))
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"interrupted: {out / 'last.pt'} keeps epoch 2; "
                                                                "run the same command again to resume from there")
    monkeypatch.setattr(training, "run_epoch", real_epoch)
    train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 4}))
    assert read_checkpoint(out / "last.pt")["epoch"] == 4


def drop_last_crystal(csv_path):
    import csv

    with open(csv_path, newline="") as handle:
        rows = list(csv.reader(handle))
    with open(csv_path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows[:-1])


def test_a_relaunch_on_changed_data_is_refused_before_anything_is_written(tiny_data_dir, tmp_path):
    from equicsp.config import ConfigError

    out = tmp_path / "run"
    train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 2}))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert set(read_checkpoint(out / "last.pt")["data_keys"]) == {"train", "val"}
    drop_last_crystal(tiny_data_dir / "train.csv")  # as a new split would change it
    with pytest.raises(SystemExit, match=r"last.pt was trained on other data \(the train crystals changed since\); "
                                         r"train into another --out, or pass --no-resume"):
        train_main(fast_arguments(tiny_data_dir, out, **{"optim.epochs": 4}))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    changed = loop_on(fast_config(tiny_data_dir, **{"optim.epochs": 4}))
    with pytest.raises(ConfigError, match="other data"):  # a Ray worker resuming from a checkpoint checks it too
        changed.restore(out / "last.pt")
    train_main([*fast_arguments(tiny_data_dir, out, **{"optim.epochs": 2}), "--no-resume"])
    assert read_checkpoint(out / "last.pt")["data_keys"]["train"] == changed.data_keys["train"]


def test_a_run_says_what_it_trains_each_epoch_of_how_many_and_a_resume_where_it_goes_on(tiny_data_dir, tmp_path,
                                                                                         capsys):
    out = tmp_path / "run"
    train(fast_config(tiny_data_dir, **{"optim.epochs": 3}), out)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"training: data {tiny_data_dir} (8 train, 8 val crystals); model 1 layers x 16 hidden, ")
    assert " M parameters; device cpu; 3 epochs, batch " in lines[0]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert " left" not in epochs[0], "the first epoch alone (warm-up) gives no estimate"
    assert epochs[1].endswith(" left") and not epochs[2].endswith(" left")
    train(fast_config(tiny_data_dir, **{"optim.epochs": 4}), out)
    assert f"resuming from {out / 'last.pt'} at epoch 3 of 4" in capsys.readouterr().out.splitlines()
    train(fast_config(tiny_data_dir, **{"optim.epochs": 4}), out)
    assert f"{out / 'last.pt'} is at epoch 4 of 4: nothing left to train" in capsys.readouterr().out


def test_the_time_left_is_at_the_mean_epoch_after_the_first():
    from equicsp.engine.eta import EpochTimer
    from equicsp.engine.training import epoch_line

    timer = EpochTimer()
    for seconds in (100.0, 6.0, 6.0):  # the first compiles
        timer.add(seconds)
    metrics = {"epoch": 3, "train_total": 1.0, "val_total": 2.0, "lr": 1e-3, "crystals_per_s": 500.0}
    assert epoch_line(metrics, 103, timer) == ("epoch 3/103: train 1.0000 val 2.0000 lr 1.00e-03 500 crystals/s, "
                                               "about 10 min left")
