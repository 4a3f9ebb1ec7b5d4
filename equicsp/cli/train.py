"""`python -m equicsp.train`: training on Ray Train workers logging to MLflow, or `--local` in this process."""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from equicsp.config import ConfigError, add_config_arguments, config_from_arguments
from equicsp.data.crystals import DatasetError
from equicsp.engine.training import TrainingDiverged, train
from equicsp.platform.ray_train import LaunchOptions, run_training
from equicsp.platform.tracking import TrackingError, describe_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m equicsp.train",
        description="Train EquiCSP: Ray Train DDP workers logging to MLflow, or --local for one process.")
    add_config_arguments(parser)
    parser.add_argument("--data", help="dataset folder (train/val/test); same as --data.path")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP); the global batch is split")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db)")
    parser.add_argument("--experiment", default="equicsp", help="MLflow experiment")
    parser.add_argument("--run-name", help="stable name: relaunching with it continues the run")
    parser.add_argument("--storage-path",
                        help="Ray Train storage (shared on a cluster; default $EQUICSP_STORAGE_PATH, else ./runs/ray)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    parser.add_argument("--local", action="store_true", help="train in this process, without Ray or MLflow")
    parser.add_argument("--out", type=Path, default=Path("runs/train"),
                        help="checkpoints and config are also written here (with --local, only here)")
    parser.add_argument("--no-resume", action="store_true", help="--local: start from epoch 0 even if out/last.pt exists")
    args = parser.parse_args(argv)
    if args.data:
        setattr(args, "cfg:data.path", args.data)
    try:
        config = config_from_arguments(args)
        if args.local:
            loop = train(config, args.out, resume=not args.no_resume)
            print(f"done: {loop.state.epoch} epochs, best val loss {loop.state.best_val:.4f}, checkpoints in {args.out}")
            return
        options = LaunchOptions(num_workers=args.num_workers, use_gpu=args.gpu, tracking_uri=args.tracking_uri,
                                experiment=args.experiment, run_name=args.run_name, storage_path=args.storage_path,
                                max_failures=args.max_failures)
        try:
            result = run_training(config, options)
        except TrackingError as error:
            raise SystemExit(f"error: {error}") from None
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("best.pt", "last.pt", "learning_curve.png"):
            if (result.checkpoint_dir / name).exists():
                shutil.copy(result.checkpoint_dir / name, args.out / name)
        (args.out / "config.yaml").write_text(config.to_yaml())
    except (ConfigError, DatasetError, ValueError, TrainingDiverged) as error:
        raise SystemExit(f"error: {error}") from None
    best = min((row["val_total"] for row in result.history), default=math.nan)
    print(f"done: {len(result.history)} epochs, best val loss {best:.4f}; "
          f"{describe_run(result.tracking_uri, result.run_id)}")


if __name__ == "__main__":
    main()
