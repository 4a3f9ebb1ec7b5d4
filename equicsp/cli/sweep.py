"""The command line shared by the sweep scripts in sweeps/: where a sweep runs, and what to override."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from equicsp.cli.options import add_verbose_argument, show_library_output
from equicsp.config import DATASET_PRESETS, ConfigError
from equicsp.platform.mlflow_store import TRACKING_URI_HELP
from equicsp.platform.ray_cluster import ADDRESS_HELP, set_ray_address
from equicsp.platform.tracking import Tracker, TrackingError
from equicsp.sweep.driver import SweepInterrupted, run_sweep
from equicsp.sweep.report import table_markdown
from equicsp.sweep.spec import SweepError, SweepLaunch, SweepSpec


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(DATASET_PRESETS), help="dataset preset (model size, epochs)")
    parser.add_argument("--data", help="dataset folder with train/val/test (on a cluster: a path every node sees)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="fix a config field for every trial (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (cells per arm)")
    parser.add_argument("--trials", type=int, help="Optuna trials per (arm, seed) cell")
    parser.add_argument("--test-samples", type=int, help="k samples per test composition in the final evaluation")
    parser.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA on the validation loss)")
    parser.add_argument("--leakage", action="store_true",
                        help="also score the test crystals no training crystal of the same reduced composition matches")
    parser.add_argument("--task", choices=("csp", "generation"),
                        help="csp: structures of given compositions (default) | generation: ab initio, every arm")
    parser.add_argument("--num-generated", type=int, help="--task generation: crystals each cell's best model generates")
    parser.add_argument("--name", help="sweep name; running the same name again resumes it")
    parser.add_argument("--storage-path",
                        help="Ray storage (default $EQUICSP_STORAGE_PATH, else ./runs/sweeps; shared on a cluster)")
    parser.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    parser.add_argument("--experiment", default="equicsp-sweeps", help="MLflow experiment")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per training run")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default="auto",
                        help="train on GPUs (auto: when the cluster has any)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: as many as fit)")
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--system-metrics", action="store_true",
                        help="log MLflow's system/* metrics (CPU, memory, GPU) in every training run")
    add_verbose_argument(parser)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or "." not in name:
            raise SweepError(f"--set {pair!r}: expected SECTION.FIELD=VALUE")
        overrides[name.strip()] = value.strip()
    return overrides


def apply_arguments(spec: SweepSpec, args: argparse.Namespace) -> SweepSpec:
    """The profile's spec with the command line's choices on top."""
    overrides = {**spec.overrides, **parse_overrides(args.set)}
    if args.data:
        overrides["data.path"] = args.data
    given = lambda value, default: default if value is None else value
    return replace(spec, overrides=overrides, preset=given(args.preset, spec.preset),
                   trials_per_cell=given(args.trials, spec.trials_per_cell),
                   test_samples=given(args.test_samples, spec.test_samples), name=given(args.name, spec.name),
                   task=given(args.task, spec.task), num_generated=given(args.num_generated, spec.num_generated),
                   seeds=tuple(args.seeds) if args.seeds else spec.seeds, asha=True if args.asha else spec.asha,
                   leakage=True if args.leakage else spec.leakage)


def launch_from_arguments(args: argparse.Namespace) -> SweepLaunch:
    """Where the sweep runs: its launch settings, and the Ray cluster it joins (--address, read by connect_ray)."""
    set_ray_address(args.address)
    return SweepLaunch(tracking_uri=args.tracking_uri, experiment=args.experiment,
                       storage_path=args.storage_path,
                       workers_per_trial=args.workers_per_trial,
                       use_gpu={"auto": None, "yes": True, "no": False}[args.gpu], max_concurrent=args.max_concurrent,
                       system_metrics=args.system_metrics, verbose=args.verbose)


def run_from_command_line(spec: SweepSpec, launch: SweepLaunch) -> None:
    """Run the sweep; a sweep that cannot start exits with the reason, before any trial."""
    show_library_output(launch.verbose)
    try:
        result = run_sweep(spec, launch)
    except (SweepError, ConfigError, TrackingError) as error:
        raise SystemExit(f"error: {error}") from None
    except (SweepInterrupted, KeyboardInterrupt):
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    print("\n" + table_markdown(result.table, spec))
    print("the sweep's parent run (its child runs are the training runs, named by arm and seed): "
          f"{Tracker(result.tracking_uri).describe_run(result.parent_run_id)}", file=sys.stderr)
