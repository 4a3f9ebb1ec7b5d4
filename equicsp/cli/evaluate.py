"""`python -m equicsp.evaluate`: CSP match rate and RMSE of a logged MLflow run or a checkpoint file.

Samples every test composition k times on Ray workers (one per GPU, or CPU workers),
matches the samples against the ground truth with the benchmark protocol (best of k) in
parallel Ray tasks, prints a summary table and, for `--run-id`, logs a child evaluation run
under the training run: metrics, the per-crystal CSV, the predicted CIFs and a figure. `--out`
and the MLflow store are checked before any work; the report reaches `--out` as a whole at the
end (a folder holding files is replaced only with `--force`), and a store that fails at the end
anyway leaves the report in `--out` or, without it, in a folder the error names.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

from equicsp.cli.options import HelpFormatter, add_verbose_argument, examples, show_library_output
from equicsp.config import COMPILE_SETTINGS, PRECISIONS, ConfigError, config_from_dict
from equicsp.data.crystals import CrystalDataset, DatasetError, load_crystals
from equicsp.data.outputs import OutputFolder, interrupted, output_path
from equicsp.data.splits import find_data_folder, load_split, preprocess_options
from equicsp.engine.checkpoint import CheckpointError, read_checkpoint
from equicsp.engine.sampler import COMPILE_HELP
from equicsp.evaluation.cross_matching import METRE_PAIRS
from equicsp.evaluation.csp import Evaluation, EvaluationSettings, add_leakage
from equicsp.evaluation.report import write_report
from equicsp.platform.logged_evaluation import evaluate_logged_run
from equicsp.platform.mlflow_store import TRACKING_URI_HELP, check_reachable
from equicsp.platform.ray_cluster import ADDRESS_HELP, set_ray_address
from equicsp.platform.ray_evaluation import evaluate_checkpoint
from equicsp.platform.tracking import Tracker, TrackingError
from equicsp.task import TUNED_STEP_LR, task_of


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m equicsp.evaluate", description=__doc__.split(":", 1)[1].strip().split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog=examples("python -m equicsp.evaluate --run-id 26104baf",
                        "python -m equicsp.evaluate --run-id 26104baf --num-samples 20 --leakage --out eval/",
                        "python -m equicsp.evaluate --checkpoint runs/train/best.pt --limit 100 --num-steps 200"))
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="sampling precision")
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, help=COMPILE_HELP)
    parser.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--out", type=output_path,
                        help="also write the per-crystal CSV, CIFs, summary and figure here (as a whole, at the end)")
    parser.add_argument("--force", action="store_true", help="replace what --out holds (refused otherwise)")
    parser.add_argument("--leakage", action="store_true",
                        help="also mark test crystals a training crystal of the same reduced composition matches, and "
                             "score the others (needs the model's training split; cached per train/test content)")
    parser.add_argument("--metre-pairs", type=int, default=METRE_PAIRS,
                        help="METRe matches each test crystal with the samples of every other test crystal of its "
                             "reduced composition: left out when that is more pairs than this (0: never)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    show_library_output(args.verbose)
    return args


def summary_table(evaluation: Evaluation) -> str:
    summary = evaluation.summary
    rmse = "n/a" if math.isnan(summary.rmse) else f"{summary.rmse:.4f}"
    return ("| crystals | k | step_lr | match rate | RMSE | valid samples | workers | start-up s | sampling s | "
            "matching s |\n|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {summary.num_crystals} | {summary.num_samples} | {evaluation.config.sampler.step_lr:g} | "
            f"{100 * summary.match_rate:.2f} % | {rmse} | {100 * summary.valid_rate:.1f} % | {evaluation.workers} | "
            f"{evaluation.startup_s:.1f} | {evaluation.sampling_s:.1f} | {evaluation.matching_s:.1f} |"
            + mended_scores_table(evaluation) + leakage_table(evaluation))


def mended_scores_table(evaluation: Evaluation) -> str:
    """The corrected RMSE and METRe (docs/method.md#corrected-rmse, #metre), beside the published headline."""
    summary = evaluation.summary
    number = lambda value, spec: "n/a" if math.isnan(value) else format(value, spec)  # noqa: E731
    return ("\n\n| cRMSE | METRe (%) | METRe RMSE | METRe cRMSE |\n|---|---|---|---|\n"
            f"| {number(summary.crmse, '.4f')} | {number(100 * summary.metre, '.2f')} | "
            f"{number(summary.metre_rmse, '.4f')} | {number(summary.metre_crmse, '.4f')} |")


def leakage_table(evaluation: Evaluation) -> str:
    """Leaked fraction and the scores on unleaked crystals, when the evaluation has them."""
    leakage = evaluation.leakage
    if leakage is None:
        return ""
    rmse = "n/a" if math.isnan(leakage.unleaked_rmse) else f"{leakage.unleaked_rmse:.4f}"
    return ("\n\n| leaked test crystals | unleaked crystals | unleaked match rate | unleaked RMSE |\n|---|---|---|---|\n"
            f"| {100 * leakage.leaked_fraction:.1f} % | {leakage.num_unleaked} | "
            f"{100 * leakage.unleaked_match_rate:.2f} % | {rmse} |")


def evaluate_file(args: argparse.Namespace, settings: EvaluationSettings, output: OutputFolder | None) -> Evaluation:
    checkpoint = read_checkpoint(args.checkpoint)
    config = config_from_dict(checkpoint["config"])
    task_of(config).check_predicts_structures()
    if settings.step_lr is None and TUNED_STEP_LR in checkpoint:  # a sweep searched this model's step size
        settings = replace(settings, step_lr=float(checkpoint[TUNED_STEP_LR]))
        print(f"step_lr {settings.step_lr:g}: the step size a sweep tuned for this checkpoint")

    def model_split(split: str) -> CrystalDataset:
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
    if output:
        with output.writing() as folder:
            files = output.moved(write_report(evaluation, dataset, folder, f"checkpoint {args.checkpoint}"), folder)
        print(f"per-crystal table: {files['per_crystal']}")
    return evaluation


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    set_ray_address(args.address)
    settings = EvaluationSettings(num_samples=args.num_samples, seed=args.seed, limit=args.limit,
                                  workers=args.workers, threads=args.threads, precision=args.precision, step_lr=args.step_lr,
                                  num_steps=args.num_steps, batch_size=args.batch_size, leakage=args.leakage,
                                  compile=args.compile, metre_pairs=args.metre_pairs)
    output = OutputFolder(args.out, args.force) if args.out else None
    try:
        if output:
            output.open()  # checked and held before any work
        if args.run_id:
            tracker = Tracker.resolve(args.tracking_uri)
            check_reachable(tracker.uri)
            args.run_id = tracker.resolve_run_id(args.run_id)
            evaluation = evaluate_logged_run(args.run_id, settings, args.data, args.tracking_uri, output)
        else:
            evaluation = evaluate_file(args, settings, output)
    except KeyboardInterrupt:
        written = f" or written to {args.out} (it keeps what it held)" if args.out else ""
        raise interrupted(f"no evaluation was logged{written}; rerun the same command to evaluate again") from None
    except (ValueError, OSError, ConfigError, CheckpointError, DatasetError, TrackingError) as error:
        raise SystemExit(f"error: {error}") from None
    finally:
        if output:
            output.close()
    print("\n" + summary_table(evaluation))
    if evaluation.summary.matcher_failures:
        print(f"warning: StructureMatcher failed or ran out of time on {evaluation.summary.matcher_failures} valid "
              "sample(s), counted as not matched; the reason column of the per-crystal table says which",
              file=sys.stderr)
    if evaluation.run_id:
        where = Tracker.resolve(args.tracking_uri).describe_run(evaluation.run_id)
        print(f"{'the same evaluation is logged already' if evaluation.reused else 'evaluation logged'} "
              f"(a child of {args.run_id}) as {where}")


if __name__ == "__main__":
    main()
