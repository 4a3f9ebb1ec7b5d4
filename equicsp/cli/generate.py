"""`python -m equicsp.generate`: new crystals from a generation model, as CIFs with a summary and metrics.

Draws each crystal's number of atoms from the training distribution, samples types,
coordinates and lattice in batches (GPU when there is one), writes one CIF per crystal, a
per-sample CSV and summary.json, and scores the crystals against the model's test split
(validity, COV-R / COV-P, Wasserstein distances). With `--run-id` the scores are logged as
a child run of the training run, with the CSV and the figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from equicsp.config import COMPILE_SETTINGS, PRECISIONS, ConfigError
from equicsp.data.crystals import DatasetError, load_crystals
from equicsp.data.splits import load_splits, preprocess_options
from equicsp.devices import resolve_device
from equicsp.engine.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from equicsp.engine.sampler import COMPILE_HELP, with_sampler_options
from equicsp.evaluation.csp import ground_truth
from equicsp.evaluation.generation import (
    generate,
    num_atoms_distribution,
    score_generated,
    write_generated,
)
from equicsp.evaluation.generation_metrics import CoverageThresholds, thresholds_for
from equicsp.platform import tracking
from equicsp.platform.logged_evaluation import log_generation_run
from equicsp.platform.tracking import TrackingError


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m equicsp.generate", description=__doc__.split(":", 1)[1].split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a generation checkpoint file")
    source.add_argument("--run-id", help="an MLflow training run of a generation model (its best checkpoint)")
    parser.add_argument("--num", type=int, required=True, help="crystals to generate")
    parser.add_argument("--out", type=Path, required=True, help="folder for cifs/, samples.csv, summary.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, help=COMPILE_HELP)
    parser.add_argument("--batch-size", type=int, help="crystals per sampling batch (default: the model's config)")
    parser.add_argument("--step-lr", type=float, help="Langevin step size (default: the model's config)")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: every timestep)")
    parser.add_argument("--data", help="reference CSV or CIF folder for coverage (default: the model's test split)")
    parser.add_argument("--no-reference", action="store_true", help="validity only: no coverage or distances")
    parser.add_argument("--struct-cutoff", type=float, help="COV structure cut-off (default: the dataset's)")
    parser.add_argument("--comp-cutoff", type=float, help="COV composition cut-off (default: the dataset's)")
    parser.add_argument("--processes", type=int, help="fingerprinting processes (default: every core)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db)")
    return parser.parse_args(argv)


def load_checkpoint(args: argparse.Namespace) -> tuple[dict, str | None]:
    """(the checkpoint, the tracking URI when it came from a run)."""
    if args.checkpoint:
        return read_checkpoint(args.checkpoint), None
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_reachable(uri)
    return tracking.read_logged_checkpoint(uri, args.run_id), uri


def reference_set(args: argparse.Namespace, config):
    """The crystals the generated ones are scored against (--data, else the model's test split), or None."""
    if args.no_reference:
        return None
    if args.data:
        return load_crystals(args.data, preprocess_options(config), show_progress=False)
    return load_splits(config, ("test",), show_progress=False)["test"]


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    try:
        checkpoint, uri = load_checkpoint(args)
        histogram = num_atoms_distribution(checkpoint)
        device = resolve_device(args.device)
        config, model = model_from_checkpoint(checkpoint, device)
        config = with_sampler_options(config, args.step_lr, args.num_steps, args.batch_size, args.compile)
        reference = reference_set(args, config)
        thresholds = thresholds_for(config.preset)
        thresholds = CoverageThresholds(args.struct_cutoff or thresholds.structure,
                                        args.comp_cutoff or thresholds.composition)
        crystals = generate(model, config, histogram, args.num, args.seed, device, args.precision)
    except (ValueError, ConfigError, CheckpointError, DatasetError, TrackingError) as error:
        raise SystemExit(f"error: {error}") from None
    truths = None if reference is None else ground_truth(reference, list(range(len(reference))))
    report = score_generated(crystals, truths, config.preset, thresholds, args.processes)
    settings = {"num": args.num, "seed": args.seed, "step_lr": config.sampler.step_lr,
                "num_steps": config.sampler.num_steps, "precision": args.precision,
                "reference": args.data or ("none" if args.no_reference else "test split"),
                "reference_content": "" if reference is None else reference.content_key()[:16],
                "struct_cutoff": thresholds.structure, "comp_cutoff": thresholds.composition}
    files = write_generated(crystals, report, args.out, settings)
    print(summary_table(report.metrics))
    print(f"CIFs in {files['cifs']}, per-sample table {files['samples']}, summary {files['summary']}", file=sys.stderr)
    if uri is not None:
        run = log_generation_run(uri, args.run_id, settings, report.metrics, files)
        print(f"generation metrics logged as MLflow run {run} (a child of {args.run_id})", file=sys.stderr)


def summary_table(metrics: dict[str, float]) -> str:
    """The paper's Table 6 columns (percentages), with what was computed."""
    columns = [("struct. valid %", "struct_valid", 100), ("comp. valid %", "comp_valid", 100),
               ("COV-R %", "cov_recall", 100), ("COV-P %", "cov_precision", 100),
               ("wdist density", "wdist_density", 1), ("wdist #elements", "wdist_num_elems", 1)]
    shown = [(label, metrics[key] * scale) for label, key, scale in columns if key in metrics]
    return ("| crystals | " + " | ".join(label for label, _ in shown) + " |\n|---" * (len(shown) + 1) + "|\n"
            f"| {int(metrics['num_generated'])} | " + " | ".join(f"{value:.4g}" for _, value in shown) + " |")


if __name__ == "__main__":
    main()
