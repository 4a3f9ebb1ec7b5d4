"""MLflow: where runs live, what a training run records, and loading a logged model back by run id.

The one module that knows the run layout:
- params: every config field under its `section.field` name;
- tags: preset, objective preset, dataset (and `equicsp.data_dir`, its absolute folder at launch),
  git commit, `equicsp.run_key` (a stable key that lets a relaunched run continue its MLflow run
  instead of opening a new one) and `equicsp.run_key_hash` (the key's SHA-256, what runs are
  searched by: a key holds user text such as a run name or a folder, which may hold quotes);
- metrics per epoch (step = epoch);
- artifacts: `config.yaml`, `von_mises_key.txt`, `checkpoints/{best,last}.pt`,
  `learning_curve.png`, `data_report.json`.
An evaluation is a child run of its training run (`equicsp.kind` = evaluation) holding the
evaluation's settings as params, the CSP metrics, `per_crystal.csv`, `predictions.zip`,
`summary.json`, `data_report.json` and `evaluation.png`. A sweep is a parent run
(`equicsp.kind` = sweep) whose training runs are its children.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from equicsp.config import Config
from equicsp.data.crystals import BUNDLED_PREFIX
from equicsp.engine.checkpoint import model_from_checkpoint, read_checkpoint

RUN_KEY_TAG = "equicsp.run_key"
DIVERGED_TAG = "equicsp.diverged"  # why a training run stopped on a non-finite loss
RUN_KEY_HASH_TAG = "equicsp.run_key_hash"
DATA_DIR_TAG = "equicsp.data_dir"
KIND_TAG = "equicsp.kind"  # training | evaluation | sweep
# An evaluation run carries these tags of its training run, so the UI lines it up with the arm it scores.
INHERITED_TAGS = ("preset", "objective_preset", "dataset", "arm", "seed", "equicsp.sweep")
# MLflow 3 opens an experiment on its GenAI pages (traces) unless told it holds model training:
# older 3.x UIs read this experiment tag; 3.17's reads the `workflowType` of the page's URL (run_url).
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
UI_PORT = 5000  # where `bash mlflow/serve.sh` serves the default store
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"


class TrackingError(RuntimeError):
    pass


def default_store() -> Path:
    """./mlflow under the working directory: the SQLite database and the artifacts beside it."""
    return Path.cwd().resolve() / "mlflow"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow/mlflow.db (absolute: Ray workers move)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = default_store()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a local SQLite store; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail early and clearly when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(f"cannot reach the MLflow tracking server at {uri}: {error}") from None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it (driver only: concurrent creation races in SQLite), marked as model training."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri),
                                               tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:  # created before the tag, or set in the UI
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def ui_address(uri: str) -> str | None:
    """The MLflow UI showing uri's runs: the server itself, or `bash mlflow/serve.sh`'s address for a local store."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    if uri.startswith("sqlite:///"):
        return f"http://127.0.0.1:{UI_PORT}"
    return None


def serve_hint(uri: str) -> str:
    """How to start the UI that run_url points at ("" for a tracking server, which serves it already)."""
    if not uri.startswith("sqlite:///"):
        return ""
    database = Path(uri[len("sqlite:///"):])
    if database == Path(__file__).resolve().parents[2] / "mlflow" / "mlflow.db" or database == default_store() / "mlflow.db":
        return "bash mlflow/serve.sh"
    return (f"mlflow server --port {UI_PORT} --backend-store-uri {uri} "
            f"--artifacts-destination {database.parent / 'artifacts'}")


def run_url(uri: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, opened on model training (not GenAI); None when uri has no UI we know."""
    address = ui_address(uri)
    if address is None:
        return None
    experiment_id = get_run(uri, run_id).info.experiment_id
    return f"{address}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def describe_run(uri: str, run_id: str) -> str:
    """'MLflow run <id>: <url>' (and how to serve the UI for a local store), for a command's last lines."""
    url = run_url(uri, run_id)
    if url is None:
        return f"MLflow run {run_id} at {uri}"
    hint = serve_hint(uri)
    return f"MLflow run {run_id}: {url}" + (f" (start the UI with `{hint}`)" if hint else "")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_key_hash(run_key: str) -> str:
    return hashlib.sha256(run_key.encode()).hexdigest()


def find_run(uri: str, experiment_id: str, run_key: str):
    """The run recorded under run_key (the resume key), or None.

    Searched by the key's hash (hex digits): the key itself may hold quotes, which MLflow's
    filter strings cannot carry. Runs logged before the hash tag existed are found by the key
    itself when it holds no quote.
    """
    mlflow_client = client(uri)
    found = mlflow_client.search_runs([experiment_id], max_results=1,
                                      filter_string=f"tags.`{RUN_KEY_HASH_TAG}` = '{run_key_hash(run_key)}'")
    if not found and not any(quote in run_key for quote in "'\"\\"):
        found = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                          max_results=1)
    return found[0] if found and found[0].data.tags.get(RUN_KEY_TAG) == run_key else None


def log_params(uri: str, run_id: str, params: dict[str, object]) -> None:
    from mlflow.entities import Param

    entries = [Param(name, str(value)) for name, value in params.items()]
    for start in range(0, len(entries), 100):
        client(uri).log_batch(run_id, params=entries[start:start + 100])


def open_keyed_run(uri: str, experiment_id: str, run_key: str, run_name: str, kind: str, tags: dict[str, str],
                   params: dict[str, object], start_time_ms: int | None = None) -> str:
    """The run recorded under run_key, set RUNNING again (a resume), else a new one with these tags and params.

    start_time_ms: when the work began (default: now), for work that is logged once it is done.
    """
    existing = find_run(uri, experiment_id, run_key)
    if existing is not None:
        if existing.info.status != "RUNNING":
            client(uri).update_run(existing.info.run_id, status="RUNNING")
        if not existing.data.tags.get(RUN_KEY_HASH_TAG):  # a run found by its key alone: searchable by hash from now on
            client(uri).set_tag(existing.info.run_id, RUN_KEY_HASH_TAG, run_key_hash(run_key))
        return existing.info.run_id
    tags = {RUN_KEY_TAG: run_key, RUN_KEY_HASH_TAG: run_key_hash(run_key), KIND_TAG: kind, "mlflow.runName": run_name,
            "git_commit": git_commit(), **tags}
    run_id = client(uri).create_run(experiment_id, start_time=start_time_ms, tags=tags, run_name=run_name).info.run_id
    log_params(uri, run_id, params)
    return run_id


def start_training_run(uri: str, experiment_id: str, config: Config, run_key: str, run_name: str,
                       parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> str:
    """The run for run_key: the existing one when this key ran before (resume), else a new one."""
    tags = {"preset": config.preset, "objective_preset": config.objective_preset, "dataset": config.data.path,
            **(extra_tags or {})}
    if config.data.path and "://" not in config.data.path and not config.data.path.startswith(BUNDLED_PREFIX):
        # Where a relative data.path pointed at launch: an evaluation started in another folder finds it here.
        tags[DATA_DIR_TAG] = str(Path(config.data.path).expanduser().resolve())
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return open_keyed_run(uri, experiment_id, run_key, run_name, "training", tags, config.flat())


def start_sweep_run(uri: str, experiment_id: str, run_key: str, run_name: str, params: dict[str, object]) -> str:
    """The sweep's parent run: the existing one when this sweep ran before (a resumed sweep), else a new one."""
    return open_keyed_run(uri, experiment_id, run_key, run_name, "sweep", {}, params)


def mark_unfinished_children_killed(uri: str, parent_run_id: str) -> int:
    """Child runs still RUNNING under a finished parent (trials a scheduler stopped early) become KILLED."""
    mlflow_client = client(uri)
    experiment_id = get_run(uri, parent_run_id).info.experiment_id
    stale = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                                     "and attributes.status = 'RUNNING'")
    for run in stale:
        mlflow_client.set_terminated(run.info.run_id, "KILLED")
    return len(stale)


def get_run(uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_run(run_id)
    except MlflowException as error:
        raise TrackingError(f"no MLflow run {run_id!r} at {uri}: {error.message}") from None


def find_finished_run(uri: str, parent_run_id: str, run_key: str):
    """A FINISHED run under parent_run_id's experiment recorded with run_key, or None."""
    run = find_run(uri, get_run(uri, parent_run_id).info.experiment_id, run_key)
    return run if run is not None and run.info.status == "FINISHED" else None


def log_evaluation_run(uri: str, training_run_id: str, run_key: str, params: dict[str, object],
                       metrics: dict[str, float], files: list[Path], extra_tags: dict[str, str],
                       start_time_ms: int | None = None) -> str:
    """A child run of the training run holding an evaluation's params, metrics and files.

    The run is created once the evaluation is done; start_time_ms (when it began) gives it its
    real duration in MLflow. An unfinished run left under the same key (an evaluation that was
    interrupted) is reused.
    """
    training = get_run(uri, training_run_id)
    tags = {"mlflow.parentRunId": training_run_id,
            **{key: value for key, value in training.data.tags.items() if key in INHERITED_TAGS
               or key.startswith("switch.")}, **extra_tags}
    run_id = open_keyed_run(uri, training.info.experiment_id, run_key, evaluation_run_name(training.info.run_name, tags,
                                                                                        params["num_samples"]),
                            "evaluation", tags, params, start_time_ms)
    log_metrics(uri, run_id, metrics)
    for path in files:
        log_artifact(uri, run_id, path)
    client(uri).set_terminated(run_id, "FINISHED", end_time=int(time.time() * 1000))
    return run_id


def evaluation_run_name(training_name: str, tags: dict[str, str], num_samples: int) -> str:
    """A sweep's evaluation is named by the arm it scores first (an arm may sample another arm's model)."""
    if "arm" in tags and "seed" in tags:
        return f"{tags['arm']}-s{tags['seed']}-eval-k{num_samples}-{training_name}"
    return f"eval-{training_name}-k{num_samples}"


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])


def log_epochs(uri: str, run_id: str, history: list[dict[str, float]]) -> None:
    """Per-epoch metrics, step = epoch (one call for many epochs)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(row["epoch"])) for row in history
               for key, value in row.items() if key != "epoch"]
    mlflow_client = client(uri)
    for start in range(0, len(metrics), 900):
        mlflow_client.log_batch(run_id, metrics=metrics[start:start + 900])


class EpochLog:
    """Epochs' metrics sent to MLflow together, at most every `interval_s` seconds: one request per epoch (7 ms
    into a local SQLite store, a round trip to a tracking server) would hold up a GPU epoch of under 0.1 s."""

    def __init__(self, uri: str, run_id: str, interval_s: float = 5.0):
        self.uri, self.run_id, self.interval_s = uri, run_id, interval_s
        self.pending: list[dict[str, float]] = []
        self.sent_at = time.monotonic()

    def add(self, metrics: dict[str, float]) -> None:
        self.pending.append(metrics)

    def flush(self, force: bool = False) -> None:
        """Send what is pending when forced (a checkpoint, the end) or when interval_s has passed since the last."""
        if self.pending and (force or time.monotonic() - self.sent_at >= self.interval_s):
            log_epochs(self.uri, self.run_id, self.pending)
            self.pending = []
            self.sent_at = time.monotonic()


def log_artifact(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), artifact_path)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    client(uri).log_text(run_id, text, name)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(uri).get_metric_history(run_id, key)]


def download_checkpoint(uri: str, run_id: str, folder: Path, artifact: str = CHECKPOINT_ARTIFACT) -> Path:
    """The run's checkpoint file, downloaded into folder; a clear error when the run has none."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    get_run(uri, run_id)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, tracking_uri=uri,
                                                   dst_path=str(folder))
    except (MlflowException, OSError) as error:
        raise TrackingError(f"run {run_id} has no {artifact} artifact: {error}") from None
    return Path(local)


def read_logged_checkpoint(uri: str, run_id: str, artifact: str = CHECKPOINT_ARTIFACT,
                           map_location: str = "cpu") -> dict[str, Any]:
    """A logged run's checkpoint read into memory; the downloaded file is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="equicsp-") as folder:
        return read_checkpoint(download_checkpoint(uri, run_id, Path(folder), artifact), map_location)


def load_logged_model(run_id: str, uri: str | None = None, device: str = "cpu"):
    """(config, model) of a logged training run, by run id alone."""
    return model_from_checkpoint(read_logged_checkpoint(resolve_tracking_uri(uri), run_id, map_location=device), device)
