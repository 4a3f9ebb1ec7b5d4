"""MLflow: where runs live, what a training run records, and loading a logged model back by run id.

The one module that knows the run layout:
- params: every config field under its `section.field` name;
- tags: preset, objective preset, dataset (and `equicsp.data_dir`, its absolute folder at launch,
  and `equicsp.data_keys`, the content keys of its training and validation crystals),
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
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from equicsp.config import Config
from equicsp.data.crystals import BUNDLED_PREFIX
from equicsp.engine.checkpoint import model_from_checkpoint, read_checkpoint
from equicsp.platform import mlflow_store
from equicsp.platform.mlflow_store import (
    MODEL_TRAINING_VIEW,
    TrackingError,
    artifact_location,
    check_reachable,
    resolve_tracking_uri,
    store_line,
    ui_address,
)

if TYPE_CHECKING:  # for annotations only: mlflow and torch are imported where they are used
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from torch import nn

RUN_KEY_TAG = "equicsp.run_key"
DIVERGED_TAG = "equicsp.diverged"  # why a training run stopped on a non-finite loss
RUN_KEY_HASH_TAG = "equicsp.run_key_hash"
DATA_DIR_TAG = "equicsp.data_dir"
DATA_KEYS_TAG = "equicsp.data_keys"  # a training run's datasets' content keys (JSON): a relaunch on other data is refused
KIND_TAG = "equicsp.kind"  # training | evaluation | sweep
# An evaluation run carries these tags of its training run, so the UI lines it up with the arm it scores.
INHERITED_TAGS = ("preset", "objective_preset", "dataset", "arm", "seed", "equicsp.sweep")
# MLflow 3 opens an experiment on its GenAI pages (traces) unless told it holds model training:
# older 3.x UIs read this experiment tag; 3.17's reads the `workflowType` of the page's URL (run_url).
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_key_hash(run_key: str) -> str:
    return hashlib.sha256(run_key.encode()).hexdigest()


def run_line(run: Run) -> str:
    """'<full id> (<run name>, <status>)': which run a short id picked."""
    return f"{run.info.run_id} ({run.info.run_name}, {run.info.status})"


def evaluation_run_name(training_name: str, tags: dict[str, str], num_samples: int) -> str:
    """A sweep's evaluation is named by the arm it scores first (an arm may sample another arm's model)."""
    if "arm" in tags and "seed" in tags:
        return f"{tags['arm']}-s{tags['seed']}-eval-k{num_samples}-{training_name}"
    return f"eval-{training_name}-k{num_samples}"


RUN_ID_LENGTH = 32  # MLflow run ids are 32 hex digits


@dataclass(frozen=True)
class Tracker:
    """One MLflow store, named by its tracking URI: its runs recorded and read in the layout above.

    One string, so it pickles to Ray workers as the URI itself would. `Tracker.resolve(uri)` is the store
    --tracking-uri names, else the default one."""

    uri: str

    @classmethod
    def resolve(cls, uri: str | None = None) -> Tracker:
        """The store uri names, else $MLFLOW_TRACKING_URI's, else the default one (mlflow_store.resolve_tracking_uri)."""
        return cls(resolve_tracking_uri(uri))

    @property
    def client(self) -> MlflowClient:
        """An MlflowClient of this store."""
        return mlflow_store.client(self.uri)

    def ensure_experiment(self, name: str) -> str:
        """The experiment's id, creating it (driver only: concurrent creation races in SQLite), marked as model training."""
        mlflow_client = self.client
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            return mlflow_client.create_experiment(name, artifact_location=artifact_location(self.uri),
                                                   tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:  # created before the tag, or set in the UI
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI, opened on model training (not GenAI); None when uri has no UI we know."""
        address = ui_address(self.uri)
        if address is None:
            return None
        experiment_id = self.get_run(run_id).info.experiment_id
        return f"{address}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"

    def describe_run(self, run_id: str) -> str:
        """A command's last lines: 'MLflow run <id>: <url>', then store_line (the store, its runs table, how to serve)."""
        url = self.run_url(run_id)
        if url is None:
            return f"MLflow run {run_id} at {self.uri}"
        return f"MLflow run {run_id}: {url}\n  {store_line(self.uri, self.get_run(run_id).info.experiment_id)}"

    def find_run(self, experiment_id: str, run_key: str) -> Run | None:
        """The run recorded under run_key (the resume key), or None.

        Searched by the key's hash (hex digits): the key itself may hold quotes, which MLflow's
        filter strings cannot carry. Runs logged before the hash tag existed are found by the key
        itself when it holds no quote.
        """
        mlflow_client = self.client
        found = mlflow_client.search_runs([experiment_id], max_results=1,
                                          filter_string=f"tags.`{RUN_KEY_HASH_TAG}` = '{run_key_hash(run_key)}'")
        if not found and not any(quote in run_key for quote in "'\"\\"):
            found = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                              max_results=1)
        return found[0] if found and found[0].data.tags.get(RUN_KEY_TAG) == run_key else None

    def log_params(self, run_id: str, params: dict[str, object]) -> None:
        from mlflow.entities import Param

        entries = [Param(name, str(value)) for name, value in params.items()]
        for start in range(0, len(entries), 100):
            self.client.log_batch(run_id, params=entries[start:start + 100])

    def open_keyed_run(self, experiment_id: str, run_key: str, run_name: str, kind: str, tags: dict[str, str],
                       params: dict[str, object], start_time_ms: int | None = None) -> str:
        """The run recorded under run_key, set RUNNING again (a resume), else a new one with these tags and params.

        start_time_ms: when the work began (default: now), for work that is logged once it is done.
        """
        existing = self.find_run(experiment_id, run_key)
        if existing is not None:
            if existing.info.status != "RUNNING":
                self.client.update_run(existing.info.run_id, status="RUNNING")
            if not existing.data.tags.get(RUN_KEY_HASH_TAG):  # a run found by its key alone: searchable by hash from now on
                self.client.set_tag(existing.info.run_id, RUN_KEY_HASH_TAG, run_key_hash(run_key))
            return existing.info.run_id
        tags = {RUN_KEY_TAG: run_key, RUN_KEY_HASH_TAG: run_key_hash(run_key), KIND_TAG: kind, "mlflow.runName": run_name,
                "git_commit": git_commit(), **tags}
        run_id = self.client.create_run(experiment_id, start_time=start_time_ms, tags=tags, run_name=run_name).info.run_id
        self.log_params(run_id, params)
        return run_id

    def start_training_run(self, experiment_id: str, config: Config, run_key: str, run_name: str,
                           parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> str:
        """The run for run_key: the existing one when this key ran before (resume), else a new one."""
        tags = {"preset": config.preset, "objective_preset": config.objective_preset, "dataset": config.data.path,
                **(extra_tags or {})}
        if config.data.path and "://" not in config.data.path and not config.data.path.startswith(BUNDLED_PREFIX):
            # Where a relative data.path pointed at launch: an evaluation started in another folder finds it here.
            tags[DATA_DIR_TAG] = str(Path(config.data.path).expanduser().resolve())
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        return self.open_keyed_run(experiment_id, run_key, run_name, "training", tags, config.flat())

    def start_sweep_run(self, experiment_id: str, run_key: str, run_name: str, params: dict[str, object]) -> str:
        """The sweep's parent run: the existing one when this sweep ran before (a resumed sweep), else a new one."""
        return self.open_keyed_run(experiment_id, run_key, run_name, "sweep", {}, params)

    def mark_unfinished_children_killed(self, parent_run_id: str) -> int:
        """Child runs still RUNNING under a finished parent (trials a scheduler stopped early) become KILLED."""
        mlflow_client = self.client
        experiment_id = self.get_run(parent_run_id).info.experiment_id
        stale = mlflow_client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                                         "and attributes.status = 'RUNNING'")
        for run in stale:
            mlflow_client.set_terminated(run.info.run_id, "KILLED")
        return len(stale)

    def get_run(self, run_id: str) -> Run:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as error:
            raise TrackingError(f"no MLflow run {run_id!r} at {self.uri}: {error.message}") from None

    def resolve_run_id(self, given: str, say: Callable[[str], None] | None = None) -> str:
        """The full id of the run `given` names: a whole id, or a prefix only one run's id starts with (as git takes a
        short commit id: the sweep table prints 8 digits). say (default: stderr) gets one line naming the run a prefix
        meant; an ambiguous prefix lists its candidates in the error."""
        prefix = given.strip().lower()
        if not prefix or any(digit not in "0123456789abcdef" for digit in prefix):
            raise TrackingError(f"{given!r} is not an MLflow run id (hex digits, or the first few of them)")
        check_reachable(self.uri)
        if len(prefix) >= RUN_ID_LENGTH:
            return self.get_run(prefix).info.run_id
        candidates = self.runs_starting_with(prefix)
        if not candidates:
            raise TrackingError(f"no run starts with {given} at {self.uri}")
        if len(candidates) > 1:
            shown = "\n".join(f"  {run_line(run)}" for run in candidates[:10])
            more = f"\n  ... and {len(candidates) - 10} more" if len(candidates) > 10 else ""
            raise TrackingError(f"run id {given} is ambiguous: {len(candidates)} runs start with it; give more digits:\n"
                                f"{shown}{more}")
        (say or (lambda line: print(line, file=sys.stderr)))(f"run {given}: {run_line(candidates[0])}")
        return candidates[0].info.run_id

    def runs_starting_with(self, prefix: str) -> list[Run]:
        """Every active run, in any experiment, whose id starts with prefix (hex digits only: no LIKE wildcards)."""
        from mlflow.entities import ViewType

        mlflow_client = self.client
        experiments = [e.experiment_id for e in mlflow_client.search_experiments(view_type=ViewType.ALL)]
        found: list[Run] = []
        for start in range(0, len(experiments), 100):  # servers cap the experiments of one search
            found += mlflow_client.search_runs(experiments[start:start + 100],
                                               filter_string=f"attributes.run_id LIKE '{prefix}%'", max_results=1000)
        return found

    def find_finished_run(self, parent_run_id: str, run_key: str) -> Run | None:
        """A FINISHED run under parent_run_id's experiment recorded with run_key, or None."""
        run = self.find_run(self.get_run(parent_run_id).info.experiment_id, run_key)
        return run if run is not None and run.info.status == "FINISHED" else None

    def log_evaluation_run(self, training_run_id: str, run_key: str, params: dict[str, object],
                           metrics: dict[str, float], files: list[Path], extra_tags: dict[str, str],
                           start_time_ms: int | None = None) -> str:
        """A child run of the training run holding an evaluation's params, metrics and files.

        The run is created once the evaluation is done; start_time_ms (when it began) gives it its
        real duration in MLflow. An unfinished run left under the same key (an evaluation that was
        interrupted) is reused.
        """
        training = self.get_run(training_run_id)
        tags = {"mlflow.parentRunId": training_run_id,
                **{key: value for key, value in training.data.tags.items() if key in INHERITED_TAGS
                   or key.startswith("switch.")}, **extra_tags}
        run_id = self.open_keyed_run(training.info.experiment_id, run_key,
                                     evaluation_run_name(training.info.run_name, tags, cast(int, params["num_samples"])),
                                     "evaluation", tags, params, start_time_ms)
        self.log_metrics(run_id, metrics)
        for path in files:
            self.log_artifact(run_id, path)
        self.client.set_terminated(run_id, "FINISHED", end_time=int(time.time() * 1000))
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])

    def log_epochs(self, run_id: str, history: list[dict[str, float]]) -> None:
        """Per-epoch metrics, step = epoch (one call for many epochs)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, int(row["epoch"])) for row in history
                   for key, value in row.items() if key != "epoch"]
        mlflow_client = self.client
        for start in range(0, len(metrics), 900):
            mlflow_client.log_batch(run_id, metrics=metrics[start:start + 900])

    def epoch_log(self, run_id: str, interval_s: float = 5.0) -> EpochLog:
        """Epochs' metrics for run_id, sent together at most every interval_s seconds (EpochLog)."""
        return EpochLog(self, run_id, interval_s)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def download_checkpoint(self, run_id: str, folder: Path, artifact: str = CHECKPOINT_ARTIFACT) -> Path:
        """The run's checkpoint file, downloaded into folder; a clear error when the run has none."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        self.get_run(run_id)
        # MLflow draws a progress bar for each download (nine sets in one smoke sweep); `--verbose` sets this to true.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, tracking_uri=self.uri,
                                                       dst_path=str(folder))
        except (MlflowException, OSError) as error:
            raise TrackingError(f"run {run_id} has no {artifact} artifact: {error}") from None
        return Path(local)

    def read_logged_checkpoint(self, run_id: str, artifact: str = CHECKPOINT_ARTIFACT,
                               map_location: str = "cpu") -> dict[str, Any]:
        """A logged run's checkpoint read into memory; the downloaded file is removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="equicsp-") as folder:
            return read_checkpoint(self.download_checkpoint(run_id, Path(folder), artifact), map_location)

    def load_logged_model(self, run_id: str, device: str = "cpu") -> tuple[Config, nn.Module]:
        """(config, model) of a logged training run, by run id alone."""
        return model_from_checkpoint(self.read_logged_checkpoint(run_id, map_location=device), device)


class EpochLog:
    """Epochs' metrics sent to MLflow together, at most every `interval_s` seconds: one request per epoch (7 ms
    into a local SQLite store, a round trip to a tracking server) would hold up a GPU epoch of under 0.1 s."""

    def __init__(self, tracker: Tracker, run_id: str, interval_s: float = 5.0):
        self.tracker, self.run_id, self.interval_s = tracker, run_id, interval_s
        self.pending: list[dict[str, float]] = []
        self.sent_at = time.monotonic()

    def add(self, metrics: dict[str, float]) -> None:
        self.pending.append(metrics)

    def flush(self, force: bool = False) -> None:
        """Send what is pending when forced (a checkpoint, the end) or when interval_s has passed since the last."""
        if self.pending and (force or time.monotonic() - self.sent_at >= self.interval_s):
            self.tracker.log_epochs(self.run_id, self.pending)
            self.pending = []
            self.sent_at = time.monotonic()
