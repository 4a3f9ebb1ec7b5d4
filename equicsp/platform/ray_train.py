"""Ray Train around the library's training loop: DDP on CPU (gloo) or GPU (nccl) workers, MLflow, retries.

The driver validates everything, opens (or finds) the MLflow run and starts a TorchTrainer;
each worker runs `TrainingLoop`, the same loop as single-process training. Rank 0 logs each
epoch to MLflow and reports a checkpoint (last.pt and best.pt) every `run.checkpoint_every`
epochs. A worker that dies is replaced and the group resumes from the latest checkpoint;
epochs that MLflow already holds are not logged twice, so the run keeps one history.
Relaunching the same command (same run name and storage path) continues the same run; a
relaunch whose config differs from the run's params (beyond `RESUMABLE_FIELDS`) is refused
before Ray starts. A diverged loop (`TrainingDiverged`) ends every worker without a checkpoint
and without a retry (it would diverge again); rank 0 records why in the run's
`tracking.DIVERGED_TAG`, and the driver marks the run FAILED and raises the error.
Ray Train (and Tune, inside a sweep) hears of the run at each checkpoint; MLflow of every epoch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equicsp.config import Config, ConfigError, config_from_dict, resume_differences
from equicsp.data.cache import cache_key
from equicsp.data.splits import load_splits
from equicsp.engine.checkpoint import read_checkpoint
from equicsp.engine.training import DDP_SETTINGS, TrainingDiverged, TrainingLoop
from equicsp.evaluation.plots import learning_curve
from equicsp.platform import tracking


@dataclass(frozen=True)
class LaunchOptions:
    num_workers: int = 1
    use_gpu: bool = False
    tracking_uri: str | None = None
    experiment: str = "equicsp"
    run_name: str | None = None  # default: preset, objective preset, seed and a hash of the config
    storage_path: str | None = None  # default $EQUICSP_STORAGE_PATH, else ./runs/ray (shared storage on a cluster)
    max_failures: int = 3
    parent_run_id: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    report_to_tune: bool = False  # inside a Ray Tune trial: forward every epoch's metrics to Tune
    system_metrics: bool = True  # MLflow's system/* metrics (CPU, memory, GPU) every 2 s while training


@dataclass
class TrainingResult:
    run_id: str
    tracking_uri: str
    checkpoint_dir: Path  # holds best.pt and last.pt
    history: list[dict[str, float]]


def default_run_name(config: Config) -> str:
    return f"{config.preset}-{config.objective_preset}-seed{config.run.seed}-{cache_key(config.to_dict())[:8]}"


def resolve_storage(storage_path: str | None, default_folder: str) -> str:
    """Where Ray keeps runs: the path given, else $EQUICSP_STORAGE_PATH, else ./runs/<default_folder>.

    A local path is made absolute (Ray's workers run in other directories); a URI (s3://, gs://) is kept.
    """
    path = storage_path or os.environ.get("EQUICSP_STORAGE_PATH") or str(Path.cwd() / "runs" / default_folder)
    if "://" in path:
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def connect_ray(dashboard: bool = False) -> None:
    """Join a running cluster (`ray submit`, `ray start`) when there is one, else start Ray here; with its
    dashboard only when asked (a sweep with early stopping needs its state API: sweep.cluster), since on a
    laptop its processes take CPU from the training."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    try:
        ray.init(address="auto", logging_level="ERROR")
    except ConnectionError:
        ray.init(logging_level="ERROR", log_to_driver=False, include_dashboard=dashboard)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker function: the library's TrainingLoop under DDP, reporting to Ray and MLflow."""
    import ray.train
    import ray.train.torch


    config = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    datasets = load_splits(config, ("train", "val"), show_progress=False)
    loop = TrainingLoop(config, datasets["train"], datasets["val"], ray.train.torch.get_device(), rank, world_size,
                        wrap_model=lambda model: ray.train.torch.prepare_model(
                            model, parallel_strategy_kwargs=DDP_SETTINGS), show_progress=False)
    local = Path(tempfile.mkdtemp(prefix="equicsp-ckpt-"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as restored:
            loop.restore(Path(restored) / "last.pt")
            if (Path(restored) / "best.pt").exists():
                shutil.copy(Path(restored) / "best.pt", local / "best.pt")
    uri, run_id = loop_config["tracking_uri"], loop_config["run_id"]
    logged: set[int] = set()
    if rank == 0:
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_system_metrics_sampling_interval(2)  # MLflow's 10 s would miss a short run altogether
        mlflow.start_run(run_id=run_id, log_system_metrics=loop_config["system_metrics"])  # CPU / memory / GPU
        logged = {step for step, _ in tracking.metric_history(uri, run_id, "train_total")}
        if checkpoint is not None:
            tracking.client(uri).log_metric(run_id, "resumed_from_epoch", loop.state.epoch, step=loop.state.epoch)
    epochs_to_log = tracking.EpochLog(uri, run_id)
    diverged = ""
    while loop.state.epoch < config.optim.epochs:
        try:
            metrics = loop.step_epoch()
        except TrainingDiverged as error:  # every rank sees it: the loss sums are all-reduced
            diverged = str(error)
            break
        epoch = loop.state.epoch
        _injected_failure(epoch, rank)
        due = loop.checkpoint_due()
        if rank == 0:
            if epoch not in logged:  # a retried epoch was logged before the crash: keep one history
                epochs_to_log.add(metrics)
            epochs_to_log.flush(force=due)
        # Ray Train takes one report per worker every few seconds (its controller polls; a second
        # report waits for that), so report at checkpoints only: MLflow has every epoch already.
        if due:
            if rank == 0:
                loop.save_checkpoints(local)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local))
            else:
                ray.train.report(metrics)
    shutil.rmtree(local, ignore_errors=True)
    if rank == 0:
        epochs_to_log.flush(force=True)
        if diverged:
            tracking.client(uri).set_tag(run_id, tracking.DIVERGED_TAG, diverged)
        mlflow.end_run(status="FAILED" if diverged else "FINISHED")


def _injected_failure(epoch: int, rank: int) -> None:
    """Fault injection for recovery tests: $EQUICSP_KILL_WORKER = "EPOCH:MARKER_FILE" makes rank 0
    die abruptly after EPOCH, once (the marker file records that it happened)."""
    spec = os.environ.get("EQUICSP_KILL_WORKER")
    if not spec or rank != 0:
        return
    kill_epoch, marker = spec.split(":", 1)
    if epoch == int(kill_epoch) and not Path(marker).exists():
        Path(marker).write_text(f"killed after epoch {epoch}\n")
        # Ray Train registers a reported checkpoint when its controller next polls (every 2 s): die
        # once the latest one is surely registered, as a crash some time after a checkpoint would.
        time.sleep(3)
        os._exit(1)


def validate_launch(config: Config, options: LaunchOptions) -> tuple[str, str]:
    """Every check that can fail before a worker starts; returns the tracking URI and the data report (JSON)."""

    if options.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, not {options.num_workers}")
    if config.optim.batch_size % options.num_workers:
        raise ValueError(f"optim.batch_size {config.optim.batch_size} is not divisible by {options.num_workers} workers")
    datasets = load_splits(config, ("train", "val"))  # the data exists and parses; warms the cache for the workers
    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    tracking.check_reachable(uri)
    report = "[" + ",\n".join(dataset.report.to_json() for dataset in datasets.values()) + "]"
    return uri, report


def refuse_another_config(uri: str, experiment_id: str, run_key: str, config: Config) -> None:
    """A ConfigError when run_key names an MLflow run trained with another config (its params)."""
    existing = tracking.find_run(uri, experiment_id, run_key)
    if existing is None:
        return
    differences = resume_differences(existing.data.params, config)
    if differences:
        raise ConfigError(f"MLflow run {existing.info.run_id} ({existing.info.run_name}) was trained with another "
                          f"config ({'; '.join(differences)}); choose another --run-name, or relaunch with its config")


def run_training(config: Config, options: LaunchOptions = LaunchOptions()) -> TrainingResult:
    """Train with Ray Train (DDP) and record the run in MLflow; continues the run when relaunched."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer


    uri, data_report = validate_launch(config, options)
    callbacks = None
    if options.report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    run_name = options.run_name or default_run_name(config)
    storage = resolve_storage(options.storage_path, "ray")
    experiment_id = tracking.ensure_experiment(uri, options.experiment)
    refuse_another_config(uri, experiment_id, f"{storage}/{run_name}", config)
    run_id = tracking.start_training_run(uri, experiment_id, config, run_key=f"{storage}/{run_name}",
                                         run_name=run_name, parent_run_id=options.parent_run_id,
                                         extra_tags={"num_workers": str(options.num_workers),
                                                     "use_gpu": str(options.use_gpu), **options.extra_tags})
    tracking.log_text(uri, run_id, config.to_yaml(), "config.yaml")
    tracking.log_text(uri, run_id, data_report, "data_report.json")
    if tracking.DIVERGED_TAG in tracking.get_run(uri, run_id).data.tags:  # from an earlier launch
        tracking.client(uri).delete_tag(run_id, tracking.DIVERGED_TAG)
    connect_ray()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "tracking_uri": uri, "run_id": run_id,
                           "system_metrics": options.system_metrics},
        scaling_config=ray.train.ScalingConfig(num_workers=options.num_workers, use_gpu=options.use_gpu),
        torch_config=TorchConfig(backend="nccl" if options.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    diverged = tracking.get_run(uri, run_id).data.tags.get(tracking.DIVERGED_TAG)
    if diverged:
        tracking.client(uri).set_terminated(run_id, "FAILED")
        raise TrainingDiverged(diverged)
    checkpoint_dir = Path(tempfile.mkdtemp(prefix="equicsp-result-"))
    with result.checkpoint.as_directory() as directory:
        for name in ("best.pt", "last.pt"):
            if (Path(directory) / name).exists():
                shutil.copy(Path(directory) / name, checkpoint_dir / name)

    stored = read_checkpoint(checkpoint_dir / "last.pt")
    history = list(stored.get("history", []))
    for name in ("best.pt", "last.pt"):
        if (checkpoint_dir / name).exists():
            tracking.log_artifact(uri, run_id, checkpoint_dir / name, "checkpoints")
    tracking.log_text(uri, run_id, stored.get("tables_key", "") or "none (CoM-free noising off)", "von_mises_key.txt")
    learning_curve(history, checkpoint_dir / "learning_curve.png", title=run_name)
    tracking.log_artifact(uri, run_id, checkpoint_dir / "learning_curve.png")
    tracking.client(uri).set_terminated(run_id, "FINISHED")
    return TrainingResult(run_id, uri, checkpoint_dir, history)
