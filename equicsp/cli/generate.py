"""`python -m equicsp.generate`: new crystals from a generation model, as CIFs with a summary and metrics.

Draws each crystal's number of atoms from the training distribution, samples types,
coordinates and lattice in batches (GPU when there is one), writes one CIF per crystal, a
per-sample CSV and summary.json, and scores the crystals against the model's test split
(validity, COV-R / COV-P, Wasserstein distances). With `--run-id` the scores are logged as
a child run of the training run, with the CSV and the figure. Every place written to (`--out`, the
MLflow store) is checked before the sampling; the files reach `--out` together at the end (a
folder holding files is replaced only with `--force`), and stay there when the store fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from equicsp.cli.options import HelpFormatter, add_verbose_argument, deprecated, examples, show_library_output
from equicsp.config import COMPILE_SETTINGS, PRECISIONS, ConfigError
from equicsp.data.crystals import DatasetError, load_crystals
from equicsp.data.outputs import OutputFolder, interrupted, output_path
from equicsp.data.splits import load_splits, preprocess_options
from equicsp.devices import resolve_device
from equicsp.engine.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from equicsp.engine.sampler import COMPILE_HELP, timestep_sequence, with_sampler_options
from equicsp.evaluation.csp import ground_truth
from equicsp.evaluation.generation import (
    generate,
    num_atoms_distribution,
    score_generated,
    write_generated,
)
from equicsp.evaluation.generation_metrics import CoverageThresholds, thresholds_for
from equicsp.platform import mlflow_store, tracking
from equicsp.platform.logged_evaluation import log_generation_run
from equicsp.platform.tracking import TrackingError


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m equicsp.generate", description=__doc__.split(":", 1)[1].split("\n")[0],
        formatter_class=HelpFormatter,
        epilog=examples("python -m equicsp.generate --run-id 26104baf --num-samples 100 --out generated/",
                        "python -m equicsp.generate --checkpoint runs/train/best.pt --num-samples 50 --out generated/ "
                        "--num-steps 200",
                        "python -m equicsp.generate --checkpoint best.pt --num-samples 10 --out quick/ --no-reference"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a generation checkpoint file")
    source.add_argument("--run-id", help="an MLflow training run of a generation model (its best checkpoint)")
    parser.add_argument("--num-samples", type=int, help="crystals to generate (required)")
    parser.add_argument("--num", type=int, dest="num_samples", action=deprecated("--num-samples"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=output_path, required=True,
                        help="folder for cifs/, samples.csv, summary.json, written as a whole at the end")
    parser.add_argument("--force", action="store_true", help="replace what --out holds (refused otherwise)")
    parser.add_argument("--seed", type=int, default=0, help="crystal i's noise is keyed by (seed, i)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="sampling precision")
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, help=COMPILE_HELP)
    parser.add_argument("--batch-size", type=int, help="crystals per sampling batch (default: the model's config)")
    parser.add_argument("--step-lr", type=float, help="Langevin step size (default: the model's config)")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: every timestep)")
    parser.add_argument("--data", help="reference CSV or CIF folder for coverage (default: the model's test split)")
    parser.add_argument("--no-reference", action="store_true", help="validity only: no coverage or distances")
    parser.add_argument("--struct-cutoff", type=float, help="COV structure cut-off (default: the dataset's)")
    parser.add_argument("--comp-cutoff", type=float, help="COV composition cut-off (default: the dataset's)")
    parser.add_argument("--processes", type=int, help="fingerprinting processes (default: every core)")
    parser.add_argument("--tracking-uri", help=mlflow_store.TRACKING_URI_HELP)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    if args.num_samples is None:
        parser.error("the following arguments are required: --num-samples")
    show_library_output(args.verbose)
    return args


def load_checkpoint(args: argparse.Namespace) -> tuple[dict, tracking.Tracker | None]:
    """(the checkpoint, the MLflow store when it came from a run)."""
    if args.checkpoint:
        return read_checkpoint(args.checkpoint), None
    tracker = tracking.Tracker.resolve(args.tracking_uri)
    mlflow_store.check_reachable(tracker.uri)
    args.run_id = tracker.resolve_run_id(args.run_id)
    # The scores are logged into the training run's experiment: a store that cannot take them fails now, not at the end.
    mlflow_store.check_writable_store(tracker.uri, tracker.get_run(args.run_id).info.experiment_id)
    return tracker.read_logged_checkpoint(args.run_id), tracker


def reference_set(args: argparse.Namespace, config):
    """The crystals the generated ones are scored against (--data, else the model's test split), or None."""
    if args.no_reference:
        return None
    if args.data:
        return load_crystals(args.data, preprocess_options(config), show_progress=False)
    return load_splits(config, ("test",), show_progress=False)["test"]


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    output = OutputFolder(args.out, args.force)
    try:
        generate_into(args, output)
    except KeyboardInterrupt:
        raise interrupted(f"nothing was written to {args.out} (it keeps what it held) and nothing logged; "
                          "rerun the same command to generate again") from None
    finally:
        output.close()


def generate_into(args: argparse.Namespace, output: OutputFolder) -> None:
    """Check every place written to, generate and score, write the files into output at once, then log them."""
    try:
        output.open()  # checked and held before the sampling, whose results would be lost
        checkpoint, tracker = load_checkpoint(args)
        histogram = num_atoms_distribution(checkpoint)
        device = resolve_device(args.device)
        config, model = model_from_checkpoint(checkpoint, device)
        config = with_sampler_options(config, args.step_lr, args.num_steps, args.batch_size, args.compile)
        reference = reference_set(args, config)
        thresholds = thresholds_for(config.preset)
        thresholds = CoverageThresholds(args.struct_cutoff or thresholds.structure,
                                        args.comp_cutoff or thresholds.composition)
        print(start_line(config, model, args.num_samples, device), file=sys.stderr)
        crystals = generate(model, config, histogram, args.num_samples, args.seed, device, args.precision)
    except (ValueError, OSError, ConfigError, CheckpointError, DatasetError, TrackingError) as error:
        raise SystemExit(f"error: {error}") from None
    truths = None if reference is None else ground_truth(reference, list(range(len(reference))))
    report = score_generated(crystals, truths, config.preset, thresholds, args.processes)
    settings = {"num": args.num_samples, "seed": args.seed, "step_lr": config.sampler.step_lr,
                "num_steps": config.sampler.num_steps, "precision": args.precision,
                "reference": args.data or ("none" if args.no_reference else "test split"),
                "reference_content": "" if reference is None else reference.content_key()[:16],
                "struct_cutoff": thresholds.structure, "comp_cutoff": thresholds.composition}
    try:
        with output.writing() as folder:
            files = output.moved(write_generated(crystals, report, folder, settings), folder)
    except OSError as error:
        raise SystemExit(f"error: {error}") from None
    print(summary_table(report.metrics))
    print(f"CIFs in {files['cifs']}, per-sample table {files['samples']}, summary {files['summary']}", file=sys.stderr)
    if tracker is not None:
        log_scores(tracker, args, settings, report.metrics, files)


def log_scores(tracker: tracking.Tracker, args: argparse.Namespace, settings: dict, metrics: dict[str, float],
               files: dict[str, Path]) -> None:
    """The scores as a child run of the training run; when the store fails, one sentence saying the files are kept."""
    try:
        run = log_generation_run(tracker, args.run_id, settings, metrics, files)
    except KeyboardInterrupt:
        raise interrupted(f"the files are in {args.out}, but the MLflow run was left unfinished; rerun with --force "
                          "to generate and log again") from None
    except Exception as error:  # MLflow and SQLAlchemy raise many types for a store that fails
        raise SystemExit(f"error: the scores could not be logged to MLflow at {tracker.uri} ({type(error).__name__}: "
                         f"{error}); the generated files are kept in {args.out}") from None
    print(f"generation metrics logged as MLflow run {run} (a child of {args.run_id})", file=sys.stderr)


def summary_table(metrics: dict[str, float]) -> str:
    """The paper's Table 6 columns (percentages), with what was computed."""
    columns = [("struct. valid %", "struct_valid", 100), ("comp. valid %", "comp_valid", 100),
               ("COV-R %", "cov_recall", 100), ("COV-P %", "cov_precision", 100),
               ("wdist density", "wdist_density", 1), ("wdist #elements", "wdist_num_elems", 1)]
    shown = [(label, metrics[key] * scale) for label, key, scale in columns if key in metrics]
    # A crystal without a structure fingerprint (CrystalNN failed) is left out of coverage and distances.
    counts = [("no fingerprint", f"{int(metrics['fingerprint_failures'])}")] if "fingerprint_failures" in metrics else []
    cells = [("crystals", f"{int(metrics['num_generated'])}"), *((label, f"{value:.4g}") for label, value in shown),
             *counts]
    return ("| " + " | ".join(label for label, _ in cells) + " |\n" + "|---" * len(cells) + "|\n"
            "| " + " | ".join(value for _, value in cells) + " |")


def start_line(config, model, num: int, device) -> str:
    """What is about to run, before the minutes of sampling: the model, the steps and the step size."""
    steps = len(timestep_sequence(config.diffusion.timesteps, config.sampler.num_steps))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return (f"generating {num} crystals on {device}: {config.preset} model ({config.model.num_layers} x "
            f"{config.model.hidden_dim}, {parameters / 1e6:.1f} M parameters), {steps} steps at step size "
            f"{config.sampler.step_lr:g}, batches of {min(num, config.sampler.batch_size)}")


if __name__ == "__main__":
    main()
