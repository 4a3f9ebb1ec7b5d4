"""Data-parallel scaling of Ray Train training: crystals/s with 1 and 2 workers, and Ray's start-up cost.

    python benchmarks/scaling.py [--out benchmarks/results/scaling.md] [--epochs 6] [--gpu]

Trains the Perov-5 model (4 x 256, full EquiCSP objective, global batch 256) on the bundled
sample. Throughput is the mean over epochs after the first; overhead is the run's wall time
minus the time spent in epochs (Ray start, worker start, data loading, checkpoints, MLflow).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from equicsp.config import make_config
from equicsp.platform.ray_cluster import connect_ray
from equicsp.platform.ray_train import LaunchOptions, run_training


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.md"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="equicsp-scaling-"))
    start = time.perf_counter()
    connect_ray()
    ray_start = time.perf_counter() - start
    rows = []
    for workers in args.workers:
        config = make_config("perov_5", "equicsp", {"optim.epochs": args.epochs, "run.checkpoint_every": args.epochs,
                                                   "optim.batch_size": 256})
        start = time.perf_counter()
        result = run_training(config, LaunchOptions(num_workers=workers, use_gpu=args.gpu,
                                                    tracking_uri=f"sqlite:///{scratch / 'mlflow.db'}",
                                                    storage_path=str(scratch / "ray"), run_name=f"scale-{workers}"))
        wall = time.perf_counter() - start
        later = result.history[1:] or result.history
        rate = sum(h["crystals_per_s"] for h in later) / len(later)
        overhead = wall - sum(h["epoch_time_s"] for h in result.history)
        rows.append(f"| {workers} | {rate:.0f} | {wall:.1f} | {overhead:.1f} |")
        print(rows[-1], flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    report = "\n".join([
        f"# Ray Train data-parallel scaling ({'GPU' if args.gpu else 'CPU, gloo'}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, OMP_NUM_THREADS={threads}", "",
        f"Perov-5 4 x 256, global batch 256, {args.epochs} epochs of the bundled 300-crystal training split. "
        f"ray.init: {ray_start:.1f} s.", "",
        "| workers | crystals/s | run wall time (s) | overhead per run (s) |", "|---|---|---|---|", *rows, ""])
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
