"""`python -m equicsp.train`: training on Ray Train workers logging to MLflow, or `--local` in this process."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from equicsp.cli.config_arguments import add_config_arguments, config_from_arguments
from equicsp.cli.options import HelpFormatter, examples
from equicsp.config import Config, ConfigError
from equicsp.data.cache import copy_atomically, write_text_atomically
from equicsp.data.crystals import DatasetError
from equicsp.engine.run_folder import OTHER_OUT, RunFolderBusy, check_resumable, check_same_data, claimed_run_folder, kept_epoch
from equicsp.engine.training import TrainingDiverged, train
from equicsp.platform.mlflow_store import TRACKING_URI_HELP
from equicsp.platform.ray_cluster import ADDRESS_HELP, set_ray_address
from equicsp.platform.ray_train import LaunchOptions, TrainingInterrupted, TrainingResult, run_training
from equicsp.platform.tracking import Tracker, TrackingError


def output_folder(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name the folder to train into")
    return Path(text)


def train_here(config: Config, out: Path, resume: bool) -> None:
    """--local: train in this process; a Ctrl-C says what was kept and how to go on."""
    try:
        loop = train(config, out, resume=resume)
    except KeyboardInterrupt:
        epoch = kept_epoch(out)
        kept = (f"{out / 'last.pt'} keeps epoch {epoch}; run the same command again to resume from there"
                if epoch is not None else f"no checkpoint was written to {out} yet")
        print(f"interrupted: {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"done: {loop.state.epoch} epochs, best val loss {loop.state.best_val:.4f}, checkpoints in {out}")


def train_on_ray(config: Config, options: LaunchOptions, out: Path) -> TrainingResult:
    """Ray mode: out is checked like --local's (same config and data, one writer) before any work, then receives
    the run's checkpoints and config."""
    with claimed_run_folder(out):
        check_resumable(config, out, remedy=OTHER_OUT)
        result = run_training(config, options, check_data=lambda keys: check_same_data(out, keys, remedy=OTHER_OUT))
        for name in ("best.pt", "last.pt", "learning_curve.png"):
            if (result.checkpoint_dir / name).exists():
                copy_atomically(result.checkpoint_dir / name, out / name)
        write_text_atomically(config.to_yaml(), out / "config.yaml")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m equicsp.train",
        description="Train EquiCSP: Ray Train DDP workers logging to MLflow, or --local for one process.",
        formatter_class=HelpFormatter,
        epilog=examples("python -m equicsp.train --preset smoke --local            # the bundled sample, minutes on a CPU",
                        "python -m equicsp.train --preset mp_20 --data data/mp_20 --num-workers 4 --gpu",
                        "python -m equicsp.train --preset perov_5 --objective-preset diffcsp --optim.epochs 500"))
    add_config_arguments(parser)
    parser.add_argument("--data", help="dataset folder (train/val/test); same as --data.path")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP); the global batch is split")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--address", help=ADDRESS_HELP)
    parser.add_argument("--tracking-uri", help=TRACKING_URI_HELP)
    parser.add_argument("--experiment", default="equicsp", help="MLflow experiment")
    parser.add_argument("--run-name", help="stable name: relaunching with it continues the run")
    parser.add_argument("--storage-path",
                        help="Ray Train storage (shared on a cluster; default $EQUICSP_STORAGE_PATH, else ./runs/ray)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    parser.add_argument("--local", action="store_true", help="train in this process, without Ray or MLflow")
    parser.add_argument("--out", type=output_folder, default=Path("runs/train"),
                        help="checkpoints and config are also written here (with --local, only here)")
    parser.add_argument("--no-resume", action="store_true", help="--local: start from epoch 0 even if out/last.pt exists")
    args = parser.parse_args(argv)
    set_ray_address(args.address)
    if args.data:
        setattr(args, "cfg:data.path", args.data)
    try:
        config = config_from_arguments(args)
        if args.local:
            train_here(config, args.out, resume=not args.no_resume)
            return
        options = LaunchOptions(num_workers=args.num_workers, use_gpu=args.gpu, tracking_uri=args.tracking_uri,
                                experiment=args.experiment, run_name=args.run_name, storage_path=args.storage_path,
                                max_failures=args.max_failures)
        result = train_on_ray(config, options, args.out)
    except (ConfigError, DatasetError, ValueError, TrainingDiverged, TrackingError, RunFolderBusy, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    except TrainingInterrupted as interrupted:
        print(interrupted, file=sys.stderr)
        raise SystemExit(130) from None
    except KeyboardInterrupt:
        print("interrupted; run the same command again to go on", file=sys.stderr)
        raise SystemExit(130) from None
    best = min((row["val_total"] for row in result.history), default=math.nan)
    print(f"done: {len(result.history)} epochs, best val loss {best:.4f}; "
          f"{Tracker(result.tracking_uri).describe_run(result.run_id)}")


if __name__ == "__main__":
    main()
