"""MLflow run layout: keyed runs found again whatever the key holds, real durations, no leftover downloads."""

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
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, tracking.ensure_experiment(uri, "equicsp")


@pytest.mark.parametrize("key", ["/home/o'brien/runs/ray/o'brien", 'say "hi"', "back\\slash'", "plain/key"])
def test_a_keyed_run_is_found_again_whatever_its_key_holds(store, key):
    uri, experiment = store
    first = tracking.open_keyed_run(uri, experiment, key, "o'brien", "training", {}, {"a": 1})
    tracking.client(uri).set_terminated(first, "FINISHED")
    other = tracking.open_keyed_run(uri, experiment, key + "x", "other", "training", {}, {})
    assert tracking.open_keyed_run(uri, experiment, key, "o'brien", "training", {}, {"a": 1}) == first != other
    assert tracking.find_run(uri, experiment, key).data.tags[tracking.RUN_KEY_TAG] == key


def test_runs_logged_before_the_key_hash_are_still_found(store):
    uri, experiment = store
    old = tracking.client(uri).create_run(experiment, tags={tracking.RUN_KEY_TAG: "/runs/ray/old"}).info.run_id
    assert tracking.open_keyed_run(uri, experiment, "/runs/ray/old", "old", "training", {}, {}) == old
    assert tracking.get_run(uri, old).data.tags[tracking.RUN_KEY_HASH_TAG] == tracking.run_key_hash("/runs/ray/old")


def test_an_evaluation_run_lasts_as_long_as_the_evaluation(store):
    uri, experiment = store
    training = tracking.open_keyed_run(uri, experiment, "train", "train", "training", {}, {})
    began = int(time.time() * 1000) - 34_000
    run_id = tracking.log_evaluation_run(uri, training, "evaluate:x", {"num_samples": 1}, {"match_rate": 0.5}, [], {},
                                         start_time_ms=began)
    info = tracking.get_run(uri, run_id).info
    assert info.start_time == began and 34_000 <= info.end_time - info.start_time < 60_000


def test_a_downloaded_checkpoint_leaves_no_folder_behind(store, tmp_path, monkeypatch):
    uri, experiment = store
    config = make_config("smoke", "equicsp", FAST)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "best.pt", config, build_denoiser(config))
    run_id = tracking.open_keyed_run(uri, experiment, "train", "train", "training", {}, {})
    tracking.log_artifact(uri, run_id, tmp_path / "best.pt", "checkpoints")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    assert tracking.read_logged_checkpoint(uri, run_id)["config"] == config.to_dict()
    loaded_config, _ = tracking.load_logged_model(run_id, uri)
    assert loaded_config == config
    assert list(scratch.iterdir()) == []


def test_experiments_open_on_model_training_and_runs_have_a_url(store, tmp_path):
    uri, experiment = store
    assert tracking.client(uri).get_experiment(experiment).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = tracking.client(uri).create_experiment("older")  # made before the tag existed
    assert tracking.ensure_experiment(uri, "older") == older
    assert tracking.client(uri).get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    run = tracking.open_keyed_run(uri, experiment, "key", "name", "training", {}, {})
    assert tracking.run_url(uri, run) == \
        f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run}?workflowType=machine_learning"
    described = tracking.describe_run(uri, run)
    assert described.startswith(f"MLflow run {run}: http://127.0.0.1:5000/") and f"sqlite:///{tmp_path}" in described
    assert mlflow_store.ui_address("http://tracking:5001/") == "http://tracking:5001"


def test_runs_of_a_sweep_are_named_by_arm_and_seed_first():
    from equicsp.sweep.spec import SweepSpec
    from equicsp.sweep.trials import trial_run_name

    assert trial_run_name(SweepSpec(name="ablation-smoke"), "no_pm_vm", 2, "ab12") == "no_pm_vm-s2-ablation-smoke-ab12"
    assert tracking.evaluation_run_name("equicsp-s0-x", {"arm": "no_pm", "seed": "0"}, 1).startswith("no_pm-s0-eval-k1")
    assert tracking.evaluation_run_name("my-run", {}, 5) == "eval-my-run-k5"


def test_epochs_reach_mlflow_together_when_forced_or_when_the_interval_has_passed(store):
    uri, experiment = store
    run_id = tracking.client(uri).create_run(experiment).info.run_id
    logged = lambda: [step for step, _ in tracking.metric_history(uri, run_id, "train_total")]  # noqa: E731
    epochs = tracking.EpochLog(uri, run_id, interval_s=3600)
    for epoch in (1, 2, 3):
        epochs.add({"epoch": epoch, "train_total": 1.0 / epoch})
        epochs.flush()
    assert logged() == []
    epochs.flush(force=True)
    assert sorted(logged()) == [1, 2, 3]
    epochs.flush(force=True)  # nothing pending: nothing sent twice
    assert sorted(logged()) == [1, 2, 3]
    every_time = tracking.EpochLog(uri, run_id, interval_s=0)
    every_time.add({"epoch": 4, "train_total": 0.25})
    every_time.flush()
    assert sorted(logged()) == [1, 2, 3, 4]


def test_a_run_is_found_by_any_unique_prefix_of_its_id_as_git_finds_a_commit(store):
    uri, experiment = store
    other_experiment = tracking.ensure_experiment(uri, "elsewhere")
    ids = [tracking.client(uri).create_run(e, run_name=f"r{i}").info.run_id
           for i, e in enumerate((experiment, experiment, other_experiment))]
    said = []
    for run_id in ids:
        unique = next(run_id[:n] for n in range(1, 33) if sum(other.startswith(run_id[:n]) for other in ids) == 1)
        assert tracking.resolve_run_id(uri, unique[:max(len(unique), 8)].upper(), said.append) == run_id
    assert len(said) == 3 and ids[2] in said[2] and "r2" in said[2]
    assert tracking.resolve_run_id(uri, ids[0], said.append) == ids[0] and len(said) == 3  # a whole id: nothing to say
    with pytest.raises(tracking.TrackingError, match="no run starts with"):
        tracking.resolve_run_id(uri, next(p for p in ("0", "1", "2", "3", "4") if not any(i.startswith(p) for i in ids)))
    with pytest.raises(tracking.TrackingError, match="not an MLflow run id"):
        tracking.resolve_run_id(uri, "26104baf%")


def test_an_ambiguous_prefix_lists_its_candidates(store):
    uri, experiment = store
    ids = [tracking.client(uri).create_run(experiment, run_name=f"r{i}").info.run_id for i in range(40)]
    shared = max((a[:n] for a in ids for b in ids if a != b for n in range(1, 33) if b.startswith(a[:n])), key=len)
    with pytest.raises(tracking.TrackingError, match="ambiguous") as error:
        tracking.resolve_run_id(uri, shared)
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
    uri, experiment = store
    run = tracking.open_keyed_run(uri, experiment, "key", "name", "training", {}, {})
    first, second = tracking.describe_run(uri, run).split("\n")
    assert first.startswith(f"MLflow run {run}: ")
    assert second.strip().startswith(f"store {uri[len('sqlite:///'):]}, all runs: "
                                     f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning")


def test_downloads_draw_no_progress_bar_unless_asked_for(store, tmp_path, monkeypatch, capfd):
    from equicsp.cli.options import show_library_output

    uri, experiment = store
    save_checkpoint(tmp_path / "best.pt", make_config("smoke", "equicsp", FAST), build_denoiser(make_config("smoke")))
    run_id = tracking.open_keyed_run(uri, experiment, "train", "train", "training", {}, {})
    tracking.log_artifact(uri, run_id, tmp_path / "best.pt", "checkpoints")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "")  # restored after the test, whatever sets it
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    tracking.read_logged_checkpoint(uri, run_id)
    assert "Downloading artifacts" not in capfd.readouterr().err
    show_library_output(verbose=True)  # --verbose
    tracking.read_logged_checkpoint(uri, run_id)
    assert "Downloading artifacts" in capfd.readouterr().err
