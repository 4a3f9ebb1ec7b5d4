"""MLflow run layout: keyed runs found again whatever the key holds, real durations, no leftover downloads."""

import pickle
import time

import pytest
import torch
from conftest import FAST

from equicsp.config import make_config
from equicsp.engine.checkpoint import save_checkpoint
from equicsp.model.denoiser import build_denoiser
from equicsp.platform import mlflow_store, tracking


@pytest.fixture
def store(tmp_path):
    tracker = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tracker, tracker.ensure_experiment("equicsp")


@pytest.mark.parametrize("key", ["/home/o'brien/runs/ray/o'brien", 'say "hi"', "back\\slash'", "plain/key"])
def test_a_keyed_run_is_found_again_whatever_its_key_holds(store, key):
    tracker, experiment = store
    first = tracker.open_keyed_run(experiment, key, "o'brien", "training", {}, {"a": 1})
    tracker.client.set_terminated(first, "FINISHED")
    other = tracker.open_keyed_run(experiment, key + "x", "other", "training", {}, {})
    assert tracker.open_keyed_run(experiment, key, "o'brien", "training", {}, {"a": 1}) == first != other
    assert tracker.find_run(experiment, key).data.tags[tracking.RUN_KEY_TAG] == key


def test_runs_logged_before_the_key_hash_are_still_found(store):
    tracker, experiment = store
    old = tracker.client.create_run(experiment, tags={tracking.RUN_KEY_TAG: "/runs/ray/old"}).info.run_id
    assert tracker.open_keyed_run(experiment, "/runs/ray/old", "old", "training", {}, {}) == old
    assert tracker.get_run(old).data.tags[tracking.RUN_KEY_HASH_TAG] == tracking.run_key_hash("/runs/ray/old")


def test_an_evaluation_run_lasts_as_long_as_the_evaluation(store):
    tracker, experiment = store
    training = tracker.open_keyed_run(experiment, "train", "train", "training", {}, {})
    began = int(time.time() * 1000) - 34_000
    run_id = tracker.log_evaluation_run(training, "evaluate:x", {"num_samples": 1}, {"match_rate": 0.5}, [], {},
                                        start_time_ms=began)
    info = tracker.get_run(run_id).info
    assert info.start_time == began and 34_000 <= info.end_time - info.start_time < 60_000


def test_a_downloaded_checkpoint_leaves_no_folder_behind(store, tmp_path, monkeypatch):
    tracker, experiment = store
    config = make_config("smoke", "equicsp", FAST)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", config, build_denoiser(config))
    run_id = tracker.open_keyed_run(experiment, "train", "train", "training", {}, {})
    tracker.log_artifact(run_id, tmp_path / "best.pt", "checkpoints")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    assert tracker.read_logged_checkpoint(run_id)["config"] == config.to_dict()
    loaded_config, _ = tracker.load_logged_model(run_id)
    assert loaded_config == config
    assert list(scratch.iterdir()) == []


def test_experiments_open_on_model_training_and_runs_have_a_url(store, tmp_path):
    tracker, experiment = store
    assert tracker.client.get_experiment(experiment).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = tracker.client.create_experiment("older")  # made before the tag existed
    assert tracker.ensure_experiment("older") == older
    assert tracker.client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    run = tracker.open_keyed_run(experiment, "key", "name", "training", {}, {})
    assert tracker.run_url(run) == \
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run}?workflowType=machine_learning"
    described = tracker.describe_run(run)
    assert described.startswith(f"MLflow run {run}: http://127.0.0.1:5000/") and f"sqlite:///{tmp_path}" in described
    assert mlflow_store.ui_address("http://tracking:5001/") == "http://tracking:5001"


def test_a_tracker_is_its_uri_resolved_once_and_sent_to_ray_workers_as_is(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker = tracking.Tracker.resolve()
    assert tracker == tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}") == tracking.Tracker.resolve(tracker.uri)
    assert pickle.loads(pickle.dumps(tracker)) == tracker
    assert tracking.Tracker.resolve("http://tracking:5000").uri == "http://tracking:5000"


def test_runs_of_a_sweep_are_named_by_arm_and_seed_first():
    from equicsp.sweep.spec import SweepSpec
    from equicsp.sweep.trials import trial_run_name

    assert trial_run_name(SweepSpec(name="ablation-smoke"), "no_pm_vm", 2, "ab12") == "no_pm_vm-s2-ablation-smoke-ab12"
    assert tracking.evaluation_run_name("equicsp-s0-x", {"arm": "no_pm", "seed": "0"}, 1).startswith("no_pm-s0-eval-k1")
    assert tracking.evaluation_run_name("my-run", {}, 5) == "eval-my-run-k5"


def test_epochs_reach_mlflow_together_when_forced_or_when_the_interval_has_passed(store):
    tracker, experiment = store
    run_id = tracker.client.create_run(experiment).info.run_id
    logged = lambda: [step for step, _ in tracker.metric_history(run_id, "train_total")]  # noqa: E731
    epochs = tracker.epoch_log(run_id, interval_s=3600)
    for epoch in (1, 2, 3):
        epochs.add({"epoch": epoch, "train_total": 1.0 / epoch})
        epochs.flush()
    assert logged() == []
    epochs.flush(force=True)
    assert sorted(logged()) == [1, 2, 3]
    epochs.flush(force=True)  # nothing pending: nothing sent twice
    assert sorted(logged()) == [1, 2, 3]
    every_time = tracker.epoch_log(run_id, interval_s=0)
    every_time.add({"epoch": 4, "train_total": 0.25})
    every_time.flush()
    assert sorted(logged()) == [1, 2, 3, 4]


def test_a_run_is_found_by_any_unique_prefix_of_its_id_as_git_finds_a_commit(store):
    tracker, experiment = store
    other_experiment = tracker.ensure_experiment("elsewhere")
    ids = [tracker.client.create_run(e, run_name=f"r{i}").info.run_id
           for i, e in enumerate((experiment, experiment, other_experiment))]
    said = []
    for run_id in ids:
        unique = next(run_id[:n] for n in range(1, 33) if sum(other.startswith(run_id[:n]) for other in ids) == 1)
        assert tracker.resolve_run_id(unique[:max(len(unique), 8)].upper(), said.append) == run_id
    assert len(said) == 3 and ids[2] in said[2] and "r2" in said[2]
    assert tracker.resolve_run_id(ids[0], said.append) == ids[0] and len(said) == 3  # a whole id: nothing to say
    with pytest.raises(tracking.TrackingError, match="no run starts with"):
        tracker.resolve_run_id(next(p for p in ("0", "1", "2", "3", "4") if not any(i.startswith(p) for i in ids)))
    with pytest.raises(tracking.TrackingError, match="not an MLflow run id"):
        tracker.resolve_run_id("26104baf%")


def test_an_ambiguous_prefix_lists_its_candidates(store):
    tracker, experiment = store
    ids = [tracker.client.create_run(experiment, run_name=f"r{i}").info.run_id for i in range(40)]
    shared = max((a[:n] for a in ids for b in ids if a != b for n in range(1, 33) if b.startswith(a[:n])), key=len)
    with pytest.raises(tracking.TrackingError, match="ambiguous") as error:
        tracker.resolve_run_id(shared)
    assert sum(run_id in str(error.value) for run_id in ids) == sum(run_id.startswith(shared) for run_id in ids) >= 2


def test_the_default_store_is_the_same_from_any_folder_and_none_is_created_there(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(mlflow_store.STORE_DIR_ENV, raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    checkout = tracking.Path(tracking.__file__).resolve().parents[2] / "mlflow"
    assert mlflow_store.resolve_tracking_uri() == f"sqlite:///{checkout / 'mlflow.db'}"  # run from the source checkout
    assert list(elsewhere.iterdir()) == []
    monkeypatch.setenv(mlflow_store.STORE_DIR_ENV, str(tmp_path / "mine"))
    assert mlflow_store.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mine' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert mlflow_store.resolve_tracking_uri() == "http://tracking:5000"
    assert mlflow_store.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_an_installed_package_keeps_its_store_in_the_users_data_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(mlflow_store.STORE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setattr(mlflow_store, "__file__", str(tmp_path / "site-packages" / "equicsp" / "platform" / "mlflow_store.py"))
    assert mlflow_store.default_store() == tmp_path / "data" / "equicsp" / "mlflow"


def test_a_described_run_names_its_store_and_the_runs_table_not_the_genai_view(store):
    tracker, experiment = store
    run = tracker.open_keyed_run(experiment, "key", "name", "training", {}, {})
    first, second = tracker.describe_run(run).split("\n")
    assert first.startswith(f"MLflow run {run}: ")
    assert second.strip().startswith(f"store {tracker.uri[len('sqlite:///'):]}, all runs: "
                                     f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning")


def test_downloads_draw_no_progress_bar_unless_asked_for(store, tmp_path, monkeypatch, capfd):
    from equicsp.cli.options import show_library_output

    tracker, experiment = store
    save_checkpoint(tmp_path / "best.pt", make_config("smoke", "equicsp", FAST), build_denoiser(make_config("smoke")))
    run_id = tracker.open_keyed_run(experiment, "train", "train", "training", {}, {})
    tracker.log_artifact(run_id, tmp_path / "best.pt", "checkpoints")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "")  # restored after the test, whatever sets it
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    tracker.read_logged_checkpoint(run_id)
    assert "Downloading artifacts" not in capfd.readouterr().err
    show_library_output(verbose=True)  # --verbose
    tracker.read_logged_checkpoint(run_id)
    assert "Downloading artifacts" in capfd.readouterr().err
