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
from equicsp.engine.checkpoint import model_from_checkpoint, read_checkpoint
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
    main(["--checkpoint", str(tmp_path / "run" / "last.pt"), "--num", "6", "--out", str(out), "--device", "cpu",
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
