"""What a sweep asks of the Ray cluster before it starts: the dataset where tasks run, and how many trials fit."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path

import ray

from equicsp.data.crystals import DatasetError, resolve_path
from equicsp.data.splits import load_splits
from equicsp.platform.ray_cluster import cluster_capacity, state_api_of_this_cluster, worker_unit
from equicsp.sweep.spec import SweepError, SweepLaunch, SweepSpec


def with_absolute_data_path(spec: SweepSpec) -> SweepSpec:
    """Trials run in their own working directories: a relative dataset path is made absolute here."""
    path = spec.overrides.get("data.path")
    if path is None or "://" in str(path) or str(path).startswith("bundled:"):
        return spec
    return replace(spec, overrides={**spec.overrides, "data.path": str(Path(path).expanduser().resolve())})


def check_data_on_cluster(spec: SweepSpec) -> None:
    """The dataset loads here and exists where Ray runs tasks (on a cluster, a worker node may not see it)."""
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
    return "" if resolved.is_dir() else f"{path} is not a folder on node {socket.gethostname()}"


def check_stopped_trials_are_freed(spec: SweepSpec, wait_s: float = 20.0) -> None:
    """With early stopping, Ray's state API must answer (its dashboard may take wait_s seconds to start).

    A trial that ASHA stops is ended together with its Ray Train controller, so the training
    run's placement group is not removed by the run itself: Ray Train's placement-group cleaner
    removes it once the state API reports that controller dead. Without the state API (Ray
    installed without `ray[default]`, or a cluster started with --include-dashboard=false) its
    CPUs (GPUs) stay held until the sweep ends, and the trials after it wait for them forever.
    """
    if not spec.asha:
        return
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    deadline = time.monotonic() + wait_s
    while True:
        try:
            with state_api_of_this_cluster():
                list_actors(limit=1, timeout=10, raise_on_missing_output=False)
            return
        except RayStateApiException as error:
            if time.monotonic() > deadline:
                raise SweepError(
                    "early stopping (asha) needs Ray's state API, which does not answer here "
                    f"({str(error).splitlines()[0]}): Ray Train frees the CPUs (GPUs) of a trial that ASHA "
                    "stopped only through it, so later trials would wait for them forever. Install ray[default] "
                    "(equicsp depends on it; check `pip show aiohttp-cors grpcio`), start clusters with their "
                    "dashboard (no --include-dashboard=false), or sweep without asha") from None
            time.sleep(1)


def with_gpu_decided(launch: SweepLaunch) -> SweepLaunch:
    """use_gpu=None becomes: train on GPUs when the cluster has any."""
    if launch.use_gpu is not None:
        return launch
    return replace(launch, use_gpu=ray.cluster_resources().get("GPU", 0) > 0)


def concurrent_trials(launch: SweepLaunch) -> int:
    """Trials that run at once: as many as the cluster holds of their shares, at most launch.max_concurrent.

    A trial holds its workers' CPUs (GPUs) while it trains, then as many for the sampling workers
    of its step-size search (step_size.search_step_lr); the trial function itself holds none
    (driver.TRIAL_RESOURCES). Tune starts no more trials than this, so no trial waits on another's
    share: more would leave a worker group retrying its start every minute, for as long as
    another trial's step-size search runs. A trial that can never fit is refused here.
    """
    unit = worker_unit(bool(launch.use_gpu))
    capacity = int(cluster_capacity().get(unit, 0))
    if launch.workers_per_trial > capacity:
        raise SweepError(f"each trial trains on {launch.workers_per_trial} worker(s), one {unit} each, but the Ray "
                         f"cluster has {capacity or 'no'} {unit}{'s' if capacity != 1 else ''}: use fewer "
                         "--workers-per-trial" + (", or --gpu no" if launch.use_gpu else ""))
    fit = capacity // launch.workers_per_trial
    return min(launch.max_concurrent, fit) if launch.max_concurrent else fit
