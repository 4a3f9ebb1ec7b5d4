"""Sweeps: Ray Tune + Optuna over training runs, a step_lr search per model, a final test evaluation, a report.

One sweep is a grid of cells (arm, seed), an arm being a row of the paper's Table 2 (an
objective preset). Each cell gets `trials_per_cell` Tune trials; Optuna (OptunaSearch, seeded,
define-by-run) chooses the searched config fields of each trial, the permutation-loss weight
only for arms that have the loss. A trial is a Ray Train run (`distributed.run_training`,
a child MLflow run of the sweep's parent run), then an Optuna search of the Langevin step
size on validation crystals (sampling only: the model is not retrained per step size).
The best trial of each cell is evaluated on the test set (`distributed_eval`), and the
parent run receives the ablation table, a bar chart and the learning curves.

Resume: the same sweep (name and storage path) started again restores the Tuner: finished
trials are kept, unfinished ones continue from their Ray Train checkpoint in the same MLflow
run, and evaluations already logged are read back instead of run again.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from equicsp import tracking
from equicsp.config import OBJECTIVE_PRESETS, ConfigError, apply_overrides, config_from_dict, make_config
from equicsp.data import DatasetError, load_splits, resolve_path
from equicsp.distributed import LaunchOptions, connect_ray, run_training
from equicsp.distributed_eval import EvaluationSettings, SamplingPool, evaluate_checkpoint, evaluate_logged_run
from equicsp.plots import ablation_bars, arm_learning_curves

# Table 2 of the paper, in its order; the names are the objective presets.
ARM_LABELS: dict[str, str] = {
    "equicsp": "EquiCSP",
    "no_perm_loss": "w/o permutation loss",
    "frame_average": "Frame Average (no permutation loss)",
    "no_com_free": "w/o periodic CoM-free noising",
    "no_pm_vm": "w/o probabilistic model and von Mises",
    "no_vm": "w/o von Mises",
    "no_pm": "w/o probabilistic model",
    "diffcsp": "DiffCSP (all off)",
}
STEP_LR_METRIC = "val_match_rate"


class SweepError(ValueError):
    """A sweep that cannot start, with the reason."""


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]


Domain = FloatRange | IntRange | Choice


def domain_problem(domain: Domain) -> str:
    """Why a domain holds nothing to search, or ""."""
    if isinstance(domain, Choice):
        return "no options" if not domain.options else ""
    if not domain.low < domain.high:
        return f"low {domain.low} is not below high {domain.high}"
    if domain.log and domain.low <= 0:
        return f"a log-scale range needs low > 0, not {domain.low}"
    return ""


def domain_contains(domain: Domain, value: Any) -> bool:
    if isinstance(domain, Choice):
        return value in domain.options
    return domain.low <= value <= domain.high


def suggest(trial, name: str, domain: Domain) -> Any:
    if isinstance(domain, FloatRange):
        return trial.suggest_float(name, domain.low, domain.high, log=domain.log)
    if isinstance(domain, IntRange):
        return trial.suggest_int(name, domain.low, domain.high, log=domain.log)
    return trial.suggest_categorical(name, list(domain.options))


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep. Config fields are named `section.field` as everywhere else."""

    name: str
    preset: str = "perov_5"
    arms: tuple[str, ...] = tuple(ARM_LABELS)
    seeds: tuple[int, ...] = (0,)
    trials_per_cell: int = 1  # Optuna trials per (arm, seed); the first uses the config's defaults
    space: dict[str, Domain] = field(default_factory=lambda: {"objective.perm_loss_weight": FloatRange(0.1, 10, True)})
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed config fields for every trial
    step_lr: FloatRange = FloatRange(1e-6, 1e-3, log=True)
    step_lr_trials: int = 6
    step_lr_crystals: int = 64  # validation crystals sampled per step size
    test_samples: int = 1  # k of the final evaluation (best of k)
    test_limit: int | None = None  # None: the whole test split
    asha: bool = False  # stop poor trials early on the validation loss
    search_seed: int = 0

    def arm_space(self, arm: str) -> dict[str, Domain]:
        """The searched fields that act in this arm (the permutation-loss weight only with the loss)."""
        has_perm_loss = OBJECTIVE_PRESETS[arm].perm_loss
        return {name: domain for name, domain in self.space.items()
                if name != "objective.perm_loss_weight" or has_perm_loss}

    def config_for(self, arm: str, values: dict[str, Any]):
        return make_config(self.preset, arm, {**self.overrides, **values})


@dataclass(frozen=True)
class SweepLaunch:
    """Where and how a sweep runs."""

    tracking_uri: str | None = None
    experiment: str = "equicsp-sweeps"
    storage_path: str | None = None  # default ./runs/sweeps; shared storage (s3://, NFS) on a cluster
    workers_per_trial: int = 1  # Ray Train workers of each training run
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    max_concurrent: int = 0  # 0: as many trials as the cluster fits
    max_failures: int = 2
    eval_workers: int = 0  # final evaluation sampling workers (0: one per GPU, else one per CPU)


def validate_spec(spec: SweepSpec) -> None:
    """Everything about the spec that can be wrong, before Ray starts."""
    unknown = [arm for arm in spec.arms if arm not in ARM_LABELS]
    if unknown:
        raise SweepError(f"unknown arm(s) {unknown}; the arms are {list(ARM_LABELS)}")
    if not spec.arms or not spec.seeds:
        raise SweepError("a sweep needs at least one arm and one seed")
    if spec.trials_per_cell < 1 or spec.step_lr_trials < 1 or spec.test_samples < 1 or spec.step_lr_crystals < 1:
        raise SweepError("trials, step_lr trials, test samples and step_lr crystals must all be >= 1")
    for name, domain in {**spec.space, "sampler.step_lr": spec.step_lr}.items():
        problem = domain_problem(domain)
        if problem:
            raise SweepError(f"the search space for {name} is empty: {problem}")
    for arm in spec.arms:
        try:
            config = spec.config_for(arm, {})
            apply_overrides(config, {name: _example(domain) for name, domain in spec.arm_space(arm).items()})
        except ConfigError as error:
            raise SweepError(f"arm {arm}: {error}") from None
    if spec.trials_per_cell > 1 and not any(spec.arm_space(arm) for arm in spec.arms):
        raise SweepError(f"{spec.trials_per_cell} trials per cell asked for, but the search space is empty for "
                         f"every arm: nothing for Optuna to choose")


def _example(domain: Domain) -> Any:
    return domain.options[0] if isinstance(domain, Choice) else domain.low


class SearchSpace:
    """Optuna's define-by-run space: the cell (arm, seed), then the arm's searched fields.

    A class rather than a closure: Tune pickles the searcher with the space when it saves
    the sweep's state for a resume.
    """

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    def __call__(self, trial) -> None:
        arm = trial.suggest_categorical("arm", list(self.spec.arms))
        trial.suggest_categorical("run.seed", list(self.spec.seeds))
        for name, domain in self.spec.arm_space(arm).items():
            suggest(trial, name, domain)


def initial_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every cell trials_per_cell times; the first trial of a cell runs the config's own values."""
    points = []
    for arm in spec.arms:
        defaults = spec.config_for(arm, {}).flat()
        for seed in spec.seeds:
            for trial in range(spec.trials_per_cell):
                point: dict[str, Any] = {"arm": arm, "run.seed": seed}
                if trial == 0:
                    point.update({name: defaults[name] for name, domain in spec.arm_space(arm).items()
                                  if domain_contains(domain, defaults[name])})
                points.append(point)
    return points


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs besides its own parameters (passed once through the object store)."""

    spec: SweepSpec
    launch: SweepLaunch
    tracking_uri: str
    experiment: str
    parent_run_id: str
    storage: str


def sweep_trial(params: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: train (Ray Train, reporting each checkpoint to Tune), then search step_lr on validation."""
    import ray.tune


    spec, launch = context.spec, context.launch
    arm = params["arm"]
    values = {name: value for name, value in params.items() if name != "arm"}
    config = spec.config_for(arm, values)
    trial_id = ray.tune.get_context().get_trial_id()
    tags = {"arm": arm, "seed": str(config.run.seed), "equicsp.sweep": context.parent_run_id, "trial_id": trial_id,
            **{f"switch.{name}": str(value) for name, value in asdict(config.objective).items()}}
    options = LaunchOptions(num_workers=launch.workers_per_trial, use_gpu=launch.use_gpu,
                            tracking_uri=context.tracking_uri, experiment=context.experiment,
                            run_name=f"{spec.name}-{arm}-seed{config.run.seed}-{trial_id}",
                            storage_path=f"{context.storage}/train", max_failures=launch.max_failures,
                            parent_run_id=context.parent_run_id, extra_tags=tags, report_to_tune=True)
    result = run_training(config, options)
    search = search_step_lr(result.run_id, context)
    final = {**result.history[-1], **search, "training_run_id": result.run_id}
    ray.tune.report(final)


def search_step_lr(run_id: str, context: TrialContext) -> dict[str, float]:
    """Optuna over the Langevin step size (log scale): match rate on validation crystals, most wins.

    Logged to the training run (one step per Optuna trial); a run that holds the search
    already (a trial resumed after its driver died) answers from it.
    """
    import optuna


    uri, spec = context.tracking_uri, context.spec
    logged = tracking.get_run(uri, run_id).data.metrics
    if "tuned_step_lr" in logged:
        return {key: logged[key] for key in ("tuned_step_lr", STEP_LR_METRIC, "val_rmse") if key in logged}
    checkpoint = tracking.read_logged_checkpoint(uri, run_id)
    config = config_from_dict(checkpoint["config"])
    validation = load_splits(config, ("val",), show_progress=False)["val"]
    connect_ray()
    settings = EvaluationSettings(num_samples=1, seed=0, limit=spec.step_lr_crystals,
                                  workers=0 if context.launch.use_gpu else 1, threads=1)

    def objective(trial: optuna.Trial) -> float:
        step_lr = trial.suggest_float("step_lr", spec.step_lr.low, spec.step_lr.high, log=spec.step_lr.log)
        # One seed for every step size: the step sizes are compared on the same noise.
        evaluation = evaluate_checkpoint(checkpoint, validation, replace(settings, step_lr=step_lr),
                                         show_progress=False, pool=pool)
        trial.set_user_attr("rmse", evaluation.summary.rmse)
        tracking.log_metrics(uri, run_id, {"step_lr_search/step_lr": step_lr,
                                           "step_lr_search/match_rate": evaluation.summary.match_rate},
                             step=trial.number)
        return evaluation.summary.match_rate

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=spec.search_seed))
    default = config.sampler.step_lr
    if spec.step_lr.low <= default <= spec.step_lr.high:
        study.enqueue_trial({"step_lr": default})  # never worse on validation than the config's step size
    with SamplingPool(checkpoint, settings.workers, settings.threads) as pool:
        study.optimize(objective, n_trials=spec.step_lr_trials)
    best = study.best_trial
    result = {"tuned_step_lr": best.params["step_lr"], STEP_LR_METRIC: best.value}
    if not math.isnan(best.user_attrs["rmse"]):
        result["val_rmse"] = best.user_attrs["rmse"]
    tracking.log_metrics(uri, run_id, result)
    return result


class FinalResultOptunaSearch(OptunaSearch):
    """OptunaSearch that learns from each trial's final result only.

    The epochs a trial reports along the way (for ASHA and the progress table) do not hold
    the search metric, which only exists once the step size has been searched.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


@dataclass
class CellResult:
    """The best trial of one (arm, seed) cell and its test evaluation."""

    arm: str
    seed: int
    training_run_id: str
    evaluation_run_id: str
    step_lr: float
    val_match_rate: float
    test_match_rate: float
    test_rmse: float  # nan when nothing matched
    searched: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    cells: list[CellResult]
    table: list[dict[str, Any]]
    artifacts: dict[str, Path]


def resolve_storage(storage_path: str | None) -> str:
    if storage_path and "://" in storage_path:
        return storage_path.rstrip("/")
    return str(Path(storage_path or Path.cwd() / "runs" / "sweeps").expanduser().resolve())


def _with_absolute_data_path(spec: SweepSpec) -> SweepSpec:
    """Trials run in their own working directories: a relative dataset path is made absolute here."""
    path = spec.overrides.get("data.path")
    if path is None or "://" in str(path) or str(path).startswith("bundled:"):
        return spec
    return replace(spec, overrides={**spec.overrides, "data.path": str(Path(path).expanduser().resolve())})


def check_data_on_cluster(spec: SweepSpec) -> None:
    """The dataset loads here and exists where Ray runs tasks (on a cluster, a worker node may not see it)."""
    import ray


    config = spec.config_for(spec.arms[0], {})
    try:
        load_splits(config)
    except DatasetError as error:
        raise SweepError(f"dataset: {error}") from None
    problem = ray.get(ray.remote(num_cpus=0)(_data_problem).remote(config.data.path))
    if problem:
        raise SweepError(f"dataset on the cluster: {problem}")


def _data_problem(path: str) -> str:

    resolved = resolve_path(path)
    return "" if resolved.is_dir() else f"{path} is not a folder on node {_node_name()}"


def _node_name() -> str:
    import socket

    return socket.gethostname()


def run_sweep(spec: SweepSpec, launch: SweepLaunch = SweepLaunch(), show_progress: bool = True) -> SweepResult:
    """Train every cell's trials, search each model's step size, evaluate each cell's best on test, report."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler


    validate_spec(spec)
    spec = _with_absolute_data_path(spec)
    uri = tracking.resolve_tracking_uri(launch.tracking_uri)
    tracking.check_reachable(uri)
    connect_ray()
    if launch.use_gpu is None:
        import ray

        launch = replace(launch, use_gpu=ray.cluster_resources().get("GPU", 0) > 0)
    check_data_on_cluster(spec)
    storage = resolve_storage(launch.storage_path)
    experiment_id = tracking.ensure_experiment(uri, launch.experiment)
    parent = tracking.start_sweep_run(uri, experiment_id, run_key=f"{storage}/{spec.name}", run_name=spec.name,
                                      params=sweep_params(spec, launch))
    # Epoch results carry the training metrics only; the searched metric arrives with a trial's last result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    context = TrialContext(spec, launch, uri, launch.experiment, parent, storage)
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, context=context), {"CPU": 0.01})
    experiment_path = f"{storage}/{spec.name}"
    if tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        points = initial_points(spec)
        searcher = FinalResultOptunaSearch(SearchSpace(spec), metric=STEP_LR_METRIC, mode="max",
                                            points_to_evaluate=points, seed=spec.search_seed)
        epochs = spec.config_for(spec.arms[0], {}).optim.epochs
        # Trials report at their checkpoints, so ASHA counts epochs rather than reports; max_t lies past the
        # last epoch, or ASHA would stop every trial at its last checkpoint, before the step-size search.
        scheduler = (ASHAScheduler(metric="val_denoise", mode="min", time_attr="epoch", max_t=epochs + 1,
                                   grace_period=max(1, epochs // 4)) if spec.asha else None)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=len(points),
                                        max_concurrent_trials=_concurrent_trials(launch)),
            run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=1 if show_progress else 0,
                                      failure_config=tune.FailureConfig(max_failures=launch.max_failures)),
        )
    grid = tuner.fit()
    tracking.mark_unfinished_children_killed(uri, parent)
    trials = [result.metrics for result in grid if result.metrics and STEP_LR_METRIC in result.metrics]
    if not trials:
        errors = [str(result.error) for result in grid if result.error is not None]
        raise SweepError("no trial finished" + (f"; first error: {errors[0]}" if errors else ""))
    cells = [evaluate_cell(best, spec, launch, uri, show_progress) for best in best_per_cell(trials, spec)]
    table = ablation_table(cells, spec)
    artifacts = write_sweep_report(cells, table, spec, uri, parent)
    return SweepResult(parent, uri, cells, table, artifacts)


def _concurrent_trials(launch: SweepLaunch) -> int:
    """Trials that can train at once; a trial function holds almost nothing, its Train workers hold the cores."""
    import ray

    if launch.max_concurrent:
        return launch.max_concurrent
    resources = ray.cluster_resources()
    unit = "GPU" if launch.use_gpu else "CPU"
    return max(1, int(resources.get(unit, 1)) // launch.workers_per_trial)


def sweep_params(spec: SweepSpec, launch: SweepLaunch) -> dict[str, Any]:
    params = {f"sweep.{key}": value for key, value in asdict(spec).items() if key not in ("space", "overrides")}
    params.update({f"space.{name}": domain for name, domain in spec.space.items()})
    params.update({f"override.{name}": value for name, value in spec.overrides.items()})
    params.update({f"launch.{key}": value for key, value in asdict(launch).items() if key != "tracking_uri"})
    return params


def best_per_cell(trials: list[dict[str, Any]], spec: SweepSpec) -> list[dict[str, Any]]:
    """Each (arm, seed)'s best trial: highest validation match rate, then lowest validation loss."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for trial in trials:
        params = trial["config"]
        key = (params["arm"], int(params["run.seed"]))
        rank = (trial[STEP_LR_METRIC], -trial.get("val_denoise", math.inf))
        if key not in best or rank > (best[key][STEP_LR_METRIC], -best[key].get("val_denoise", math.inf)):
            best[key] = trial
    return [best[(arm, seed)] for arm in spec.arms for seed in spec.seeds if (arm, seed) in best]


def evaluate_cell(trial: dict[str, Any], spec: SweepSpec, launch: SweepLaunch, uri: str,
                  show_progress: bool) -> CellResult:
    """The final test evaluation of one cell's best model at its tuned step size (an MLflow child run)."""

    params = trial["config"]
    arm, seed = params["arm"], int(params["run.seed"])
    settings = EvaluationSettings(num_samples=spec.test_samples, seed=0, limit=spec.test_limit,
                                  workers=launch.eval_workers, step_lr=trial["tuned_step_lr"])
    evaluation = evaluate_logged_run(trial["training_run_id"], settings, tracking_uri=uri,
                                     show_progress=show_progress)  # the run inherits arm, seed and switches
    searched = {name: value for name, value in params.items() if name not in ("arm", "run.seed")}
    return CellResult(arm, seed, trial["training_run_id"], evaluation.run_id, trial["tuned_step_lr"],
                      trial[STEP_LR_METRIC], evaluation.summary.match_rate, evaluation.summary.rmse, searched)


def _mean_spread(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def ablation_table(cells: list[CellResult], spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per arm: test match rate and RMSE as mean and standard deviation over seeds."""
    rows = []
    for arm in spec.arms:
        mine = [cell for cell in cells if cell.arm == arm]
        if not mine:
            continue
        match_mean, match_std = _mean_spread([100 * cell.test_match_rate for cell in mine])
        rmse_mean, rmse_std = _mean_spread([cell.test_rmse for cell in mine])
        rows.append({"arm": arm, "variant": ARM_LABELS[arm], "seeds": len(mine),
                     "match_rate_mean": match_mean, "match_rate_std": match_std,
                     "rmse_mean": rmse_mean, "rmse_std": rmse_std,
                     "val_match_rate_mean": _mean_spread([100 * cell.val_match_rate for cell in mine])[0],
                     "step_lr": " ".join(f"{cell.step_lr:.3g}" for cell in mine),
                     "searched": "; ".join(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in cell.searched.items()) for cell in mine)})
    return rows


def table_markdown(table: list[dict[str, Any]], spec: SweepSpec) -> str:
    lines = [f"# Ablation: {spec.name} ({spec.preset}, {len(spec.seeds)} seed(s), k = {spec.test_samples})", "",
             "| variant | match rate (%) | RMSE | val match rate (%) | step_lr | searched |",
             "|---|---|---|---|---|---|"]
    for row in table:
        spread = row["seeds"] > 1  # one seed has no spread to show
        match = f"{row['match_rate_mean']:.2f}" + (f" ± {row['match_rate_std']:.2f}" if spread else "")
        rmse = "n/a" if math.isnan(row["rmse_mean"]) else \
            f"{row['rmse_mean']:.4f}" + (f" ± {row['rmse_std']:.4f}" if spread else "")
        lines.append(f"| {row['variant']} | {match} | {rmse} | "
                     f"{row['val_match_rate_mean']:.1f} | {row['step_lr']} | {row['searched'] or '-'} |")
    return "\n".join(lines) + "\n\nMean ± standard deviation over seeds; each seed's best trial, at its tuned step size.\n"


def write_sweep_report(cells: list[CellResult], table: list[dict[str, Any]], spec: SweepSpec, uri: str,
                       parent: str) -> dict[str, Path]:
    """The table (Markdown + CSV), the per-cell CSV, the bar chart and learning curves, logged to the parent."""

    out = Path(tempfile.mkdtemp(prefix="equicsp-sweep-"))
    files = {"table_md": out / "ablation_table.md", "table_csv": out / "ablation_table.csv",
             "cells_csv": out / "ablation_cells.csv", "bars": out / "ablation_bars.png",
             "curves": out / "learning_curves.png"}
    files["table_md"].write_text(table_markdown(table, spec))
    _write_csv(files["table_csv"], table)
    _write_csv(files["cells_csv"], [{**asdict(cell), "searched": cell.searched} for cell in cells])
    ablation_bars(table, files["bars"], title=spec.name)
    curves = {cell.arm: [] for cell in cells}
    for cell in cells:
        curves[cell.arm].append((cell.seed, tracking.metric_history(uri, cell.training_run_id, "val_total"),
                                 tracking.metric_history(uri, cell.training_run_id, "train_total")))
    arm_learning_curves(curves, files["curves"], labels=ARM_LABELS)
    metrics = {}
    for row in table:
        metrics[f"{row['arm']}/match_rate"] = row["match_rate_mean"] / 100
        if not math.isnan(row["rmse_mean"]):
            metrics[f"{row['arm']}/rmse"] = row["rmse_mean"]
    tracking.log_metrics(uri, parent, metrics)
    for path in files.values():
        tracking.log_artifact(uri, parent, path)
    tracking.client(uri).set_terminated(parent, "FINISHED")
    return files


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["arm"])
        writer.writeheader()
        writer.writerows(rows)
