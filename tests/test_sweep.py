"""Sweeps: the search space, bad sweeps failing before any trial, the smoke sweep end to end, and resume."""

import csv
import io
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from equicsp.config import ARMS
from equicsp.platform import tracking
from equicsp.sweep.driver import run_sweep
from equicsp.sweep.final import CellResult, best_per_cell
from equicsp.sweep.report import ablation_table, table_markdown
from equicsp.sweep.search import SearchSpace, initial_points
from equicsp.sweep.space import Choice, FloatRange
from equicsp.sweep.spec import SweepError, SweepLaunch, SweepSpec, validate_spec
from equicsp.sweep.step_size import search_metric
from equicsp.sweep.trial_records import FinishedTrial, TrialParams

ROOT = Path(__file__).parent.parent
TINY = ["model.num_layers=1", "model.hidden_dim=16", "model.num_freqs=4", "model.time_dim=8", "optim.epochs=4",
        "optim.batch_size=50", "run.checkpoint_every=2", "diffusion.timesteps=20", "diffusion.von_mises_samples=500",
        "sampler.batch_size=25"]


def test_every_cell_runs_its_trials_and_the_first_uses_the_defaults():
    spec = SweepSpec(name="s", preset="smoke", arms=("equicsp", "no_perm_loss", "diffcsp"), seeds=(0, 3),
                     trials_per_cell=2)
    points = initial_points(spec)
    cells = [(p["arm"], p["run.seed"]) for p in points]
    assert sorted(set(cells)) == sorted((a, s) for a in spec.arms for s in spec.seeds)
    assert all(cells.count(cell) == 2 for cell in set(cells))
    with_weight = [p for p in points if "objective.perm_loss_weight" in p]
    assert {p["arm"] for p in with_weight} == {"equicsp"} and all(p["objective.perm_loss_weight"] == 1.0
                                                                   for p in with_weight)


def test_optuna_searches_the_permutation_weight_only_where_the_arm_has_the_loss():
    spec = SweepSpec(name="s", preset="smoke", space={"objective.perm_loss_weight": FloatRange(0.1, 10, True),
                                                      "optim.lr": FloatRange(1e-4, 1e-2, True)})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = SearchSpace(spec)
    seen = set()
    for _ in range(60):
        trial = study.ask()
        space(trial)
        arm = trial.params["arm"]
        seen.add(arm)
        assert ("objective.perm_loss_weight" in trial.params) == spec.config_for(arm, {}).objective.perm_loss
        assert 1e-4 <= trial.params["optim.lr"] <= 1e-2
        if "objective.perm_loss_weight" in trial.params:
            assert 0.1 <= trial.params["objective.perm_loss_weight"] <= 10
        study.tell(trial, 0.0)
    assert seen == set(spec.trained_arms) == set(ARMS) - {"no_pm", "no_vm"}  # those two sample others' models


def test_arms_that_differ_only_at_sampling_time_share_one_trained_model():
    spec = SweepSpec(name="s", preset="smoke", arms=("no_pm", "equicsp", "no_vm", "no_pm_vm", "diffcsp", "none"))
    assert spec.trained_arms == ("no_pm", "no_vm", "diffcsp", "none")
    assert spec.model_owner("equicsp") == "no_pm" and spec.sharing_arms("no_pm") == ("equicsp",)
    assert spec.sharing_arms("no_vm") == ("no_pm_vm",) and spec.sharing_arms("diffcsp") == ()
    assert {p["arm"] for p in initial_points(spec)} == set(spec.trained_arms)
    separate = SweepSpec(name="s", preset="smoke", arms=spec.arms, share_models=False)
    assert separate.trained_arms == separate.arms


def test_a_sharing_arm_picks_its_best_trial_by_its_own_step_size_search():
    spec = SweepSpec(name="s", preset="smoke", arms=("equicsp", "no_pm"), seeds=(0,))
    trials = [FinishedTrial.from_tune({"config": {"arm": "equicsp", "run.seed": 0}, "training_run_id": run,
                                       "val_match_rate": own, "no_pm/val_match_rate": shared, "tuned_step_lr": 1e-4,
                                       "no_pm/tuned_step_lr": 2e-4})
              for run, own, shared in (("a", 0.5, 0.1), ("b", 0.2, 0.4))]
    chosen = dict(best_per_cell(trials, spec))
    assert chosen["equicsp"].training_run_id == "a" and chosen["no_pm"].training_run_id == "b"


@pytest.mark.parametrize("changes, message", [
    (dict(arms=("equicsp", "no_such_arm")), "unknown arm"),
    (dict(space={"optim.lr": FloatRange(1e-3, 1e-3)}), "search space for optim.lr is empty"),
    (dict(space={"model.hidden_dim": Choice(())}), "search space for model.hidden_dim is empty"),
    (dict(space={}, trials_per_cell=3), "search space is empty for every arm"),
    (dict(space={"model.depth": Choice((1, 2))}), "unknown config field 'model.depth'"),
    (dict(overrides={"optim.epochs": "many"}), "cannot read 'many'"),
    (dict(task="dft"), "task must be one of csp, generation"),
    (dict(overrides={"diffusion.task": "generation"}), "set it with --task"),
    (dict(task="generation", leakage=True), "a generation sweep has none"),
])
def test_a_bad_sweep_is_refused_with_the_reason(changes, message):
    spec = SweepSpec(name="bad", preset="smoke", **changes)
    with pytest.raises(SweepError, match=message):
        validate_spec(spec)


def test_a_missing_dataset_fails_before_any_trial(tmp_path):
    import ray

    ray.init(num_cpus=2, logging_level="ERROR", log_to_driver=False)
    try:
        spec = SweepSpec(name="nodata", preset="smoke", arms=("equicsp",),
                         overrides={"data.path": str(tmp_path / "nowhere")})
        with pytest.raises(SweepError, match="dataset: .*nowhere"):
            run_sweep(spec, SweepLaunch(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                        storage_path=str(tmp_path / "ray")), show_progress=False)
        assert not (tmp_path / "ray" / "nodata").exists(), "no trial started"
    finally:
        ray.shutdown()


def test_early_stopping_is_refused_where_rays_state_api_cannot_free_the_trials_it_stops():
    """ASHA ends a trial together with its Ray Train controller, and Ray Train frees that run's CPUs only once
    its state API (the dashboard) reports the controller dead: without it later trials would wait forever."""
    import ray

    from equicsp.sweep.cluster import check_stopped_trials_are_freed

    spec = SweepSpec(name="asha", preset="smoke", arms=("equicsp",), asha=True)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with pytest.raises(SweepError, match="early stopping .* needs Ray's state API"):
            check_stopped_trials_are_freed(spec, wait_s=0)
        check_stopped_trials_are_freed(replace(spec, asha=False), wait_s=0)  # no trial is stopped: nothing to free
    finally:
        ray.shutdown()
    ray.init(num_cpus=2, logging_level="ERROR", log_to_driver=False)
    try:
        check_stopped_trials_are_freed(spec)
    finally:
        ray.shutdown()


def sweep_command(tmp_path, *extra):
    return [sys.executable, str(ROOT / "sweeps" / "ablation.py"), "--profile", "smoke",
            "--storage-path", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            *[arg for pair in TINY for arg in ("--set", pair)], *extra]


def runs_of_kind(uri, kind):
    tracker = tracking.Tracker(uri)
    experiment = tracker.ensure_experiment("equicsp-sweeps")
    return tracker.client.search_runs([experiment], filter_string=f"tags.`equicsp.kind` = '{kind}'")


def read_artifact_csv(uri, run_id, name):
    import mlflow.artifacts

    text = mlflow.artifacts.load_text(f"{tracking.Tracker(uri).get_run(run_id).info.artifact_uri}/{name}")
    return list(csv.DictReader(io.StringIO(text)))


def finished_training_runs(database: Path) -> int:
    return sum(run.info.status == "FINISHED" for run in runs_of_kind(f"sqlite:///{database}", "training"))


@pytest.mark.slow
def test_the_smoke_ablation_sweep_killed_and_rerun_logs_every_arm_once_and_a_table_that_matches_its_runs(tmp_path):
    """The README's main command, its driver killed after its first trained model and started again: the second
    run resumes the sweep, and what it logs is what an uninterrupted sweep logs (one Ray-heavy run for both).

    Four of the nine arms, each kind once: EquiCSP, an arm that samples EquiCSP's model (no_pm), a projected
    lattice arm with every switch off, and DiffCSP's lattice. Every arm costs the same Ray start-up (a
    training run, a step-size search, a test evaluation: about a minute on 2 cores), and all nine took
    nine minutes of CI.
    """
    arms = ("equicsp", "no_pm", "none", "diffcsp")
    command = sweep_command(tmp_path, "--arms", *arms)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The store exists before the driver starts: this test polls it, and two processes creating a
    # fresh SQLite store at once race in MLflow's migrations.
    tracking.Tracker(uri).ensure_experiment("equicsp-sweeps")
    trained = SweepSpec(name="ablation-smoke", preset="smoke", arms=arms).trained_arms  # no_pm samples EquiCSP's
    log = tmp_path / "first_driver.log"
    with open(log, "w") as output:
        driver = subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.time() + 600
    while finished_training_runs(tmp_path / "mlflow.db") < 1 and time.time() < deadline:
        assert driver.poll() is None, "the sweep ended before it could be killed: " + log.read_text()[-3000:]
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    interrupted_at = finished_training_runs(tmp_path / "mlflow.db")
    assert 1 <= interrupted_at < len(trained), "killed mid-sweep"

    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    progress = log.read_text() + done.stdout
    assert f"trial 1 of {len(trained)} (" in progress and "epoch 4/4" in progress and " left" in progress
    quiet = progress + done.stderr  # quiet by default: the libraries' own chatter only with --verbose
    assert "Configuration for experiment" not in quiet and "A new study created" not in quiet, quiet[-3000:]
    assert "Creating initial MLflow database tables" not in quiet
    assert "| EquiCSP |" in done.stdout and "| DiffCSP |" in done.stdout
    assert "A smoke run tests the machinery, not the method" in done.stdout and "One seed: no spread" in done.stdout
    [parent] = runs_of_kind(uri, "sweep")
    assert f"/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}" in done.stderr
    training = runs_of_kind(uri, "training")
    evaluations = runs_of_kind(uri, "evaluation")
    for run in training + evaluations:  # the UI cuts names: the arm comes first
        assert run.info.run_name.startswith(f"{run.data.tags['arm']}-s0-"), run.info.run_name
    assert not [key for run in training for key in run.data.metrics if key.startswith("system/")]
    assert sorted(run.data.tags["arm"] for run in training) == sorted(trained), "each trained arm once"
    assert all(run.info.status == "FINISHED" for run in training)
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in training)
    assert all("val_total" in run.data.metrics and "tuned_step_lr" in run.data.metrics for run in training)
    tracker = tracking.Tracker(uri)
    for run in training:  # one continuous history per run: every epoch logged once
        steps = [step for step, _ in tracker.metric_history(run.info.run_id, "train_total")]
        assert sorted(steps) == [1, 2, 3, 4], run.data.tags["arm"]
    assert sorted(run.data.tags["arm"] for run in evaluations) == sorted(arms)
    artifacts = {a.path for a in tracker.client.list_artifacts(parent.info.run_id)}
    assert {"ablation_table.md", "ablation_table.csv", "ablation_cells.csv", "ablation_bars.png",
            "learning_curves.png"} <= artifacts
    table = {row["arm"]: row for row in read_artifact_csv(uri, parent.info.run_id, "ablation_table.csv")}
    training_of = {run.data.tags["arm"]: run.info.run_id for run in training}
    evaluated = {run.data.tags["arm"]: run.data.tags["mlflow.parentRunId"] for run in evaluations}
    assert evaluated == {**training_of, "no_pm": training_of["equicsp"]}, "each evaluation under its model's run"
    assert table["no_pm"]["model"] == "shares EquiCSP's" and table["diffcsp"]["model"] == "own"
    for evaluation in evaluations:
        row = table[evaluation.data.tags["arm"]]
        assert float(row["match_rate_mean"]) == pytest.approx(100 * evaluation.data.metrics["match_rate"])
        assert float(row["seeds"]) == 1
        if "rmse" in evaluation.data.metrics:
            assert float(row["rmse_mean"]) == pytest.approx(evaluation.data.metrics["rmse"])
        # the corrected RMSE and METRe, and the bootstrap interval over the evaluation's per-crystal results
        assert float(row["crmse_mean"]) == pytest.approx(evaluation.data.metrics["crmse"])
        assert float(row["metre_mean"]) == pytest.approx(100 * evaluation.data.metrics["metre"])
        assert float(row["match_rate_low"]) <= float(row["match_rate_mean"]) <= float(row["match_rate_high"])
    assert table["equicsp"]["match_rate_diff"] == "nan" and table["diffcsp"]["match_rate_diff"] != "nan"
    logged = tracker.get_run(parent.info.run_id).data.metrics
    assert {"diffcsp/match_rate_low", "diffcsp/match_rate_diff_high", "equicsp/crmse"} <= set(logged)
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_the_smoke_ablation_sweep_for_generation_trains_once_for_two_arms_and_reports_generation_metrics(tmp_path):
    """equicsp and no_pm share one generation model; each arm's generation is a child run, the table shows them."""
    command = sweep_command(tmp_path, "--task", "generation", "--num-generated", "8", "--arms", "equicsp", "no_pm")
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| variant | model | struct. valid (%) | comp. valid (%) | COV-R (%) | COV-P (%) |" in done.stdout
    assert "| w/o probabilistic model | shares EquiCSP's |" in done.stdout and "match rate" not in done.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    [parent] = runs_of_kind(uri, "sweep")
    [training] = runs_of_kind(uri, "training")
    assert "tuned_step_lr" not in training.data.metrics, "no step-size search for generation"
    generations = runs_of_kind(uri, "evaluation")
    assert sorted(run.data.tags["arm"] for run in generations) == ["equicsp", "no_pm"]
    assert all(run.data.tags["mlflow.parentRunId"] == training.info.run_id
               and run.data.tags["equicsp.task"] == "generation" and run.data.metrics["num_generated"] == 8
               for run in generations)
    table = {row["arm"]: row for row in read_artifact_csv(uri, parent.info.run_id, "ablation_table.csv")}
    for run in generations:
        arm = run.data.tags["arm"]
        assert float(table[arm]["struct_valid_mean"]) == pytest.approx(100 * run.data.metrics["struct_valid"])
        assert parent.data.metrics[f"{arm}/struct_valid"] == pytest.approx(run.data.metrics["struct_valid"])
        assert f"{arm}/comp_valid" in parent.data.metrics
    assert parent.info.status == "FINISHED"


def load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sweep_scripts_refuse_bad_input_before_ray_starts(tmp_path, capsys):
    import ray

    ablation, hyperparams = load_script("ablation"), load_script("hyperparams")
    common = ["--storage-path", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    with pytest.raises(SystemExit, match="unknown arm.*'no_such_arm'"):
        ablation.main(["--arms", "equicsp", "no_such_arm", *common])
    with pytest.raises(SystemExit, match="unknown arm.*'nope'"):
        hyperparams.main(["--arm", "nope", *common])
    with pytest.raises(SystemExit, match="unknown config field 'optim.speed'"):
        hyperparams.main(["--set", "optim.speed=3", *common])
    with pytest.raises(SystemExit):
        ablation.main(["--profile", "paper", *common])
    assert "--profile paper trains on a real dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot reach the MLflow tracking server"):
        ablation.main(["--tracking-uri", "http://127.0.0.1:9", "--storage-path", str(tmp_path / "ray")])
    assert not ray.is_initialized()
    # Every profile is a sweep that validates (its arms, space and config fields exist).
    for module in (ablation, hyperparams):
        for profile in module.PROFILES.values():
            validate_spec(profile)


def test_the_paper_profile_samples_as_the_reference_codes_do():
    """No clamp of the implied clean lattice or types: the reference codes' reverse step, CSP and generation."""
    paper = load_script("ablation").PROFILES["paper"]
    for task in ("csp", "generation"):
        for arm in ("equicsp", "diffcsp"):
            sampler = replace(paper, task=task).config_for(arm, {}).sampler
            assert not sampler.clip_lattice and not sampler.clip_types
    assert load_script("ablation").PROFILES["smoke"].config_for("equicsp", {}).sampler.clip_lattice


@pytest.mark.slow
def test_the_hyperparameter_sweep_with_early_stopping_finishes_and_closes_stopped_runs(tmp_path):
    tiny = [pair for pair in TINY if not pair.startswith(("optim.epochs", "model.hidden_dim"))] + ["optim.epochs=8"]
    command = [sys.executable, str(ROOT / "sweeps" / "hyperparams.py"), "--arm", "no_perm_loss", "--asha",
               "--trials", "3", "--storage-path", str(tmp_path / "ray"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *[a for p in tiny for a in ("--set", p)]]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| w/o permutation loss |" in done.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    training = runs_of_kind(uri, "training")
    assert len(training) == 3 and {run.info.status for run in training} <= {"FINISHED", "KILLED"}
    assert len({run.data.params["optim.lr"] for run in training}) == 3, "Optuna chose a learning rate per trial"
    finished = [run for run in training if run.info.status == "FINISHED"]
    assert finished and all("tuned_step_lr" in run.data.metrics for run in finished)
    assert len(runs_of_kind(uri, "evaluation")) == 1


def test_the_table_names_shared_models_and_shows_leakage_columns_when_asked():
    spec = SweepSpec(name="s", preset="smoke", arms=("equicsp", "no_pm"), seeds=(0,), leakage=True)
    cells = [CellResult("equicsp", 0, "run-a", "eval-a", 1e-4, 0.5, 0.6, 0.1, {}, "equicsp", 0.25, 0.5, 0.2),
             CellResult("no_pm", 0, "run-a", "eval-b", 2e-4, 0.4, 0.5, 0.3, {}, "equicsp", 0.25, 0.4, math.nan)]
    markdown = table_markdown(ablation_table(cells, spec), spec)
    assert "| EquiCSP | own | 60.00 | 0.1000 |" in markdown
    assert "| w/o probabilistic model | shares EquiCSP's | 50.00 | 0.3000 |" in markdown
    assert "| 25.0 | 50.00 | 0.2000 |" in markdown and "| 25.0 | 40.00 | n/a |" in markdown
    assert "unleaked" not in table_markdown(ablation_table(cells, spec), replace(spec, leakage=False))


def test_the_progress_lines_name_the_trial_its_arm_its_epochs_and_the_time_left():
    from types import SimpleNamespace

    from equicsp.sweep.progress import SweepProgress

    spec = SweepSpec(name="s", preset="smoke", arms=("equicsp", "diffcsp"), overrides={"optim.epochs": 40})
    lines = []
    progress = SweepProgress(spec, total_trials=2, print_fn=lambda line, flush: lines.append(line))
    first = SimpleNamespace(trial_id="a", config={"arm": "equicsp", "run.seed": 0, "objective.perm_loss_weight": 1.0})
    second = SimpleNamespace(trial_id="b", config={"arm": "diffcsp", "run.seed": 0})
    progress.on_trial_start(0, [first], first)
    progress.on_trial_result(1, [first, second], first, {"epoch": 20, "val_total": 1.5})
    progress.on_trial_result(2, [first, second], first, {"epoch": 40, "val_total": 1.2, "tuned_step_lr": 3e-4})
    progress.on_trial_complete(3, [first, second], first)
    progress.on_trial_result(4, [first, second], second, {"epoch": 20})
    assert lines[0] == "trial 1 of 2 (equicsp, seed 0): started (0 of 2 finished)"
    assert lines[1].startswith("trial 1 of 2 (equicsp, seed 0): epoch 20/40, val loss 1.5, about ")
    assert "tuned step_lr 0.0003" in lines[2] and "left" in lines[2]
    assert lines[3].startswith("trial 1 of 2 (equicsp, seed 0): done, 1 of 2 finished")
    assert lines[4].startswith("trial 2 of 2 (diffcsp, seed 0): epoch 20/40") and " left" in lines[4]
    progress.on_trial_result(5, [first, second], second, {"epoch": 40})
    assert lines[5].startswith("trial 2 of 2 (diffcsp, seed 0): epoch 40/40, about ")  # its search is left


def test_sweeps_log_system_metrics_only_when_asked():
    import argparse

    from equicsp.cli.sweep import add_launch_arguments, launch_from_arguments

    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    assert not launch_from_arguments(parser.parse_args([])).system_metrics
    assert launch_from_arguments(parser.parse_args(["--system-metrics"])).system_metrics


def test_the_table_says_how_many_seeds_it_averages_names_each_run_and_warns_about_smoke_runs(tmp_path):
    from equicsp.evaluation.plots import ablation_bars
    from equicsp.sweep.final import CellResult
    from equicsp.sweep.report import SMOKE_NOTE, ablation_table, table_markdown

    def cell(arm, seed, rate):
        return CellResult(arm, seed, f"{arm}{seed}".ljust(32, "0"), "e", 1e-4, 0.5, rate, 0.1, model_of=arm)

    one = SweepSpec(name="ablation-smoke", preset="smoke", arms=("equicsp", "diffcsp"))
    table = ablation_table([cell("equicsp", 0, 0.2), cell("diffcsp", 0, 0.3)], one)
    text = table_markdown(table, one)
    assert "One seed: no spread" in text and "±" not in text and SMOKE_NOTE in text
    assert "| equicsp0 |" in text and table[0]["run"] == "equicsp0".ljust(32, "0")  # short in Markdown, whole in CSV
    ablation_bars(table, tmp_path / "one.png")
    three = SweepSpec(name="ablation-paper", preset="mp_20", arms=("equicsp",), seeds=(0, 1, 2))
    table = ablation_table([cell("equicsp", seed, 0.1 * seed) for seed in (0, 1, 2)], three)
    text = table_markdown(table, three)
    assert "Mean over 3 seeds ± standard deviation" in text and "10.00 ± 10.00" in text and SMOKE_NOTE not in text
    assert "| equicsp0 equicsp1 equicsp2 |" in text
    ablation_bars(table, tmp_path / "three.png")


def test_a_generation_sweep_sets_the_task_of_every_arm_and_picks_trials_by_validation_loss():
    spec = SweepSpec(name="g", preset="smoke", arms=("equicsp", "no_pm", "diffcsp"), task="generation")
    validate_spec(spec)
    assert all(spec.config_for(arm, {}).diffusion.task == "generation" for arm in spec.arms)
    assert SweepSpec(name="c", preset="smoke").config_for("equicsp", {}).diffusion.task == "csp"
    assert search_metric(spec) == ("val_denoise", "min") and search_metric(replace(spec, task="csp"))[1] == "max"
    assert spec.model_owner("no_pm") == "equicsp"  # the PM switch still acts at sampling time only
    trials = [FinishedTrial.from_tune({"config": {"arm": "equicsp", "run.seed": 0}, "training_run_id": run,
                                       "val_denoise": loss})
              for run, loss in (("a", 0.9), ("b", 0.4))]
    chosen = dict(best_per_cell(trials, spec))
    assert chosen["equicsp"].training_run_id == chosen["no_pm"].training_run_id == "b"


def test_the_generation_table_shows_validity_coverage_and_distances_over_seeds():
    spec = SweepSpec(name="g", preset="smoke", arms=("equicsp", "no_pm"), seeds=(0, 1), task="generation")
    metrics = [{"struct_valid": 0.9, "comp_valid": 0.8, "cov_recall": 0.5, "cov_precision": 0.7, "wdist_density": 0.2,
                "wdist_num_elems": 0.1},
               {"struct_valid": 0.7, "comp_valid": 0.6, "cov_recall": 0.5, "cov_precision": 0.5, "wdist_density": 0.4,
                "wdist_num_elems": 0.3}]
    nan = math.nan
    cells = [CellResult("equicsp", seed, f"run-{seed}", f"gen-{seed}", 3e-4, nan, nan, nan, {}, "equicsp",
                        generation=metrics[seed]) for seed in (0, 1)]
    cells.append(CellResult("no_pm", 0, "run-0", "gen-x", 3e-4, nan, nan, nan, {}, "equicsp",
                            generation={"struct_valid": 1.0, "comp_valid": 0.5}))
    table = ablation_table(cells, spec)
    assert table[0]["struct_valid_mean"] == pytest.approx(80) and table[0]["cov_recall_std"] == 0
    markdown = table_markdown(table, spec)
    for heading in ("struct. valid (%)", "comp. valid (%)", "COV-R (%)", "COV-P (%)", "wdist density",
                    "wdist #elements", "step_lr (config's)"):
        assert heading in markdown
    assert "| EquiCSP | own | 80.00 ± 14.14 | 70.00 ± 14.14 | 50.00 ± 0.00 | 60.00 ± 14.14 | 0.3000 ± 0.1414 |" \
        in markdown
    assert "| w/o probabilistic model | shares EquiCSP's | 100.00 | 50.00 | n/a | n/a | n/a | n/a |" in markdown
    assert "match rate" not in markdown


def test_the_progress_callback_pickles_on_a_driver_joined_to_a_running_cluster(monkeypatch):
    """Joined to a cluster (`ray submit`), a driver's builtins.print is Ray's own; Tune pickles its callbacks."""
    import builtins

    import ray.cloudpickle

    from equicsp.sweep.progress import SweepProgress

    original = builtins.print
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: original(*args, **kwargs))
    progress = ray.cloudpickle.loads(ray.cloudpickle.dumps(SweepProgress(SweepSpec(name="s", preset="smoke"), 2)))
    assert progress.total == 2


ON_TWO_CPUS = ("import runpy, sys, ray; ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR'); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.slow
def test_trials_that_each_need_the_whole_machine_run_one_after_the_other_and_ctrl_c_resumes(tmp_path):
    """On 2 CPUs, two trials of 2 workers each: one runs while the other waits, quietly (a trial's own
    reservation once left no whole CPU for its workers, which retried their start every minute with a
    traceback). A Ctrl-C on the driver ends the sweep with one line and KILLED runs; the same command resumes."""
    command = [sys.executable, "-c", ON_TWO_CPUS, *sweep_command(tmp_path, "--arms", "equicsp", "diffcsp",
                                                                 "--workers-per-trial", "2")[1:]]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.Tracker(uri).ensure_experiment("equicsp-sweeps")  # before the driver: two processes creating one store race
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=environment)
    try:
        deadline = time.time() + 600
        while not any("train_total" in run.data.metrics for run in runs_of_kind(uri, "training")):
            assert driver.poll() is None and time.time() < deadline, driver.communicate()[1][-3000:]
            time.sleep(1)
        os.kill(driver.pid, signal.SIGINT)  # the driver alone
        stdout, stderr = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, stderr[-3000:]
    assert "interrupted; rerun the same command to resume" in stderr.splitlines()  # worker logs may follow it
    assert "trial 2 of 2: waiting for a CPU (1 trial ahead)" in stdout
    [parent] = runs_of_kind(uri, "sweep")
    assert parent.info.status == "KILLED"
    assert all(run.info.status != "RUNNING" for run in runs_of_kind(uri, "training"))

    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    for run, output in (("interrupted", stdout + stderr), ("resumed", done.stdout + done.stderr)):
        for word in ("WorkerGroupStartupTimeoutError", "Traceback"):
            assert word not in output, f"{run} run: " + output[max(0, output.index(word) - 1500):][:4000]
    assert "| EquiCSP |" in done.stdout and "| DiffCSP |" in done.stdout
    first, second = sorted(runs_of_kind(uri, "training"), key=lambda run: run.info.start_time)
    assert second.info.start_time >= first.info.end_time, "the second trial started once the first had trained"
    assert runs_of_kind(uri, "sweep")[0].info.status == "FINISHED"


def test_a_trial_that_waits_for_a_share_of_the_cluster_is_one_quiet_line():
    from types import SimpleNamespace

    from equicsp.sweep.progress import SweepProgress

    spec = SweepSpec(name="s", preset="smoke", arms=("equicsp", "diffcsp"))
    lines = []
    progress = SweepProgress(spec, total_trials=3, print_fn=lambda line, flush: lines.append(line), concurrent=1,
                             unit="GPU")
    first, second = (SimpleNamespace(trial_id=name, config={"arm": "equicsp", "run.seed": 0}) for name in "ab")
    progress.on_trial_start(0, [first], first)
    assert lines[1:] == ["trial 2 of 3: waiting for a GPU (1 trial ahead)"]
    progress.on_trial_complete(1, [first], first)
    progress.on_trial_start(2, [first, second], second)
    assert lines[-1] == "trial 3 of 3: waiting for a GPU (1 trial ahead)"
    unlimited = SweepProgress(spec, total_trials=3, print_fn=lambda line, flush: lines.append(line))
    unlimited.on_trial_start(0, [first], first)
    assert "waiting" not in lines[-1]


def test_a_rerun_of_a_finished_sweep_says_it_is_already_complete_and_a_resumed_one_says_so():
    from types import SimpleNamespace

    from equicsp.sweep.driver import rerun_note

    def run(status):
        return SimpleNamespace(info=SimpleNamespace(run_id="26104baf" + "0" * 24, status=status))

    assert rerun_note(None, "ablation-smoke") == ""
    assert rerun_note(run("FINISHED"), "ablation-smoke").startswith(
        "sweep 'ablation-smoke' is already complete (MLflow run 26104baf): its trials and final evaluation are reused")
    assert rerun_note(run("KILLED"), "ablation-smoke").startswith("resuming sweep 'ablation-smoke' (MLflow run 26104baf, KILLED)")


def test_the_time_estimate_counts_the_test_crystals_the_final_stage_samples(tmp_path):
    from equicsp.sweep.driver import final_test_crystals

    spec = SweepSpec(name="s", preset="smoke")  # the bundled sample: 100 test crystals
    assert final_test_crystals(spec) == 100
    assert final_test_crystals(replace(spec, test_limit=25)) == 25
    missing = replace(spec, overrides={"data.path": str(tmp_path / "elsewhere")}, test_limit=None)
    assert final_test_crystals(missing) is None


@given(arm=st.sampled_from(sorted(ARMS)), seed=st.integers(0, 2**31 - 1),
       searched=st.dictionaries(st.sampled_from(["optim.lr", "objective.perm_loss_weight", "model.hidden_dim"]),
                                st.one_of(st.floats(allow_nan=False), st.integers(1, 512))))
def test_trial_params_go_to_tune_and_come_back_unchanged(arm, seed, searched):
    params = TrialParams(arm, seed, searched)
    assert TrialParams.from_tune(params.to_tune()) == params
    assert params.config_values() == {"run.seed": seed, **searched}


def test_a_finished_trial_keeps_tunes_numbers_and_its_cell_not_tunes_bookkeeping():
    result = {"config": {"arm": "no_pm", "run.seed": "3", "optim.lr": 1e-3}, "training_run_id": "r1",
              "val_match_rate": 0.25, "epoch": 7, "done": True, "trial_id": "abc", "date": "2026-12-06"}
    trial = FinishedTrial.from_tune(result)
    assert trial.params == TrialParams("no_pm", 3, {"optim.lr": 1e-3}) and trial.training_run_id == "r1"
    assert trial.metrics == {"val_match_rate": 0.25, "epoch": 7.0}
    assert trial.metric("val_denoise") != trial.metric("val_denoise") and trial.metric("epoch") == 7.0


def test_the_early_stopping_check_asks_its_own_ray_not_another_one_running_on_the_machine(monkeypatch):
    """With RAY_ADDRESS=local (what `--address local` sets) Ray's state API looked for a Ray on the machine and,
    beside another one, failed with "Found multiple active Ray instances" (or asked the other one)."""
    import ray

    from equicsp.sweep.cluster import check_stopped_trials_are_freed

    other = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, include_dashboard=False, "
                              "logging_level='ERROR'); print('ready', flush=True); time.sleep(600)"],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": "local"})
    try:
        assert other.stdout.readline().strip() == "ready"
        monkeypatch.setenv("RAY_ADDRESS", "local")
        ray.init(num_cpus=1, logging_level="ERROR", log_to_driver=False)
        try:
            check_stopped_trials_are_freed(SweepSpec(name="asha", preset="smoke", arms=("equicsp",), asha=True))
        finally:
            ray.shutdown()
    finally:
        other.send_signal(signal.SIGINT)  # its ray.shutdown at exit stops the Ray it started
        other.wait(timeout=60)
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
