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
