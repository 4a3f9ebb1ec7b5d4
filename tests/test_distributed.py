"""Ray Train + MLflow: DDP equivalence, a killed worker, the logged run, and errors before any worker starts."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST

from equicsp.cli.train import main as train_main
from equicsp.config import make_config
from equicsp.engine.checkpoint import read_checkpoint
from equicsp.engine.sampler import Sampler
from equicsp.model.diffusion import Diffusion
from equicsp.platform import tracking
from equicsp.platform.ray_train import LaunchOptions, resolve_storage, run_training


@pytest.fixture
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def ray_session_that_kills_a_worker(tmp_path):
    """Ray whose workers carry the fault-injection hook: rank 0 dies abruptly after epoch 25, once."""
    import ray

    marker = tmp_path / "killed"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"EQUICSP_KILL_WORKER": f"25:{marker}"}})
    yield marker
    ray.shutdown()


def test_ray_storage_is_the_path_given_else_the_environment_else_a_folder_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EQUICSP_STORAGE_PATH", raising=False)
    assert resolve_storage(None, "sweeps") == str(tmp_path.resolve() / "runs" / "sweeps")
    assert resolve_storage("here", "ray") == str(tmp_path.resolve() / "here")
    monkeypatch.setenv("EQUICSP_STORAGE_PATH", "s3://bucket/ray/")
    assert resolve_storage(None, "ray") == "s3://bucket/ray"
    assert resolve_storage("/shared/runs", "ray") == "/shared/runs"


def options(tmp_path, name, **extra):
    return LaunchOptions(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", storage_path=str(tmp_path / "ray"),
                         run_name=name, **extra)


@pytest.mark.slow
def test_two_workers_make_the_same_updates_as_one(ray_session, tiny_data_dir, tmp_path):
    """The global batch split over 2 gloo workers gives the parameters that 1 worker gets from the whole batch."""
    config = make_config("smoke", "equicsp", {**FAST, "data.path": str(tiny_data_dir), "optim.epochs": 3,
                                              "run.checkpoint_every": 3})
    one = run_training(config, options(tmp_path, "one", num_workers=1))
    two = run_training(config, options(tmp_path, "two", num_workers=2))
    state_one = read_checkpoint(one.checkpoint_dir / "last.pt")["model"]
    state_two = read_checkpoint(two.checkpoint_dir / "last.pt")["model"]
    for name, value in state_one.items():
        torch.testing.assert_close(state_two[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert [round(h["val_total"], 5) for h in one.history] == [round(h["val_total"], 5) for h in two.history]


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_resumes_from_its_checkpoint(ray_session_that_kills_a_worker, tiny_data_dir,
                                                                     tmp_path):
    epochs = 40
    config = make_config("smoke", "equicsp", {"data.path": str(tiny_data_dir), "optim.epochs": epochs,
                                              "optim.batch_size": 4, "run.checkpoint_every": 10,
                                              "model.hidden_dim": 64, "model.num_layers": 2})
    result = run_training(config, options(tmp_path, "crash", max_failures=2))
    assert ray_session_that_kills_a_worker.exists(), "the worker was not killed"
    tracker = tracking.Tracker(result.tracking_uri)
    resumed = tracker.metric_history(result.run_id, "resumed_from_epoch")
    assert [epoch for _, epoch in resumed] == [20], "the replacement resumes from the last checkpoint, not epoch 0"
    steps = [step for step, _ in tracker.metric_history(result.run_id, "train_total")]
    assert sorted(steps) == list(range(1, epochs + 1)), "one continuous history, each epoch once"
    runs = tracker.client.search_runs([tracker.ensure_experiment("equicsp")])
    assert len(runs) == 1 and len(result.history) == epochs
    assert any(key.startswith("system/") for key in runs[0].data.metrics), "system metrics"


@pytest.mark.slow
def test_the_mlflow_run_holds_everything_and_the_model_loads_by_run_id(ray_session, tiny_data_dir, tmp_path):
    config = make_config("smoke", "no_vm", {**FAST, "data.path": str(tiny_data_dir), "optim.epochs": 2,
                                            "run.checkpoint_every": 1})
    result = run_training(config, options(tmp_path, "logged"))
    tracker = tracking.Tracker(result.tracking_uri)
    run = tracker.client.get_run(result.run_id)
    assert run.data.params["objective.von_mises"] == "False" and run.data.params["model.hidden_dim"] == "16"
    assert run.data.tags["objective_preset"] == "no_vm" and run.data.tags["git_commit"]
    for key in ("train_total", "train_lattice_noise", "train_coord_noise", "train_coord_score", "train_perm", "val_total", "lr",
                "crystals_per_s", "epoch_time_s"):
        assert [step for step, _ in tracker.metric_history(result.run_id, key)] == [1, 2], key
    artifacts = {a.path for a in tracker.client.list_artifacts(result.run_id)}
    artifacts |= {a.path for a in tracker.client.list_artifacts(result.run_id, "checkpoints")}
    assert {"config.yaml", "von_mises_key.txt", "learning_curve.png", "checkpoints/best.pt",
            "checkpoints/last.pt", "data_report.json"} <= artifacts
    loaded_config, model = tracker.load_logged_model(result.run_id)
    assert loaded_config == config
    crystals = Sampler(model, Diffusion(loaded_config), loaded_config).sample(
        [torch.tensor([38, 22, 8, 8, 8])], 1, show_progress=False)
    assert crystals[0].frac_coords.shape == (5, 3)
    again = run_training(config, options(tmp_path, "logged"))  # relaunch: same MLflow run, nothing trained twice
    assert again.run_id == result.run_id


def test_bad_inputs_fail_before_any_worker_starts(tmp_path, tiny_data_dir, capsys):
    started = time.time()
    with pytest.raises(SystemExit):
        train_main(["--preset", "mp_21"])
    assert "invalid choice: 'mp_21'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--preset", "smoke", "--model.depth", "3"])
    assert "unrecognized arguments: --model.depth" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such|not a folder"):
        train_main(["--preset", "smoke", "--data", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="cannot reach the MLflow tracking server"):
        train_main(["--preset", "smoke", "--data", str(tiny_data_dir), "--tracking-uri", "http://127.0.0.1:9"])
    import ray

    assert not ray.is_initialized() and time.time() - started < 60


def test_a_reused_run_name_with_another_config_is_refused_before_ray_starts(tmp_path, tiny_data_dir):
    import ray

    from equicsp.config import ConfigError

    config = make_config("smoke", "equicsp", {**FAST, "data.path": str(tiny_data_dir), "optim.epochs": 2})
    launch = options(tmp_path, "reused")
    tracker = tracking.Tracker(launch.tracking_uri)
    storage = (tmp_path / "ray").resolve()
    experiment = tracker.ensure_experiment("equicsp")
    run_id = tracker.start_training_run(experiment, config, run_key=f"{storage}/reused", run_name="reused")
    other = make_config("smoke", "diffcsp", {**FAST, "data.path": str(tiny_data_dir), "run.seed": 1})
    with pytest.raises(ConfigError, match=rf"MLflow run {run_id} .*objective_preset equicsp -> diffcsp.*run.seed 0 -> 1"):
        run_training(other, launch)
    tracker.client.set_tag(run_id, tracking.DATA_KEYS_TAG, '{"train": "0123", "val": "4567"}')
    with pytest.raises(ConfigError, match=rf"MLflow run {run_id} .*other data \(the train and val crystals changed"):
        run_training(config, launch)
    assert not ray.is_initialized()
    assert not tracker.client.list_artifacts(run_id), "nothing logged to the other run"


@pytest.mark.slow
def test_a_diverging_ray_run_fails_without_retries_or_a_bad_checkpoint(ray_session, tiny_data_dir, tmp_path):
    from equicsp.engine.training import TrainingDiverged

    config = make_config("smoke", "equicsp", {**FAST, "data.path": str(tiny_data_dir), "optim.epochs": 2,
                                              "optim.lr": 1e6, "run.checkpoint_every": 1})
    with pytest.raises(TrainingDiverged, match="non-finite training loss in epoch 1"):
        run_training(config, options(tmp_path, "diverged"))
    tracker = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = tracker.client.search_runs([tracker.ensure_experiment("equicsp")])
    assert run.info.status == "FAILED" and "epoch 1" in run.data.tags[tracking.DIVERGED_TAG]
    assert "train_total" not in run.data.metrics and not list((tmp_path / "ray").rglob("last.pt"))


def ray_arguments(data_dir, out, *extra):
    overrides = {**FAST, "data.path": str(data_dir), "optim.epochs": 2, "run.checkpoint_every": 2}
    return ["--preset", "smoke", "--out", str(out), *extra,
            *[arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]]


def test_ray_mode_checks_its_out_folder_run_name_and_stores_before_any_work(tmp_path, tiny_data_dir, monkeypatch):
    import ray
    from test_train import drop_last_crystal

    monkeypatch.chdir(tmp_path)  # the default MLflow store and Ray storage
    out = tmp_path / "runs" / "train"
    train_main(["--local", *ray_arguments(tiny_data_dir, out)])
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(SystemExit, match=r"last.pt belongs to a run with another config \(optim.lr 0.001 -> 0.002\); "
                                         r"train into another --out$"):
        train_main(ray_arguments(tiny_data_dir, out, "--optim.lr", "2e-3", "--run-name", "n"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: cannot write to output folder .*file/sub: Not a directory$"):
        train_main(ray_arguments(tiny_data_dir, tmp_path / "file" / "sub"))
    with pytest.raises(SystemExit, match=r"^error: cannot write to the MLflow store .*file is a file, not a folder"):
        train_main(ray_arguments(tiny_data_dir, tmp_path / "other", "--tracking-uri", f"sqlite:///{tmp_path}/file/m.db"))
    with pytest.raises(SystemExit, match=r"^error: cannot write to Ray storage folder .*file: .*file is a file, not a folder"):
        train_main(ray_arguments(tiny_data_dir, tmp_path / "other", "--storage-path", str(tmp_path / "file")))
    for name in ("../../escaped", "a/b", ".."):
        with pytest.raises(SystemExit, match=rf"^error: --run-name '{re.escape(name)}' must be a plain name"):
            train_main(ray_arguments(tiny_data_dir, tmp_path / "other", "--run-name", name))
    drop_last_crystal(tiny_data_dir / "train.csv")
    with pytest.raises(SystemExit, match=r"last.pt was trained on other data \(the train crystals changed since\); "
                                         r"train into another --out$"):
        train_main(ray_arguments(tiny_data_dir, out))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert not ray.is_initialized()
    assert not (tmp_path.parent / "escaped").exists() and not list((tmp_path / "runs" / "ray").iterdir())


def test_ray_mode_refuses_a_read_only_out_before_any_work(tmp_path, tiny_data_dir):
    import ray
    from filesystems import read_only_disk

    with read_only_disk(tmp_path / "ro") as folder:
        with pytest.raises(SystemExit, match=rf"^error: cannot write to output folder {folder}/sub: Read-only file system$"):
            train_main(ray_arguments(tiny_data_dir, folder / "sub", "--storage-path", str(tmp_path / "ray"),
                                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"))
        with pytest.raises(SystemExit, match=rf"^error: cannot write to the MLflow store {folder}: Read-only file system$"):
            train_main(ray_arguments(tiny_data_dir, tmp_path / "out", "--storage-path", str(tmp_path / "ray"),
                                     "--tracking-uri", f"sqlite:///{folder}/mlflow.db"))
    assert not ray.is_initialized()


def train_command(data_dir, tmp_path, *extra):
    from conftest import FAST

    settings = [arg for name, value in {**FAST, "optim.batch_size": 8}.items() for arg in (f"--{name}", str(value))]
    return [sys.executable, "-m", "equicsp.train", "--preset", "smoke", "--data", str(data_dir), *settings,
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "ray"),
            "--out", str(tmp_path / "out"), "--run-name", "r", *extra]


def training_runs(tmp_path):
    tracker = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tracker.client.search_runs([tracker.ensure_experiment("equicsp")])


def test_gpu_training_without_a_gpu_is_one_sentence_before_any_run_opens(tiny_data_dir, tmp_path):
    """Ray Train would wait for the GPU for ever (seen: 13 minutes, the MLflow run left RUNNING)."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a private Ray with no GPU, on any machine
    environment.pop("RAY_ADDRESS", None)
    done = subprocess.run(train_command(tiny_data_dir, tmp_path, "--gpu"), capture_output=True, text=True,
                          timeout=120, env=environment, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: 1 training worker(s) need 1 GPU(s), but the Ray cluster has no GPUs: train without --gpu, "
        "or join a GPU cluster with --address")
    assert "equicsp: started a private Ray on this machine" in done.stderr
    assert training_runs(tmp_path) == [], "no MLflow run was opened"


@pytest.mark.slow
def test_ctrl_c_on_the_driver_stops_training_and_marks_the_run_killed(tiny_data_dir, tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.Tracker(uri).ensure_experiment("equicsp")  # before the driver: two processes creating one store race
    driver = subprocess.Popen(train_command(tiny_data_dir, tmp_path, "--optim.epochs", "100000"), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        deadline = time.time() + 300
        while not any("train_total" in run.data.metrics for run in training_runs(tmp_path)):
            assert driver.poll() is None and time.time() < deadline, driver.communicate()[1][-3000:]
            time.sleep(1)
        os.kill(driver.pid, signal.SIGINT)  # the driver alone, as `kill -INT` sends it
        _, stderr = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    [run] = training_runs(tmp_path)
    assert driver.returncode == 130, stderr[-3000:]
    # Present, not last: a Ray worker's line can reach the console after it, while Ray shuts down.
    assert (f"interrupted: MLflow run {run.info.run_id} is marked KILLED; Ray Train keeps its checkpoints in "
            f"{(tmp_path / 'ray').resolve()}/r: run the same command again to resume") in stderr.splitlines(), \
        stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert run.info.status == "KILLED"


def test_a_relaunched_ray_run_says_it_resumes_and_up_to_which_epoch_it_has_logged(tmp_path):
    from equicsp.platform.ray_train import resume_note

    tracker = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.ensure_experiment("equicsp")
    run_id = tracker.client.create_run(experiment).info.run_id
    assert resume_note(tracker, run_id, "smoke-run") == ""  # a new run
    for epoch in (1, 2, 3):
        tracker.client.log_metric(run_id, "train_total", 1.0, step=epoch)
    assert resume_note(tracker, run_id, "smoke-run") == (f"resuming MLflow run {run_id[:8]} (smoke-run) from its last "
                                                         "checkpoint; it has logged epochs up to 3")
