"""Ab initio generation: batch-independent sampling, the checkpoint's N distribution, the command end to end."""

import csv
import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import FAST

from equicsp.config import make_config
from equicsp.data.splits import load_splits
from equicsp.engine.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from equicsp.engine.sampler import SampledCrystal
from equicsp.engine.training import train
from equicsp.evaluation.generation import GenerationError, _write_cif, as_arrays, generate, num_atoms_distribution
from equicsp.evaluation.metrics import structure_problem
from equicsp.model.denoiser import build_denoiser


def generation_config(**overrides):
    return make_config("smoke", "equicsp", {**FAST, "diffusion.task": "generation", **overrides})


def test_generated_crystals_do_not_depend_on_the_batch_size():
    config = generation_config()
    torch.manual_seed(0)
    model = build_denoiser(config)
    histogram = [0, 0, 3, 0, 1, 2]
    whole = generate(model, config, histogram, 6, seed=4, batch_size=6, show_progress=False)
    pieces = generate(model, config, histogram, 6, seed=4, batch_size=4, show_progress=False)
    assert [c.sample_index for c in whole] == list(range(6))
    assert all(len(c.atom_types) in (2, 4, 5) for c in whole)
    for a, b in zip(whole, pieces):
        assert torch.equal(a.atom_types, b.atom_types)
        torch.testing.assert_close(a.frac_coords, b.frac_coords, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.lengths, b.lengths, rtol=1e-5, atol=1e-5)


def test_a_csp_model_cannot_generate():
    config = make_config("smoke", "equicsp", FAST)
    with pytest.raises(GenerationError, match="csp"):
        generate(build_denoiser(config), config, [0, 1], 2, show_progress=False)
    with pytest.raises(GenerationError, match="num_atoms_distribution"):
        num_atoms_distribution({"config": config.to_dict()})


def test_no_cif_for_a_non_finite_crystal(tmp_path):
    crystal = SampledCrystal(-1, 0, torch.tensor([8, 22]), torch.tensor([[0.0, 0, 0], [math.nan, 0.5, 0.5]]),
                             torch.tensor([4.0, 4.0, 4.0]), torch.tensor([90.0, 90.0, 90.0]))
    assert _write_cif(crystal, tmp_path) == ("", "non-finite lattice or coordinates")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_generate_command_end_to_end(tiny_data_dir, tmp_path):
    """Train a tiny generation model for two epochs, then `python -m equicsp.generate` writes CIFs, CSV, summary, figure."""
    from equicsp.cli.generate import main

    config = generation_config(**{"data.path": str(tiny_data_dir), "optim.epochs": 2})
    train(config, tmp_path / "run", show_progress=False)
    checkpoint = read_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["num_atoms_distribution"][5] == 8  # the tiny set: eight crystals of five atoms
    model_from_checkpoint(checkpoint)  # the generation model loads back from its config
    out = tmp_path / "generated"
    main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--num-samples", "6", "--out", str(out), "--device", "cpu",
          "--processes", "1", "--batch-size", "4"])
    with open(out / "samples.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and all(row["num_atoms"] == "5" for row in rows)
    assert {row["cif"] for row in rows if row["cif"]} == {path.name for path in (out / "cifs").iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("struct_valid", "comp_valid", "cov_recall", "cov_precision", "wdist_num_elems"):
        assert key in summary["metrics"]
    assert summary["thresholds"] == {"structure": 0.2, "composition": 4.0}
    assert (out / "generation.png").stat().st_size > 0
    # The scores name the crystals they were computed against (what a logged generation is reused by).
    from equicsp.data.splits import load_splits

    test = load_splits(config, ("test",), show_progress=False)["test"]
    assert summary["settings"]["reference_content"] == test.content_key()[:16]


def structurally_valid(crystal) -> bool:
    arrays = as_arrays(crystal)
    try:
        return all(math.isfinite(v) for v in arrays.lengths + arrays.angles) and not structure_problem(
            arrays.to_structure())
    except Exception:  # a degenerate lattice pymatgen cannot build
        return False


@pytest.fixture
def one_thread():
    """One torch thread: on a small shared CPU, more only thrash (this test takes minutes instead of seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_small_generation_model_generates_valid_crystals_of_its_training_elements(memorise_data_dir, tmp_path,
                                                                                     one_thread):
    """Trained 600 steps on eight Perov-5 crystals, a small model generates mostly valid crystals made of the
    training elements; untrained, or sampled with DiffCSP's unclipped type step (sampler.clip_types false), not.

    Measured on a 2-core CPU: 88 % structurally valid and every atom a training element; untrained 14 % and
    14 %; unclipped 27 % valid.
    """
    config = make_config("smoke", "equicsp", {"diffusion.task": "generation", "data.path": str(memorise_data_dir),
                                              "model.num_layers": 2, "optim.epochs": 600, "optim.batch_size": 64,
                                              "run.checkpoint_every": 1000, "sampler.batch_size": 64})
    train(config, tmp_path / "run", show_progress=False)
    checkpoint = read_checkpoint(tmp_path / "run" / "last.pt")
    _, model = model_from_checkpoint(checkpoint)
    histogram = num_atoms_distribution(checkpoint)
    training = load_splits(config, ("train",), show_progress=False)["train"]
    elements = {int(z) for index in range(len(training)) for z in training[index].atom_types}
    torch.manual_seed(0)
    untrained = build_denoiser(config)

    def scores(denoiser, sampling_config):
        """(structurally valid fraction, fraction of atoms of a training element) of 64 generated crystals."""
        crystals = generate(denoiser, sampling_config, histogram, 64, seed=0, show_progress=False)
        atoms = torch.cat([crystal.atom_types for crystal in crystals]).tolist()
        return (sum(map(structurally_valid, crystals)) / len(crystals),
                sum(z in elements for z in atoms) / len(atoms))

    valid, known = scores(model, config)
    assert valid >= 0.75 and known >= 0.9, (valid, known)
    untrained_valid, untrained_known = scores(untrained, config)
    assert untrained_valid <= 0.5 and untrained_known <= 0.5, (untrained_valid, untrained_known)
    unclipped_valid, _ = scores(model, replace(config, sampler=replace(config.sampler, clip_types=False)))
    assert unclipped_valid <= 0.5, unclipped_valid


def generation_checkpoint(path):
    config = generation_config()
    torch.manual_seed(0)
    save_checkpoint(path, config, build_denoiser(config), num_atoms_distribution=[0, 0, 0, 0, 0, 8])
    return path


@pytest.fixture
def quick_scores(monkeypatch):
    """The command's scoring replaced by a count: fingerprinting an untrained model's odd cells takes a minute."""
    from equicsp.evaluation.generation import GenerationReport
    from equicsp.evaluation.generation_metrics import CoverageThresholds

    monkeypatch.setattr("equicsp.cli.generate.score_generated", lambda crystals, *args, **kwargs: GenerationReport(
        {"num_generated": len(crystals)}, [], None, CoverageThresholds(0.2, 4.0)))


def generate_args(source: list[str], out, num: int = 3) -> list[str]:
    return [*source, "--num-samples", str(num), "--out", str(out), "--device", "cpu", "--no-reference", "--processes", "1"]


def test_generate_writes_its_folder_whole_and_replaces_an_earlier_one_only_with_force(tmp_path, capsys, monkeypatch,
                                                                                     quick_scores):
    """A second generation into a folder kept the first one's CIFs beside its summary (6 CIFs, summary says 3), and a
    Ctrl-C while writing left CIFs of one seed beside a summary of another."""
    from equicsp.cli.generate import main

    source = ["--checkpoint", str(generation_checkpoint(tmp_path / "gen.pt"))]
    out = tmp_path / "generated"
    main(generate_args(source, out, num=3))
    with pytest.raises(SystemExit, match=f"error: output folder {out} already holds .*--force"):
        main(generate_args(source, out, num=2))
    main(generate_args(source, out, num=2) + ["--force", "--seed", "1"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_crystals"] == 2 and summary["settings"]["seed"] == 1
    assert len(list((out / "cifs").iterdir())) == summary["cifs_written"] <= 2
    capsys.readouterr()
    import equicsp.cli.generate as command

    real = command.write_generated

    def interrupted_after_the_cifs(crystals, report, folder, settings):
        real(crystals, report, folder, settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "write_generated", interrupted_after_the_cifs)
    with pytest.raises(SystemExit) as stopped:
        main(generate_args(source, out, num=3) + ["--force", "--seed", "2"])
    assert stopped.value.code == 130 and f"interrupted: nothing was written to {out}" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == summary


def test_generate_checks_every_place_it_writes_before_sampling_and_keeps_its_files_when_mlflow_fails(
        tmp_path, monkeypatch, quick_scores):
    """`generate --out <read-only>` sampled everything, then failed with a traceback; a full MLflow store failed only
    once the crystals were scored; a store failing at the very end must leave the files in --out, and say so."""
    from filesystems import full_disk, read_only_disk

    import equicsp.cli.generate as command
    from equicsp.platform import tracking

    def never(*args, **kwargs):
        raise AssertionError("sampled although a place to write to is unusable")

    (tmp_path / "run").mkdir()
    path = generation_checkpoint(tmp_path / "run" / "best.pt")
    real_generate = command.generate
    monkeypatch.setattr(command, "generate", never)
    with read_only_disk(tmp_path / "ro") as ro, pytest.raises(SystemExit, match="Read-only file system"):
        command.main(generate_args(["--checkpoint", str(path)], ro / "out"))
    with full_disk(tmp_path / "store", "3m") as store:
        uri = f"sqlite:///{store / 'mlflow.db'}"
        tracker = tracking.Tracker(uri)
        experiment = tracker.ensure_experiment("equicsp")
        run = tracker.start_training_run(experiment, generation_config(), run_key="gen", run_name="gen")
        tracker.log_artifact(run, path, "checkpoints")
        filler = store / "filler"
        with open(filler, "wb") as handle, pytest.raises(OSError):  # fill the disk to its last block
            while True:
                handle.write(bytes(65536))
                handle.flush()
        with pytest.raises(SystemExit, match=f"error: cannot write to the MLflow store .*no space left on {store}"):
            command.main(generate_args(["--run-id", run, "--tracking-uri", uri], tmp_path / "out"))
        filler.unlink()
        monkeypatch.setattr(command, "generate", real_generate)

        def store_fails(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(command, "log_generation_run", store_fails)
        with pytest.raises(SystemExit, match="could not be logged to MLflow .*No space left on device.*kept in "
                                             f"{tmp_path / 'out'}"):
            command.main(generate_args(["--run-id", run, "--tracking-uri", uri], tmp_path / "out"))
    assert (tmp_path / "out" / "summary.json").exists() and (tmp_path / "out" / "samples.csv").exists()


def test_the_printed_summary_is_a_markdown_table_that_counts_the_crystals_without_a_fingerprint():
    from equicsp.cli.generate import summary_table

    table = summary_table({"num_generated": 50.0, "struct_valid": 0.9, "comp_valid": 0.8, "fingerprint_failures": 41.0})
    header, separator, row = table.splitlines()
    assert separator == "|---|---|---|---|" and header.count("|") == separator.count("|") == row.count("|") == 5
    assert "no fingerprint" in header and row.endswith("| 41 |")


def test_generate_says_what_it_is_about_to_sample_before_it_starts():
    from equicsp.cli.generate import start_line

    config = generation_config(**{"sampler.num_steps": 10, "sampler.step_lr": 1e-6})
    line = start_line(config, build_denoiser(config), 50, "cpu")
    assert line.startswith("generating 50 crystals on cpu: ") and "10 steps at step size 1e-06" in line
