"""Which Ray a command uses, and what that Ray can hold.

A command joins a cluster only when asked: `--address` (kept in $RAY_ADDRESS, as Ray's own
tools read it), $RAY_ADDRESS, or the cluster that `ray start` registered on this machine
(Ray's address file; `ray submit` runs its script on the head, where `ray start` wrote it).
Otherwise it starts a private Ray of its own. It never joins a Ray it merely finds running
(`ray.init(address="auto")` scans the processes and would join another user's or a test
suite's), and it says in one line which it did.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ADDRESS_HELP = ("the Ray cluster to join (host:port, or 'local' for a private Ray; default: $RAY_ADDRESS, else the "
                "cluster `ray start` registered on this machine, else a private Ray started here)")


@dataclass(frozen=True)
class RayChoice:
    """The cluster to join (None: start a private Ray) and why, for the one line a command prints."""

    address: str | None
    reason: str
    registered: bool = False  # by `ray start`: joined as Ray's own default, which also picks up its auth token


def set_ray_address(address: str | None) -> None:
    """`--address`: every later `connect_ray` in this process (and the processes it starts) joins that cluster."""
    if address:
        os.environ["RAY_ADDRESS"] = address


@contextmanager
def state_api_of_this_cluster() -> Iterator[None]:
    """Ray's state API (`ray.util.state`) asks the cluster this process is connected to.

    By itself it takes $RAY_ADDRESS before any address it is given, and `local` there (or no
    address at all) makes it look for a Ray running on this machine: beside another user's Ray
    it failed ("found multiple active Ray instances") or asked the other one. Its own variable,
    RAY_API_SERVER_ADDRESS, comes first; it is set to this cluster's GCS for the block.
    """
    import ray

    previous = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = previous


def registered_cluster() -> tuple[str | None, str]:
    """(address, '') of the running cluster `ray start` registered on this machine for this user, else
    (None, why none is used: '' when there is none)."""
    from ray._private import services  # ray.init() reads the same file through it

    address = services.find_bootstrap_address(None)
    if not address:
        return None, ""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        owner = path.stat().st_uid
    except OSError:
        return None, ""
    if owner != os.getuid():
        return None, f"the cluster at {address} in {path} was registered by another user"
    running = services.find_gcs_addresses()
    if address not in running and not any(live.rsplit(":", 1)[-1] == address.rsplit(":", 1)[-1] for live in running):
        return None, f"the cluster at {address} that {path} names is not running any more"
    return address, ""


def choose_ray(address: str | None = None) -> RayChoice:
    """The address given, else $RAY_ADDRESS, else the cluster `ray start` registered here, else a private Ray."""
    given = address or os.environ.get("RAY_ADDRESS")
    if given:
        return RayChoice(None, "") if given == "local" else RayChoice(given, "as --address or RAY_ADDRESS asks")
    registered, problem = registered_cluster()
    if registered:
        return RayChoice(registered, "registered by `ray start` on this machine", registered=True)
    return RayChoice(None, problem)


def describe_resources() -> str:
    import ray

    resources = ray.cluster_resources()
    return f"{int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs"


def connect_ray(address: str | None = None, dashboard: bool = False) -> None:
    """Join the cluster `choose_ray` picks, or start a private Ray here (with its dashboard only when asked: a sweep
    with early stopping needs its state API, see sweep.cluster; on a laptop its processes take CPU from training)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    choice = choose_ray(address)
    if choice.address is None:
        # "local": a new Ray even where RAY_ADDRESS or a registered cluster would point elsewhere.
        ray.init(address="local", logging_level=logging.ERROR, log_to_driver=False, include_dashboard=dashboard)
        note = f" ({choice.reason})" if choice.reason else ""
        print(f"equicsp: started a private Ray on this machine ({describe_resources()}){note}; "
              "join a cluster with --address or RAY_ADDRESS", file=sys.stderr, flush=True)
        return
    try:
        # Ray enables token auth by itself only for the cluster it finds (no address given), not for one named.
        ray.init(address=None if choice.registered else choice.address, logging_level=logging.ERROR)
    except ConnectionError as error:
        raise ConnectionError(f"cannot join the Ray cluster at {choice.address} ({choice.reason}): "
                              f"{str(error).splitlines()[0]}") from None
    print(f"equicsp: joined the Ray cluster at {choice.address} ({choice.reason}; {describe_resources()})",
          file=sys.stderr, flush=True)


def cluster_capacity() -> dict[str, float]:
    """The most of each resource the cluster can hold: what it has now, or more where its autoscaler can add
    nodes (a GPU cluster whose GPU workers start on demand has no GPU until asked for one)."""
    import ray

    capacity = {name: float(amount) for name, amount in ray.cluster_resources().items()}
    try:  # Ray Train reads the autoscaler's limits the same way; a cluster without an autoscaler has none
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - the limits only widen the check; without them the current total stands
        limits = {}
    for name, amount in limits.items():
        capacity[name] = max(capacity.get(name, 0.0), float(amount))
    return capacity


def worker_unit(use_gpu: bool) -> str:
    """What one Ray Train worker reserves: one GPU (Ray Train asks no CPU of a GPU worker) or one CPU."""
    return "GPU" if use_gpu else "CPU"


def check_workers_fit(num_workers: int, use_gpu: bool) -> None:
    """A ValueError, before any run is opened, when the cluster can never hold num_workers training workers
    (Ray Train would wait for them, retrying every minute, for ever)."""
    unit = worker_unit(use_gpu)
    has = int(cluster_capacity().get(unit, 0))
    if num_workers > has:
        hint = ("train without --gpu, or join a GPU cluster with --address" if use_gpu
                else "use fewer --num-workers, or join a larger cluster with --address")
        raise ValueError(f"{num_workers} training worker(s) need {num_workers} {unit}(s), but the Ray cluster has "
                         f"{has or 'no'} {unit}{'s' if has != 1 else ''}: {hint}")
