"""`python -m equicsp.evaluate`: CSP match rate and RMSE of a trained checkpoint on a test set.

Samples every test composition k times, matches the samples against the ground truth with
the benchmark protocol (best of k), prints a summary and writes the per-crystal table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from equicsp.checkpoint import CheckpointError, load_model
from equicsp.csp import run_csp
from equicsp.data import DatasetError, PreprocessOptions, load_crystals
from equicsp.devices import resolve_device
from equicsp.metrics import write_results_csv
from equicsp.sample import with_sampler_options
from equicsp.train import load_splits


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m equicsp.evaluate", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", help="test CSV or CIF folder (default: the checkpoint's own test split)")
    parser.add_argument("--num-samples", type=int, default=1, help="k samples per composition (best of k)")
    parser.add_argument("--step-lr", type=float, help="Langevin step size (default: the checkpoint's config)")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: every timestep)")
    parser.add_argument("--limit", type=int, help="evaluate the first M test crystals only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, help="matching processes (default: all cores)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, help="write per_crystal.csv and summary.json here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    try:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, not {args.num_samples}")
        device = resolve_device(args.device)
        config, model = load_model(args.checkpoint, device)
        config = with_sampler_options(config, args.step_lr, args.num_steps)
        if args.data:
            options = PreprocessOptions(config.data.max_atoms, config.data.niggli, config.data.primitive)
            dataset = load_crystals(args.data, options)
        else:
            dataset = load_splits(config, ("test",))["test"]
    except (ValueError, CheckpointError, DatasetError) as error:
        raise SystemExit(f"error: {error}") from None
    if dataset.report.skipped:
        print(dataset.report.summary())
    start = time.perf_counter()
    result = run_csp(model, config, dataset, args.num_samples, args.seed, args.limit, device, args.precision,
                     args.processes)
    elapsed = time.perf_counter() - start
    summary = result.summary
    rmse = "n/a" if math.isnan(summary.rmse) else f"{summary.rmse:.4f}"
    print(f"\n| crystals | k | step_lr | match rate | RMSE | valid samples | seconds |\n|---|---|---|---|---|---|---|\n"
          f"| {summary.num_crystals} | {args.num_samples} | {config.sampler.step_lr:g} | "
          f"{100 * summary.match_rate:.2f} % | {rmse} | {100 * summary.valid_rate:.1f} % | {elapsed:.1f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_results_csv(result.per_crystal, args.out / "per_crystal.csv")
        record = {**summary.as_dict(), "step_lr": config.sampler.step_lr, "seed": args.seed,
                  "skipped_rows": len(dataset.report.skipped), "seconds": elapsed}
        (args.out / "summary.json").write_text(json.dumps(record, indent=1))
        print(f"per-crystal table: {args.out / 'per_crystal.csv'}")


if __name__ == "__main__":
    main()
