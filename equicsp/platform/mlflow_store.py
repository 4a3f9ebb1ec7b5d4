"""Where MLflow runs are stored and shown: finding the store from any folder, checking it before the work, and the
UI addresses a command prints. equicsp.platform.tracking records and reads the runs in it."""

from __future__ import annotations

import os
import sqlite3
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from equicsp.data.outputs import check_writable

if TYPE_CHECKING:
    from mlflow import MlflowClient

UI_PORT = 5000  # where `bash mlflow/serve.sh` serves the default store
class TrackingError(RuntimeError):
    pass


STORE_DIR_ENV = "EQUICSP_MLFLOW_DIR"
TRACKING_URI_HELP = ("MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db in $EQUICSP_MLFLOW_DIR, "
                     "else in the project's mlflow/, else in ~/.local/share/equicsp/mlflow)")


def default_store() -> Path:
    """The folder of the SQLite database and its artifacts when no URI is given, the same from any working folder:
    $EQUICSP_MLFLOW_DIR, else the checkout's mlflow/ (run from the source, where `bash mlflow/serve.sh` serves it),
    else $XDG_DATA_HOME/equicsp/mlflow (~/.local/share/equicsp/mlflow) for an installed package."""
    chosen = os.environ.get(STORE_DIR_ENV)
    if chosen:
        return Path(chosen).expanduser().resolve()
    checkout = Path(__file__).resolve().parents[2] / "mlflow"
    if (checkout / "serve.sh").is_file():
        return checkout
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "equicsp" / "mlflow"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the SQLite database in default_store() (an absolute path:
    Ray workers change directory)."""
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
    """Fail early and clearly when a tracking server does not answer or a local store cannot be read."""
    database = sqlite_path(uri)
    if database is not None:
        check_readable_database(database)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except (urllib.error.URLError, OSError) as error:
        raise TrackingError(f"cannot reach the MLflow tracking server at {uri}: {error}") from None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local SQLite store, None for a server or another backend."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_readable_database(database: Path) -> None:
    """A truncated or overwritten store is one sentence here, not an SQLAlchemy traceback halfway through a command."""
    if not database.exists():
        return
    try:
        with closing(sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)) as connection:
            verdict = connection.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.OperationalError as error:
        if "locked" in str(error):  # busy with another writer for 30 s: readable, just slow
            return
        verdict = str(error)
    except sqlite3.Error as error:
        verdict = str(error)
    if verdict != "ok":
        raise TrackingError(f"the MLflow store at {database} is unreadable ({verdict}); restore it from a copy, "
                            "or move it away to start a new store")


def check_writable_store(uri: str, experiment_id: str | None = None) -> None:
    """Fail before the work when a local store cannot take a run: its database or the experiment's artifact
    folder read-only or full (a tracking server answers for itself)."""
    database = sqlite_path(uri)
    if database is None:
        return
    try:
        check_writable(database.parent, "the MLflow store")
        if database.exists():
            open(database, "r+b").close()  # a read-only file (or mount) refuses this even to root
        artifacts = artifact_location(uri)
        if experiment_id is not None:
            artifacts = client(uri).get_experiment(experiment_id).artifact_location
        folder = local_folder(artifacts)
        if folder is not None:
            check_writable(folder, "the MLflow artifact store")
    except OSError as error:
        reason = error.strerror if error.filename else str(error)
        raise TrackingError(f"cannot write to the MLflow store at {database}: {reason}"
                            if error.filename else reason) from None


def local_folder(location: str | None) -> Path | None:
    """The folder of a file:// (or plain path) artifact location, None for remote ones."""
    if not location:
        return None
    if location.startswith("file://"):
        return Path(urllib.request.url2pathname(location[len("file://"):]))
    return Path(location) if "://" not in location and ":" not in location.split("/")[0] else None


def client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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
    serve = Path(__file__).resolve().parents[2] / "mlflow" / "serve.sh"
    if serve.is_file() and database == default_store() / "mlflow.db":  # serve.sh serves default_store() too
        script = serve.relative_to(Path.cwd()) if serve.is_relative_to(Path.cwd()) else serve
        return f"bash {script}"
    return (f"mlflow server --port {UI_PORT} --backend-store-uri {uri} "
            f"--artifacts-destination {database.parent / 'artifacts'}")


# MLflow 3.17's UI picks the experiment page's view from the URL's `workflowType`, else from the browser's stored
# choice, which starts as GenAI (an empty traces page here); the experiment tag is not read while that switch exists.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def runs_table_url(uri: str, experiment_id: str) -> str | None:
    """The experiment's table of runs in the MLflow UI (not its GenAI view); None when uri has no UI we know."""
    address = ui_address(uri)
    return None if address is None else f"{address}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


def store_line(uri: str, experiment_id: str) -> str:
    """'store <database or server>, all runs: <runs table url>' and, for a local store, how to start its UI."""
    hint = serve_hint(uri)
    where = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri
    return f"store {where}, all runs: {runs_table_url(uri, experiment_id)}" + (
        f" (start the UI with `{hint}`)" if hint else "")
