"""The benchmark scripts run on a CPU and write the tables the README quotes."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmarks_training_loop_row_times_warmed_up_epochs_and_the_checkpoints(tmp_path):
    out = tmp_path / "gpu.md"
    subprocess.run([sys.executable, "benchmarks/gpu.py", "--quick", "--only", "TrainingLoop", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    row = next(line for line in out.read_text().splitlines() if line.startswith("| TrainingLoop"))
    assert "with checkpoints as `train` writes them" in row and "of 10 epochs improved" in row
    warm_up = row.split("after the first 2 (")[1].split(")")[0]
    assert len(warm_up.split(", ")) == 2, "CUDA-graph trees record on a function's second call: two warm-up epochs"


def test_the_checkpoint_cost_benchmark_times_both_policies(tmp_path):
    benchmark = runpy.run_path(str(ROOT / "benchmarks" / "checkpoint_cost.py"), run_name="imported")
    out = tmp_path / "checkpoint_cost.md"
    benchmark["main"](["--rounds", "1", "--epochs", "2", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "ms an epoch" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| " + name for name in benchmark["MODES"]]
    writes = {row.split(" | ")[0]: float(row.split(" | ")[3]) for row in rows}
    assert writes["| step_epoch alone"] == 0 < writes["| best.pt after every improving epoch (before)"]


def test_crystals_packed_on_the_gpu_machine_are_matched_here(tmp_path, tiny_csv, tiny_dataset):
    """gpu_sample.py's packed file, read back by gpu_match.py and scored by `evaluate`'s code: the ground truth
    itself, packed as if sampled, matches every crystal it holds at RMSE 0."""
    import json

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        sampling = runpy.run_path(str(ROOT / "benchmarks" / "gpu_sample.py"), run_name="imported")
        matching = runpy.run_path(str(ROOT / "benchmarks" / "gpu_match.py"), run_name="imported")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from equicsp.config import make_config
    from equicsp.engine.sampler import SampledCrystal

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.csv").write_text(tiny_csv.read_text())
    truths = [tiny_dataset[i] for i in range(len(tiny_dataset))]
    crystals = [SampledCrystal(i, 0, d.atom_types, d.frac_coords, d.lengths[0], d.angles[0]) for i, d in enumerate(truths)]
    packed = sampling["pack"](crystals)
    for original, unpacked in zip(crystals, sampling["unpack"](packed)):
        assert all(torch.equal(getattr(original, name), getattr(unpacked, name))
                   for name in ("atom_types", "frac_coords", "lengths", "angles"))
    torch.save({**packed, "config": make_config("smoke").to_dict(), "checkpoint_epoch": 1, "split": "test",
                "data_path": str(tmp_path / "data"), "crystals_key": tiny_dataset.content_key(),
                "num_crystals": len(crystals), "num_samples": 1, "seed": 0, "num_steps": 10, "step_lr": 1e-5,
                "sampling_s": 1.0, "device": "cpu"}, tmp_path / "samples.pt")
    matching["main"]([str(tmp_path / "samples.pt"), "--processes", "1", "--out", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["num_crystals"] == len(crystals) and scores["rmse"] < 1e-6
    assert scores["match_rate"] == scores["valid_rate"] > 0  # with k = 1 a crystal counts only when it is valid


def test_the_evaluation_benchmark_writes_the_matching_table_before_and_after_reducing_once(tmp_path):
    benchmark = runpy.run_path(str(ROOT / "benchmarks" / "evaluation.py"), run_name="imported")
    out = tmp_path / "matching.md"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the fixture CSV is named from the repository's root
    try:
        benchmark["matching_table"](out, ks=(1, 3), crystals=2, repeats=1)
    finally:
        os.chdir(cwd)
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 3"]
    assert all(float(row.split(" | ")[5]) > 0 for row in rows)  # after: pairs/s
