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

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equicsp.config import Config, ConfigError, config_from_dict
from equicsp.data.cache import cache_key, check_cache_writable
from equicsp.data.outputs import check_writable
from equicsp.data.splits import load_splits
from equicsp.engine.checkpoint import read_checkpoint
from equicsp.engine.run_folder import refuse_other_data, resume_differences
from equicsp.engine.training import DDP_SETTINGS, TrainingDiverged, TrainingLoop
from equicsp.evaluation.plots import learning_curve
from equicsp.platform import mlflow_store, tracking
from equicsp.platform.ray_cluster import check_workers_fit, connect_ray


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
            loop.restore(Path(restored) / "last.pt", remedy="choose another --run-name")
        if rank == 0:  # reaches the driver's console where Ray forwards worker output (a joined cluster)
            print(f"resuming from Ray Train's checkpoint at epoch {loop.state.epoch} of {config.optim.epochs}",
                  flush=True)
            if (Path(restored) / "best.pt").exists():
                shutil.copy(Path(restored) / "best.pt", local / "best.pt")
    tracker, run_id = tracking.Tracker(loop_config["tracking_uri"]), loop_config["run_id"]
    logged: set[int] = set()
    if rank == 0:
        import mlflow

        mlflow.set_tracking_uri(tracker.uri)
        mlflow.set_system_metrics_sampling_interval(2)  # MLflow's 10 s would miss a short run altogether
        mlflow.start_run(run_id=run_id, log_system_metrics=loop_config["system_metrics"])  # CPU / memory / GPU
        logged = {step for step, _ in tracker.metric_history(run_id, "train_total")}
        if checkpoint is not None:
            tracker.client.log_metric(run_id, "resumed_from_epoch", loop.state.epoch, step=loop.state.epoch)
    epochs_to_log = tracker.epoch_log(run_id)
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
            tracker.client.set_tag(run_id, tracking.DIVERGED_TAG, diverged)
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


def check_run_name(run_name: str | None) -> None:
    """A ValueError for a run name that is not one plain folder name (Ray makes a folder of it under the storage)."""
    if run_name is None:
        return
    if not run_name.strip() or any(separator in run_name for separator in "/\\") or run_name in (".", ".."):
        raise ValueError(f"--run-name {run_name!r} must be a plain name, without path separators or '..': "
                         "it names the run's folder under the storage path")


def validate_launch(config: Config, options: LaunchOptions) -> tuple[str, str, dict[str, str]]:
    """Every check that can fail before a worker starts, the places the run will write first (the data takes
    longest); returns the tracking URI, the data report (JSON) and the datasets' content keys."""
    if options.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, not {options.num_workers}")
    if config.optim.batch_size % options.num_workers:
        raise ValueError(f"optim.batch_size {config.optim.batch_size} is not divisible by {options.num_workers} workers")
    check_run_name(options.run_name)
    uri = mlflow_store.resolve_tracking_uri(options.tracking_uri)
    mlflow_store.check_reachable(uri)
    mlflow_store.check_writable_store(uri)
    storage = resolve_storage(options.storage_path, "ray")
    if "://" not in storage:
        check_writable(Path(storage), "Ray storage folder")
    check_cache_writable()
    datasets = load_splits(config, ("train", "val"))  # the data exists and parses; warms the cache for the workers
    report = "[" + ",\n".join(dataset.report.to_json() for dataset in datasets.values()) + "]"
    return uri, report, {split: dataset.content_key() for split, dataset in datasets.items()}


def refuse_another_config(tracker: tracking.Tracker, experiment_id: str, run_key: str, config: Config,
                          data_keys: dict[str, str] | None = None) -> None:
    """A ConfigError when run_key names an MLflow run trained with another config (its params) or other data."""
    existing = tracker.find_run(experiment_id, run_key)
    if existing is None:
        return
    source = f"MLflow run {existing.info.run_id} ({existing.info.run_name})"
    differences = resume_differences(existing.data.params, config)
    if differences:
        raise ConfigError(f"{source} was trained with another config ({'; '.join(differences)}); "
                          "choose another --run-name, or relaunch with its config")
    stored_keys = existing.data.tags.get(tracking.DATA_KEYS_TAG)
    if data_keys is not None and stored_keys:
        refuse_other_data(source, json.loads(stored_keys), data_keys, "choose another --run-name")


def resume_note(tracker: tracking.Tracker, run_id: str, run_name: str) -> str:
    """'resuming ...' when the run has trained epochs already (a relaunch), else ''."""
    logged = [step for step, _ in tracker.metric_history(run_id, "train_total")]
    if not logged:
        return ""
    return (f"resuming MLflow run {run_id[:8]} ({run_name}) from its last checkpoint; "
            f"it has logged epochs up to {max(logged)}")


class TrainingInterrupted(Exception):
    """Ctrl-C during a Ray training run; its MLflow run is KILLED, and the same command resumes it."""

    def __init__(self, run_id: str, checkpoints: str):
        super().__init__(f"interrupted: MLflow run {run_id} is marked KILLED; Ray Train keeps its checkpoints in "
                         f"{checkpoints}: run the same command again to resume")
        self.run_id = run_id


def fit_interruptibly(trainer: Any) -> Any:
    """trainer.fit(), which Ctrl-C stops at once.

    In the main thread Ray Train swaps Python's Ctrl-C handler for one that waits until its
    controller aborts, and a controller waiting for its workers' resources does not answer
    (seen: Ctrl-C did nothing for 13 minutes). Fitting in a helper thread leaves Python's
    handler in place: KeyboardInterrupt reaches the caller, and the controller and its workers
    end with this driver's Ray job when the process exits. A Tune trial (not the main thread)
    fits directly: Tune stops its trials itself.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread below
            outcome["error"] = error

    helper = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(timeout=0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def fit_closing_the_run(trainer: Any, tracker: tracking.Tracker, run_id: str, checkpoints: str, in_sweep: bool) -> Any:
    """The fit's result; a fit that fails leaves its MLflow run FAILED, a Ctrl-C leaves it KILLED (never RUNNING).

    In a sweep's trial the sweep closes its runs: a trial that early stopping ends raises here too,
    and its run is KILLED, not FAILED, when the sweep finishes."""
    try:
        return fit_interruptibly(trainer)
    except KeyboardInterrupt:
        tracker.client.set_terminated(run_id, "KILLED")
        raise TrainingInterrupted(run_id, checkpoints) from None
    except Exception:
        if not in_sweep:
            tracker.client.set_terminated(run_id, "FAILED")
        raise


def run_training(config: Config, options: LaunchOptions = LaunchOptions(),
                 check_data: Callable[[dict[str, str]], None] | None = None) -> TrainingResult:
    """Train with Ray Train (DDP) and record the run in MLflow; continues the run when relaunched.

    check_data: called with the datasets' content keys before anything is written (`train --out`'s own check).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer


    uri, data_report, data_keys = validate_launch(config, options)
    tracker = tracking.Tracker(uri)
    if check_data is not None:
        check_data(data_keys)
    callbacks: list[Any] | None = None  # Ray Train's own callbacks; RunConfig's annotation names Tune's
    if options.report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks = [TuneReportCallback()]
    run_name = options.run_name or default_run_name(config)
    storage = resolve_storage(options.storage_path, "ray")
    experiment_id = tracker.ensure_experiment(options.experiment)
    refuse_another_config(tracker, experiment_id, f"{storage}/{run_name}", config, data_keys)
    connect_ray()
    check_workers_fit(options.num_workers, options.use_gpu)  # before the run opens: Ray Train would wait for ever
    run_id = tracker.start_training_run(experiment_id, config, run_key=f"{storage}/{run_name}",
                                        run_name=run_name, parent_run_id=options.parent_run_id,
                                        extra_tags={"num_workers": str(options.num_workers),
                                                    "use_gpu": str(options.use_gpu), **options.extra_tags})
    if not options.report_to_tune:  # a sweep's trials say what they do through its progress lines
        resuming = resume_note(tracker, run_id, run_name)
        if resuming:
            print(resuming, file=sys.stderr, flush=True)
    tracker.client.set_tag(run_id, tracking.DATA_KEYS_TAG, json.dumps(data_keys, sort_keys=True))
    tracker.log_text(run_id, config.to_yaml(), "config.yaml")
    tracker.log_text(run_id, data_report, "data_report.json")
    if tracking.DIVERGED_TAG in tracker.get_run(run_id).data.tags:  # from an earlier launch
        tracker.client.delete_tag(run_id, tracking.DIVERGED_TAG)
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
    result = fit_closing_the_run(trainer, tracker, run_id, f"{storage}/{run_name}", in_sweep=options.report_to_tune)
    diverged = tracker.get_run(run_id).data.tags.get(tracking.DIVERGED_TAG)
    if diverged:
        tracker.client.set_terminated(run_id, "FAILED")
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
            tracker.log_artifact(run_id, checkpoint_dir / name, "checkpoints")
    tracker.log_text(run_id, stored.get("tables_key", "") or "none (CoM-free noising off)", "von_mises_key.txt")
    learning_curve(history, checkpoint_dir / "learning_curve.png", title=run_name)
    tracker.log_artifact(run_id, checkpoint_dir / "learning_curve.png")
    tracker.client.set_terminated(run_id, "FINISHED")
    return TrainingResult(run_id, uri, checkpoint_dir, history)
