"""Evaluation throughput on Ray: crystals/s for sampling + matching with 1 and 2 workers, and where the time goes;
then StructureMatcher's pairs/s at k = 1 and k = 20, before and after reducing each ground truth once.

    python benchmarks/evaluation.py [--out benchmarks/results/evaluation.md] [--checkpoint best.pt] [--samples 2]
                                    [--matching-out benchmarks/results/matching.md] [--only ray|matching]

Without --checkpoint it first trains the `smoke` model on the bundled sample (in this process),
so the samples are real crystals that the matcher has to work on, not the rubble an untrained
model produces. Every configuration evaluates the same bundled test split with the same seed;
the predictions are identical across worker counts (the table checks the match rates agree).
The matching table is benchmarks/matching.py's (its docstring says how the pairs are drawn), which
also checks that both ways give the same answer on every pair.
"""

from __future__ import annotations

import argparse
import os
import runpy
import tempfile
import time
from pathlib import Path

import torch

from equicsp.config import make_config
from equicsp.data.splits import load_splits
from equicsp.engine.checkpoint import read_checkpoint
from equicsp.engine.training import train
from equicsp.evaluation.csp import EvaluationSettings
from equicsp.platform.ray_cluster import connect_ray
from equicsp.platform.ray_evaluation import evaluate_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation.md"))
    parser.add_argument("--checkpoint", type=Path, help="default: train the smoke preset first")
    parser.add_argument("--samples", type=int, default=2, help="k samples per test composition")
    parser.add_argument("--batch-size", type=int, default=25, help="crystals per sampling batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--matching-out", type=Path, default=Path("benchmarks/results/matching.md"))
    parser.add_argument("--only", choices=("ray", "matching"), help="one of the two tables (default: both)")
    args = parser.parse_args(argv)
    if args.only != "ray":
        matching_table(args.matching_out)
    if args.only != "matching":
        ray_table(args)


def matching_table(out: Path, ks: tuple[int, ...] = (1, 20), crystals: int = 20, repeats: int = 3) -> str:
    """Pairs/s of StructureMatcher.get_rms_dist per pair against the evaluation's reduce-once matching."""
    benchmark = runpy.run_path(str(Path(__file__).with_name("matching.py")), run_name="imported")
    return benchmark["main"](["--k", *map(str, ks), "--crystals", str(crystals), "--repeats", str(repeats),
                              "--out", str(out)])


def ray_table(args: argparse.Namespace) -> None:
    checkpoint_path = args.checkpoint
    train_s = 0.0
    if checkpoint_path is None:
        scratch = Path(tempfile.mkdtemp(prefix="equicsp-eval-bench-"))
        start = time.perf_counter()
        train(make_config("smoke", "equicsp"), scratch, show_progress=False)
        train_s = time.perf_counter() - start
        checkpoint_path = scratch / "best.pt"
    checkpoint = read_checkpoint(checkpoint_path)
    test = load_splits(make_config("smoke", "equicsp"), ("test",), show_progress=False)["test"]
    start = time.perf_counter()
    connect_ray()
    ray_start = time.perf_counter() - start
    # Warm-up: Ray's task workers import pymatgen once; neither row should pay for it.
    evaluate_checkpoint(checkpoint, test, EvaluationSettings(limit=16, workers=1, batch_size=args.batch_size),
                        show_progress=False)
    rows = []
    for workers in args.workers:
        settings = EvaluationSettings(num_samples=args.samples, seed=0, workers=workers, batch_size=args.batch_size)
        evaluation = evaluate_checkpoint(checkpoint, test, settings, show_progress=False)
        work = evaluation.sampling_s + evaluation.matching_s
        total = evaluation.startup_s + work
        rows.append(f"| {workers} | {evaluation.startup_s:.1f} | {evaluation.sampling_s:.1f} | "
                    f"{evaluation.matching_s:.1f} | {total:.1f} | {len(test) / total:.2f} | {len(test) / work:.2f} | "
                    f"{100 * evaluation.sampling_s / work:.0f} % | {100 * evaluation.summary.match_rate:.1f} % |")
        print(rows[-1], flush=True)
    report = "\n".join([
        f"# Evaluation on Ray (CPU), {os.cpu_count()} cores, torch {torch.__version__}", "",
        f"The smoke model ({'trained here in ' + f'{train_s:.0f} s' if train_s else checkpoint_path}), the bundled "
        f"Perov-5 test split ({len(test)} crystals), k = {args.samples}, every timestep, sampling batches of "
        f"{args.batch_size}; one thread per sampling worker; matching in one-CPU Ray tasks over all cores. "
        f"ray.init: {ray_start:.1f} s; one warm-up evaluation first. "
        "Start-up: starting the sampling workers and loading the model; "
        "crystals/s over the total and over sampling + matching alone; sampling share of sampling + matching.", "",
        "| sampling workers | start-up s | sampling s | matching s | total s | crystals/s | crystals/s without "
        "start-up | sampling share | match rate |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""])
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()
