"""What a sweep asks of the Ray cluster before it starts: the dataset where tasks run, and how many trials fit."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import ray

from equicsp.data import DatasetError, load_splits, resolve_path
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


def with_gpu_decided(launch: SweepLaunch) -> SweepLaunch:
    """use_gpu=None becomes: train on GPUs when the cluster has any."""
    if launch.use_gpu is not None:
        return launch
    return replace(launch, use_gpu=ray.cluster_resources().get("GPU", 0) > 0)


def concurrent_trials(launch: SweepLaunch) -> int:
    """Trials that can train at once; a trial function holds almost nothing, its Train workers hold the cores."""
    if launch.max_concurrent:
        return launch.max_concurrent
    resources = ray.cluster_resources()
    unit = "GPU" if launch.use_gpu else "CPU"
    return max(1, int(resources.get(unit, 1)) // launch.workers_per_trial)
