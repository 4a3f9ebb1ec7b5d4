"""`python -m equicsp.evaluate`: CSP match rate and RMSE of a logged MLflow run or a checkpoint file.

Samples every test composition k times on Ray workers (one per GPU, or CPU workers),
matches the samples against the ground truth with the benchmark protocol (best of k) in
parallel Ray tasks, prints a summary table and, for `--run-id`, logs a child evaluation run
under the training run: metrics, the per-crystal CSV, the predicted CIFs and a figure.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

from equicsp.config import COMPILE_SETTINGS, PRECISIONS, ConfigError, config_from_dict
from equicsp.data.cache import check_writable_folder
from equicsp.data.crystals import DatasetError, load_crystals
from equicsp.data.splits import find_data_folder, load_split, preprocess_options
from equicsp.engine.checkpoint import CheckpointError, read_checkpoint
from equicsp.engine.sampler import COMPILE_HELP
from equicsp.evaluation.csp import Evaluation, EvaluationSettings, add_leakage
from equicsp.evaluation.report import write_report
from equicsp.platform.logged_evaluation import evaluate_logged_run
from equicsp.platform.ray_evaluation import evaluate_checkpoint
from equicsp.platform.tracking import TrackingError, describe_run, resolve_tracking_uri
from equicsp.task import TUNED_STEP_LR


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m equicsp.evaluate",
                                     description=__doc__.split(":", 1)[1].strip().split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="an MLflow training run (its best checkpoint and config)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint file (nothing is logged to MLflow)")
    parser.add_argument("--data", help="test CSV or CIF folder (default: the model's own test split)")
    parser.add_argument("--num-samples", type=int, default=1, help="k samples per composition (best of k)")
    parser.add_argument("--step-lr", type=float,
                        help="Langevin step size (default: the step size a sweep tuned for the model, else the config's)")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: every timestep)")
    parser.add_argument("--batch-size", type=int, help="crystals per sampling batch (default: the model's config)")
    parser.add_argument("--workers", type=int, default=0,
                        help="sampling workers (default: one per GPU, else one per CPU core)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per CPU sampling worker")
    parser.add_argument("--limit", type=int, help="evaluate the first M test crystals only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, help=COMPILE_HELP)
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db)")
    parser.add_argument("--out", type=Path, help="also write the per-crystal CSV, CIFs, summary and figure here")
    parser.add_argument("--leakage", action="store_true",
                        help="also mark test crystals a training crystal of the same reduced composition matches, and "
                             "score the others (needs the model's training split; cached per train/test content)")
    return parser.parse_args(argv)


def summary_table(evaluation: Evaluation) -> str:
    summary = evaluation.summary
    rmse = "n/a" if math.isnan(summary.rmse) else f"{summary.rmse:.4f}"
    return ("| crystals | k | step_lr | match rate | RMSE | valid samples | workers | start-up s | sampling s | "
            "matching s |\n|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {summary.num_crystals} | {summary.num_samples} | {evaluation.config.sampler.step_lr:g} | "
            f"{100 * summary.match_rate:.2f} % | {rmse} | {100 * summary.valid_rate:.1f} % | {evaluation.workers} | "
            f"{evaluation.startup_s:.1f} | {evaluation.sampling_s:.1f} | {evaluation.matching_s:.1f} |"
            + leakage_table(evaluation))


def leakage_table(evaluation: Evaluation) -> str:
    """Leaked fraction and the scores on unleaked crystals, when the evaluation has them."""
    leakage = evaluation.leakage
    if leakage is None:
        return ""
    rmse = "n/a" if math.isnan(leakage.unleaked_rmse) else f"{leakage.unleaked_rmse:.4f}"
    return ("\n\n| leaked test crystals | unleaked crystals | unleaked match rate | unleaked RMSE |\n|---|---|---|---|\n"
            f"| {100 * leakage.leaked_fraction:.1f} % | {leakage.num_unleaked} | "
            f"{100 * leakage.unleaked_match_rate:.2f} % | {rmse} |")


def evaluate_file(args: argparse.Namespace, settings: EvaluationSettings) -> Evaluation:
    if args.out:
        check_writable_folder(args.out)
    checkpoint = read_checkpoint(args.checkpoint)
    config = config_from_dict(checkpoint["config"])
    if settings.step_lr is None and TUNED_STEP_LR in checkpoint:  # a sweep searched this model's step size
        settings = replace(settings, step_lr=float(checkpoint[TUNED_STEP_LR]))
        print(f"step_lr {settings.step_lr:g}: the step size a sweep tuned for this checkpoint")

    def model_split(split: str):
        # A relative data.path is the training's working folder's: look for it under the checkpoint's folders too.
        above = [folder / config.data.path for folder in args.checkpoint.resolve().parents]
        root = find_data_folder(config.data.path, above)
        return load_split(config, split, root)

    dataset = load_crystals(args.data, preprocess_options(config)) if args.data else model_split("test")
    if dataset.report.skipped:
        print(dataset.report.summary())
    evaluation = evaluate_checkpoint(checkpoint, dataset, settings)
    if settings.leakage:
        add_leakage(evaluation, model_split("train"), dataset)
    if args.out:
        files = write_report(evaluation, dataset, args.out)
        print(f"per-crystal table: {files['per_crystal']}")
    return evaluation


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    settings = EvaluationSettings(num_samples=args.num_samples, seed=args.seed, limit=args.limit,
                                  workers=args.workers, threads=args.threads, precision=args.precision, step_lr=args.step_lr,
                                  num_steps=args.num_steps, batch_size=args.batch_size, leakage=args.leakage,
                                  compile=args.compile)
    try:
        if args.run_id:
            evaluation = evaluate_logged_run(args.run_id, settings, args.data, args.tracking_uri, args.out)
        else:
            evaluation = evaluate_file(args, settings)
    except (ValueError, OSError, ConfigError, CheckpointError, DatasetError, TrackingError) as error:
        raise SystemExit(f"error: {error}") from None
    print("\n" + summary_table(evaluation))
    if evaluation.summary.matcher_failures:
        print(f"warning: StructureMatcher failed or ran out of time on {evaluation.summary.matcher_failures} valid "
              "sample(s), counted as not matched; the reason column of the per-crystal table says which",
              file=sys.stderr)
    if evaluation.run_id:
        where = describe_run(resolve_tracking_uri(args.tracking_uri), evaluation.run_id)
        print(f"{'the same evaluation is logged already' if evaluation.reused else 'evaluation logged'} as {where} "
              f"(a child of {args.run_id})")


if __name__ == "__main__":
    main()
