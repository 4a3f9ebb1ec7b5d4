
"""`python -m equicsp.evaluate`: sharded sampling and matching on Ray, logged as a child run of the training run."""

import csv
import json
from dataclasses import replace

import pytest
import torch
from conftest import FAST

from equicsp.cli.evaluate import main as evaluate_main
from equicsp.config import make_config
from equicsp.engine.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from equicsp.evaluation.csp import EvaluationSettings, Evaluator
from equicsp.evaluation.metrics import SCORE_VERSION
from equicsp.model.denoiser import build_denoiser
from equicsp.platform import tracking
from equicsp.platform.logged_evaluation import evaluate_logged_run
from equicsp.platform.ray_evaluation import evaluate_checkpoint, torch_threads


@pytest.fixture(scope="module")
def ray_two_cpus():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def log_as_training_run(uri, checkpoint_path, config, name="memorised"):
    """An MLflow training run holding checkpoint_path as its best checkpoint (what Ray Train logs)."""
    tracker = tracking.Tracker(uri)
    experiment = tracker.ensure_experiment("equicsp")
    run_id = tracker.start_training_run(experiment, config, run_key=name, run_name=name)
    tracker.log_artifact(run_id, checkpoint_path, "checkpoints")
    tracker.client.set_terminated(run_id, "FINISHED")
    return run_id


def untrained_checkpoint(config, path, seed=1):
    torch.manual_seed(seed)
    save_checkpoint(path, config, build_denoiser(config))
    return path


def test_one_and_two_workers_give_identical_predictions_and_metrics(ray_two_cpus, tiny_dataset, tmp_path):
    config = make_config("smoke", "equicsp", {**FAST, "sampler.batch_size": 3})
    checkpoint = read_checkpoint(untrained_checkpoint(config, tmp_path / "model.pt"))
    one = evaluate_checkpoint(checkpoint, tiny_dataset, EvaluationSettings(num_samples=2, seed=5, workers=1),
                              show_progress=False)
    two = evaluate_checkpoint(checkpoint, tiny_dataset, EvaluationSettings(num_samples=2, seed=5, workers=2),
                              show_progress=False)
    assert two.workers == 2 and len(one.predictions) == len(two.predictions) == 16
    key = lambda crystal: (crystal.composition_index, crystal.sample_index)  # noqa: E731
    for a, b in zip(sorted(one.predictions, key=key), sorted(two.predictions, key=key)):
        assert key(a) == key(b)
        assert torch.equal(a.frac_coords, b.frac_coords) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.angles, b.angles)
    assert repr(one.summary) == repr(two.summary) and repr(one.per_crystal) == repr(two.per_crystal)  # nan-aware
    model_config, model = model_from_checkpoint(checkpoint)
    with torch_threads(1):  # a Ray worker's thread count
        here = Evaluator.here(model, processes=1).evaluate(model_config, tiny_dataset,
                                                           EvaluationSettings(num_samples=2, seed=5), show_progress=False)
    for a, b in zip(sorted(one.predictions, key=key), sorted(here.predictions, key=key)):
        assert key(a) == key(b) and torch.equal(a.frac_coords, b.frac_coords) and torch.equal(a.lengths, b.lengths)
    assert repr(one.summary) == repr(here.summary) and repr(one.per_crystal) == repr(here.per_crystal)
    other_seed = evaluate_checkpoint(checkpoint, tiny_dataset, EvaluationSettings(num_samples=2, seed=6, workers=2),
                                     show_progress=False)
    assert not torch.equal(other_seed.predictions[0].frac_coords, one.predictions[0].frac_coords)


def test_an_evaluator_sampling_in_another_precision_than_asked_is_refused_before_sampling(tiny_dataset):
    config = make_config("smoke", "equicsp", FAST)
    evaluator = Evaluator.here(build_denoiser(config), precision="bf16")
    with pytest.raises(ValueError, match="samples in bf16, the evaluation asks for fp32"):
        evaluator.evaluate(config, tiny_dataset, EvaluationSettings(), show_progress=False)


def test_a_pool_handed_another_model_samples_with_it(ray_two_cpus, tiny_dataset, tmp_path):
    """A sweep's final stage hands one pool each cell's model in turn: it samples what a pool of that model's own
    does (a pool made for one model went on sampling that model whatever checkpoint came with it)."""
    from equicsp.platform.ray_evaluation import SamplingPool

    config = make_config("smoke", "equicsp", {**FAST, "sampler.batch_size": 3})
    first = read_checkpoint(untrained_checkpoint(config, tmp_path / "first.pt", seed=1))
    second = read_checkpoint(untrained_checkpoint(config, tmp_path / "second.pt", seed=2))
    settings = EvaluationSettings(num_samples=1, seed=5, limit=4, workers=2)
    own = evaluate_checkpoint(second, tiny_dataset, settings, show_progress=False)
    with SamplingPool(first, workers=2) as pool:
        assert pool.actors == [], "actors start at the first evaluation"
        of_first = evaluate_checkpoint(first, tiny_dataset, settings, show_progress=False, pool=pool)
        shared = evaluate_checkpoint(second, tiny_dataset, settings, show_progress=False, pool=pool)
        assert pool.workers == 2
    key = lambda crystal: (crystal.composition_index, crystal.sample_index)  # noqa: E731
    pairs = list(zip(sorted(shared.predictions, key=key), sorted(own.predictions, key=key)))
    assert len(pairs) == 4
    for a, b in pairs:
        assert key(a) == key(b) and torch.equal(a.frac_coords, b.frac_coords) and torch.equal(a.lengths, b.lengths)
    assert not torch.equal(min(of_first.predictions, key=key).frac_coords, pairs[0][0].frac_coords)
    assert repr(shared.per_crystal) == repr(own.per_crystal)


def test_a_pool_whose_second_worker_cannot_start_samples_with_the_first(ray_two_cpus, tiny_dataset, tmp_path):
    """Another job holds one of the two CPUs: the pool lets the worker that cannot start go after its grace period
    instead of waiting for it forever (a sweep's step-size search did), and samples with the one that started."""
    import ray

    from equicsp.platform.ray_evaluation import SamplingPool

    config = make_config("smoke", "equicsp", {**FAST, "sampler.batch_size": 3})
    checkpoint = read_checkpoint(untrained_checkpoint(config, tmp_path / "model.pt"))

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    try:
        with SamplingPool(checkpoint, workers=2) as pool:
            pool.wait_ready(grace_s=3)
            assert pool.workers == 1
            evaluation = evaluate_checkpoint(checkpoint, tiny_dataset, EvaluationSettings(num_samples=1, seed=5, limit=4),
                                             show_progress=False, pool=pool)
        assert len(evaluation.predictions) == 4
    finally:
        ray.kill(holder)


def test_a_pool_none_of_whose_workers_can_start_samples_here_with_the_same_predictions(ray_two_cpus, tiny_dataset,
                                                                                         tmp_path, monkeypatch, capsys):
    """A placement group holds every CPU (as the one of a trial that early stopping ended holds its CPU until
    Ray Train frees it): a pool of its own and a shared one (a step-size search's) give up on their workers after
    the start timeout, sample and match in this process, and predict and match exactly what Ray workers do."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from equicsp.platform import ray_evaluation
    from equicsp.platform.ray_evaluation import SamplingPool

    config = make_config("smoke", "equicsp", {**FAST, "sampler.batch_size": 3})
    checkpoint = read_checkpoint(untrained_checkpoint(config, tmp_path / "model.pt"))
    second = read_checkpoint(untrained_checkpoint(config, tmp_path / "second.pt", seed=2))
    settings = EvaluationSettings(num_samples=2, seed=5, limit=5, workers=1)
    on_ray = evaluate_checkpoint(checkpoint, tiny_dataset, settings, show_progress=False)
    second_on_ray = evaluate_checkpoint(second, tiny_dataset, settings, show_progress=False)
    threads = torch.get_num_threads()
    monkeypatch.setattr(ray_evaluation, "WORKER_START_TIMEOUT_S", 3.0)
    everything = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(everything.ready())
    try:
        begin = time.monotonic()
        own = evaluate_checkpoint(checkpoint, tiny_dataset, settings, show_progress=False)
        with SamplingPool(checkpoint, workers=1) as pool:
            shared = evaluate_checkpoint(checkpoint, tiny_dataset, settings, show_progress=False, pool=pool)
            assert pool.in_process and pool.actors == []
            second_here = evaluate_checkpoint(second, tiny_dataset, settings, show_progress=False, pool=pool)
        elapsed = time.monotonic() - begin
    finally:
        remove_placement_group(everything)
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert capsys.readouterr().err.count("sampling and matching in this process instead") == 2
    assert torch.get_num_threads() == threads, "the caller keeps its own thread count"
    key = lambda crystal: (crystal.composition_index, crystal.sample_index)  # noqa: E731
    for here, there in ((own, on_ray), (shared, on_ray), (second_here, second_on_ray)):
        assert len(here.predictions) == len(there.predictions) == 10
        for a, b in zip(sorted(here.predictions, key=key), sorted(there.predictions, key=key)):
            assert key(a) == key(b) and torch.equal(a.frac_coords, b.frac_coords)
            assert torch.equal(a.lengths, b.lengths) and torch.equal(a.angles, b.angles)
        assert repr(here.summary) == repr(there.summary) and repr(here.per_crystal) == repr(there.per_crystal)


def test_a_shared_model_sampled_as_another_arm_is_that_arms_sampler(ray_two_cpus, tiny_dataset, tmp_path):
    """sampling_arm = no_pm on an EquiCSP checkpoint samples exactly as the same weights saved as no_pm."""
    config = make_config("smoke", "equicsp", {**FAST, "sampler.batch_size": 8})
    as_equicsp = read_checkpoint(untrained_checkpoint(config, tmp_path / "equicsp.pt"))
    as_no_pm = read_checkpoint(untrained_checkpoint(make_config("smoke", "no_pm", {**FAST, "sampler.batch_size": 8}),
                                                    tmp_path / "no_pm.pt"))
    settings = EvaluationSettings(num_samples=1, seed=2, workers=1, limit=3)
    shared = evaluate_checkpoint(as_equicsp, tiny_dataset, replace(settings, sampling_arm="no_pm"), show_progress=False)
    own = evaluate_checkpoint(as_no_pm, tiny_dataset, settings, show_progress=False)
    pm = evaluate_checkpoint(as_equicsp, tiny_dataset, settings, show_progress=False)
    assert not shared.config.objective.prob_model
    assert all(torch.equal(a.frac_coords, b.frac_coords) for a, b in zip(shared.predictions, own.predictions))
    assert not all(torch.equal(a.frac_coords, b.frac_coords) for a, b in zip(shared.predictions, pm.predictions))


@pytest.mark.slow
def test_a_memorised_model_scores_high_an_untrained_one_near_zero_both_logged(ray_two_cpus, memorised_model,
                                                                               tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config, checkpoint_path = memorised_model
    trained_run = log_as_training_run(uri, checkpoint_path, config, "trained")
    tracker = tracking.Tracker(uri)
    (tmp_path / "untrained_model").mkdir()  # not the --out folder below, which must start empty
    untrained_run = log_as_training_run(uri, untrained_checkpoint(config, tmp_path / "untrained_model" / "best.pt"),
                                        config, "untrained")
    scores = {}
    for name, run_id in (("trained", trained_run), ("untrained", untrained_run)):
        evaluate_main(["--run-id", run_id, "--tracking-uri", uri, "--num-samples", "4", "--workers", "2",
                       "--out", str(tmp_path / name)])
        printed = capsys.readouterr().out
        assert "| match rate |" in printed and "child of" in printed and "| METRe (%) |" in printed
        [child] = tracker.client.search_runs(
            [tracker.get_run(run_id).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
        assert child.data.params["num_samples"] == "4" and float(child.data.params["step_lr"]) == \
            config.sampler.step_lr
        assert child.data.tags["equicsp.kind"] == "evaluation"
        artifacts = {a.path for a in tracker.client.list_artifacts(child.info.run_id)}
        assert {"per_crystal.csv", "predictions.zip", "evaluation.png", "summary.json"} <= artifacts
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert child.data.metrics["match_rate"] == pytest.approx(summary["match_rate"])
        assert child.data.metrics["metre"] >= child.data.metrics["match_rate"] and "crmse" in child.data.metrics
        scores[name] = child.data.metrics["match_rate"]
    assert scores["trained"] >= 0.6
    assert scores["untrained"] <= 0.25
    # The same evaluation asked for again is answered from its run, not logged twice.
    evaluate_main(["--run-id", trained_run, "--tracking-uri", uri, "--num-samples", "4", "--workers", "2"])
    runs = tracker.client.search_runs([tracker.get_run(trained_run).info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{trained_run}'")
    assert len(runs) == 1
    # Once the scoring rules change, an earlier evaluation is not the answer any more.
    monkeypatch.setattr("equicsp.platform.logged_evaluation.SCORE_VERSION", SCORE_VERSION + 1)
    evaluate_main(["--run-id", trained_run, "--tracking-uri", uri, "--num-samples", "4", "--workers", "2"])
    runs = tracker.client.search_runs([tracker.get_run(trained_run).info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{trained_run}'")
    assert len(runs) == 2


def test_an_evaluation_answered_from_its_run_has_its_per_crystal_results_and_scores(ray_two_cpus, tiny_data_dir,
                                                                                      tmp_path):
    """What the sweep's bootstrap needs of a reused evaluation: the same per-crystal results, METRe included."""
    config = make_config("smoke", "equicsp", {**FAST, "data.path": str(tiny_data_dir)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_as_training_run(uri, untrained_checkpoint(config, tmp_path / "best.pt"), config)
    settings = EvaluationSettings(num_samples=2, limit=4, workers=1)
    first = evaluate_logged_run(run_id, settings, tracking_uri=uri, show_progress=False)
    again = evaluate_logged_run(run_id, settings, tracking_uri=uri, show_progress=False)
    assert again.reused and not first.reused and again.run_id == first.run_id
    assert repr(again.per_crystal) == repr(first.per_crystal) and repr(again.summary) == repr(first.summary)
    assert first.per_crystal[0].metre_rms is not None and 0 <= first.summary.crmse <= 0.5


def test_bad_rows_in_the_test_file_are_reported_and_count_as_not_matched(ray_two_cpus, tiny_csv, tmp_path):
    with open(tiny_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        fieldnames, rows = reader.fieldnames, list(reader)
    broken = dict(rows[0], cif="not a CIF at all")
    path = tmp_path / "test_with_bad_rows.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows([broken] + rows[:3])
    config = make_config("smoke", "equicsp", FAST)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_as_training_run(uri, untrained_checkpoint(config, tmp_path / "best.pt"), config)
    evaluate_main(["--run-id", run_id, "--tracking-uri", uri, "--data", str(path), "--out", str(tmp_path / "eval")])
    with open(tmp_path / "eval" / "per_crystal.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    [unusable] = [row for row in table if row["index"] == "-1"]
    assert unusable["matched"] == "False" and "line 2" in unusable["reason"] and "unparsable CIF" in unusable["reason"]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_crystals"] == 4
    report = json.loads((tmp_path / "eval" / "data_report.json").read_text())
    assert report["skipped"][0]["row"] == 0


def test_leakage_scores_are_reported_logged_and_in_the_per_crystal_table(ray_two_cpus, tiny_data_dir, tmp_path,
                                                                         capsys):
    """The tiny data's test split repeats its training split: every test crystal is leaked."""
    config = make_config("smoke", "equicsp", {**FAST, "data.path": str(tiny_data_dir)})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_as_training_run(uri, untrained_checkpoint(config, tmp_path / "best.pt"), config)
    evaluate_main(["--run-id", run_id, "--tracking-uri", uri, "--leakage", "--out", str(tmp_path / "eval")])
    assert "| 100.0 % | 0 |" in capsys.readouterr().out  # leaked fraction, unleaked crystals
    with open(tmp_path / "eval" / "per_crystal.csv", newline="") as handle:
        assert {row["leaked"] for row in csv.DictReader(handle)} == {"True"}
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["leaked_fraction"] == 1.0
    tracker = tracking.Tracker(uri)
    [logged] = tracker.client.search_runs([tracker.get_run(run_id).info.experiment_id],
                                          "tags.`equicsp.kind` = 'evaluation'")
    assert logged.data.metrics["leaked_fraction"] == 1.0 and logged.data.metrics["num_unleaked"] == 0


def test_a_checkpoint_carrying_a_tuned_step_size_is_sampled_with_it(ray_two_cpus, tiny_data_dir, tmp_path, capsys):
    config = make_config("smoke", "equicsp", {**FAST, "data.path": str(tiny_data_dir)})
    path = untrained_checkpoint(config, tmp_path / "best.pt")
    save_checkpoint(path, config, build_denoiser(config), tuned_step_lr=1.25e-4)
    evaluate_main(["--checkpoint", str(path), "--limit", "2"])
    out = capsys.readouterr().out
    assert "step_lr 0.000125: the step size a sweep tuned" in out and "| 2 | 1 | 0.000125 |" in out


def test_bad_requests_fail_clearly(tmp_path, tiny_data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.Tracker(uri)
    tracker.ensure_experiment("equicsp")
    with pytest.raises(SystemExit, match="no run starts with f00"):
        evaluate_main(["--run-id", "f00", "--tracking-uri", uri])
    config = make_config("smoke", "equicsp", {**FAST, "data.path": str(tiny_data_dir)})
    experiment = tracker.ensure_experiment("equicsp")
    empty_run = tracker.start_training_run(experiment, config, run_key="empty", run_name="empty")
    with pytest.raises(SystemExit, match="has no checkpoints/best.pt artifact"):
        evaluate_main(["--run-id", empty_run, "--tracking-uri", uri])
    with pytest.raises(SystemExit, match="must be >= 1, not 0"):
        evaluate_main(["--run-id", empty_run, "--tracking-uri", uri, "--num-samples", "0"])
    with pytest.raises(SystemExit, match="checkpoint not found"):
        evaluate_main(["--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="cannot reach the MLflow tracking server"):
        evaluate_main(["--run-id", "abc", "--tracking-uri", "http://127.0.0.1:9"])


class Stop(Exception):
    """Raised by a stand-in for the sampling, once a test has seen what it wanted."""


def test_an_unwritable_out_fails_before_any_sampling(tmp_path, monkeypatch):
    config = make_config("smoke", "equicsp", FAST)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_as_training_run(uri, untrained_checkpoint(config, tmp_path / "best.pt"), config)
    (tmp_path / "file.txt").write_text("")

    def sampled(*args, **kwargs):
        raise AssertionError("sampled although the output folder cannot be written")

    monkeypatch.setattr("equicsp.platform.logged_evaluation.evaluate_checkpoint", sampled)
    monkeypatch.setattr("equicsp.cli.evaluate.evaluate_checkpoint", sampled)
    out = tmp_path / "file.txt" / "sub"
    for source in (["--run-id", run_id, "--tracking-uri", uri], ["--checkpoint", str(tmp_path / "best.pt")]):
        with pytest.raises(SystemExit, match=f"error: cannot write to output folder {out}: .*file.txt is a file"):
            evaluate_main([*source, "--data", str(tmp_path / "nowhere.csv"), "--out", str(out)])


def test_a_report_folder_failing_late_loses_nothing_logged(ray_two_cpus, tiny_csv, tmp_path, monkeypatch):
    import equicsp.platform.logged_evaluation as logged_evaluation

    config = make_config("smoke", "equicsp", FAST)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_as_training_run(uri, untrained_checkpoint(config, tmp_path / "best.pt"), config)
    out = tmp_path / "out"
    real = logged_evaluation.evaluate_checkpoint

    def evaluate_then_lose_the_folder(*args, **kwargs):
        evaluation = real(*args, **kwargs)
        out.write_text("the folder became a file while sampling")
        return evaluation

    monkeypatch.setattr(logged_evaluation, "evaluate_checkpoint", evaluate_then_lose_the_folder)
    with pytest.raises(SystemExit, match=f"error: cannot write to output folder {out}: .*the results are in "
                                         f"{out}.kept-.*logged as MLflow run") as raised:
        evaluate_main(["--run-id", run_id, "--tracking-uri", uri, "--data", str(tiny_csv), "--limit", "2",
                       "--out", str(out)])
    tracker = tracking.Tracker(uri)
    [child] = tracker.client.search_runs([tracker.get_run(run_id).info.experiment_id],
                                         filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
    assert child.info.run_id in str(raised.value) and child.info.status == "FINISHED"
    assert "match_rate" in child.data.metrics
    assert {"per_crystal.csv", "summary.json"} <= {a.path for a in tracker.client.list_artifacts(child.info.run_id)}


def test_a_relative_data_path_resolves_from_another_working_folder(tiny_data_dir, tmp_path, tmp_path_factory,
                                                                    monkeypatch):
    project = tiny_data_dir.parent
    monkeypatch.chdir(project)
    config = make_config("smoke", "equicsp", {**FAST, "data.path": tiny_data_dir.name})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (project / "runs" / "train").mkdir(parents=True)
    checkpoint = untrained_checkpoint(config, project / "runs" / "train" / "best.pt")
    run_id = log_as_training_run(uri, checkpoint, config)
    seen = []

    def stop_before_sampling(checkpoint, dataset, *args, **kwargs):
        seen.append(len(dataset))
        raise Stop

    monkeypatch.setattr("equicsp.platform.logged_evaluation.evaluate_checkpoint", stop_before_sampling)
    monkeypatch.setattr("equicsp.cli.evaluate.evaluate_checkpoint", stop_before_sampling)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for source in (["--run-id", run_id, "--tracking-uri", uri], ["--checkpoint", str(checkpoint)]):
        with pytest.raises(Stop):
            evaluate_main(source)
    assert seen == [8, 8]
    lonely = tmp_path_factory.mktemp("lonely") / "best.pt"
    (project / "runs" / "train" / "best.pt").rename(lonely)
    with pytest.raises(SystemExit, match=f"data.path '{tiny_data_dir.name}' is not a folder \\(looked at "
                                         f"{elsewhere / tiny_data_dir.name}, {lonely.parent / tiny_data_dir.name}.*\\); "
                                         "pass --data"):
        evaluate_main(["--checkpoint", str(lonely)])


def test_an_automatic_sampling_pool_takes_the_free_cpus_not_the_reserved_ones(monkeypatch):
    """A stopped trial's placement group can hold a CPU after a sweep's trials end (seen: the final stage waited
    forever for a second sampling worker); the pool is sized by what is free, and never below one worker."""
    import ray

    from equicsp.platform.ray_evaluation import sampling_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    for free, expected in (({"CPU": 1.0}, 1), ({}, 1), ({"CPU": 2.0}, 2)):
        monkeypatch.setattr(ray, "available_resources", lambda free=free: free)
        assert sampling_resources(0) == (expected, False, 1)
    assert sampling_resources(2) == (2, False, 1)  # asked for: the cluster's total decides
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 4.0})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 8.0, "GPU": 3.0})
    assert sampling_resources(0) == (3, True, 1)


def evaluated_here(checkpoint, dataset, settings, *args, **kwargs):
    """evaluate_checkpoint without Ray: the same pipeline in this process."""
    config, model = model_from_checkpoint(checkpoint)
    return Evaluator.here(model, precision=settings.precision, processes=1).evaluate(config, dataset, settings,
                                                                                      show_progress=False)


def test_the_store_and_out_are_checked_before_any_work_and_a_report_mlflow_refuses_is_kept(tiny_csv, tmp_path,
                                                                                         monkeypatch, capsys):
    """A full (or read-only) store failed only after the whole evaluation and, without --out, lost it; a truncated
    mlflow.db and a generation model were tracebacks; a non-empty --out got a new summary beside old files."""
    from filesystems import full_disk

    import equicsp.platform.logged_evaluation as logged_evaluation

    def never(*args, **kwargs):
        raise AssertionError("evaluated although it could not be kept")

    monkeypatch.setattr(logged_evaluation, "evaluate_checkpoint", never)
    monkeypatch.setattr("equicsp.cli.evaluate.evaluate_checkpoint", never)
    config = make_config("smoke", "equicsp", FAST)
    (tmp_path / "run").mkdir()
    checkpoint = untrained_checkpoint(config, tmp_path / "run" / "best.pt")
    data = ["--data", str(tiny_csv), "--limit", "2"]
    with full_disk(tmp_path / "store", "3m") as store:
        uri = f"sqlite:///{store / 'mlflow.db'}"
        run_id = log_as_training_run(uri, checkpoint, config)
        with open(store / "filler", "wb") as handle, pytest.raises(OSError):  # the disk fills up
            while True:
                handle.write(bytes(65536))
                handle.flush()
        with pytest.raises(SystemExit, match=f"error: cannot write to the MLflow store .*no space left on {store}"):
            evaluate_main(["--run-id", run_id, "--tracking-uri", uri, *data])
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"SQLite format 3\0" + bytes(100))
    with pytest.raises(SystemExit, match=f"error: the MLflow store at {broken} is unreadable"):
        evaluate_main(["--run-id", run_id, "--tracking-uri", f"sqlite:///{broken}", *data])
    generation = make_config("smoke", "equicsp", {**FAST, "diffusion.task": "generation"})
    save_checkpoint(tmp_path / "generation.pt", generation, build_denoiser(generation), num_atoms_distribution=[0, 1])
    with pytest.raises(SystemExit, match="error: this is a generation model.*python -m equicsp.generate"):
        evaluate_main(["--checkpoint", str(tmp_path / "generation.pt"), *data])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "per_crystal.csv").write_text("k=3")
    with pytest.raises(SystemExit, match=f"output folder {tmp_path / 'old'} already holds 1 file.*--force"):
        evaluate_main(["--checkpoint", str(checkpoint), *data, "--out", str(tmp_path / "old")])

    # The store fails at the very end: the report stays in --out, else in ./unlogged, and the error says where.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_as_training_run(uri, checkpoint, config)
    monkeypatch.setattr(logged_evaluation, "evaluate_checkpoint", evaluated_here)
    monkeypatch.setattr("equicsp.cli.evaluate.evaluate_checkpoint", evaluated_here)

    def store_fails(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking.Tracker, "log_evaluation_run", store_fails)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="could not be logged to MLflow .*No space left on device.*its report is kept "
                                         f"in {tmp_path / 'unlogged'}/evaluation-{run_id}-"):
        evaluate_main(["--run-id", run_id, "--tracking-uri", uri, *data])
    [kept] = (tmp_path / "unlogged").iterdir()
    assert json.loads((kept / "summary.json").read_text())["num_crystals"] == 2
    with pytest.raises(SystemExit, match=f"its report is in {tmp_path / 'old'}"):
        evaluate_main(["--run-id", run_id, "--tracking-uri", uri, *data, "--out", str(tmp_path / "old"), "--force"])
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == sorted(p.name for p in kept.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("equicsp.cli.evaluate.evaluate_checkpoint", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        evaluate_main(["--checkpoint", str(checkpoint), *data, "--out", str(tmp_path / "old"), "--force"])
    assert stopped.value.code == 130 and "interrupted: no evaluation was logged or written to" in capsys.readouterr().err
    assert (tmp_path / "old" / "summary.json").exists()
