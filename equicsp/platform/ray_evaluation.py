"""CSP evaluation on a Ray cluster: sampling actors and matching tasks.

Sampling runs on one actor per GPU (or on CPU workers, one core each by default);
matching runs in one-CPU Ray tasks over the whole cluster. The sampling batches are cut
from the whole test set by `sampler.batch_size` alone and every crystal's noise is keyed by
(seed, composition index, sample number), so the predictions are the same whichever worker
samples which batch, whatever the number of workers, and as `csp.Evaluator.here` gives.
A pool none of whose actors can start within `WORKER_START_TIMEOUT_S` samples and matches in
the calling process instead, with the same model, batches and threads (so the same predictions).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from equicsp.config import Config, config_from_dict
from equicsp.data.crystals import CrystalDataset
from equicsp.devices import resolve_device
from equicsp.engine.checkpoint import model_from_checkpoint
from equicsp.engine.compiled import forget_compiled_steps
from equicsp.engine.sampler import SampledCrystal, Sampler, SamplingJob, sampling_batches
from equicsp.evaluation.cross_matching import match_work
from equicsp.evaluation.csp import Evaluation, EvaluationSettings, Evaluator
from equicsp.evaluation.metrics import matching_chunk_size
from equicsp.model.diffusion import Diffusion
from equicsp.platform.ray_cluster import connect_ray

# How long a pool waits for its first actor before it samples in the calling process. Actors wait
# for CPUs (GPUs) others hold: in a sweep, another trial's training, or the placement group of a
# trial that early stopping ended, which Ray Train frees only once its state API sees the trial's
# controller dead (never, without the dashboard: see sweep.cluster.check_stopped_trials_are_freed).
WORKER_START_TIMEOUT_S = 120.0


class SamplingWorker:
    """A Ray actor holding one copy of a model; samples the batches it is handed, with any sampler settings."""

    def __init__(self, checkpoint: dict[str, Any] | None, precision: str, threads: int):
        torch.set_num_threads(threads)
        self.device = resolve_device("auto")  # the GPU Ray assigned to this actor, if any
        self.model = None if checkpoint is None else model_from_checkpoint(checkpoint, self.device)[1]
        self.precision = precision
        self.diffusions: dict[str, Any] = {}  # one per diffusion config (its von Mises tables), kept across models

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Sample with this checkpoint's model from now on. On a GPU the previous model's compiled steps and
        CUDA-graph memory are let go first, as a fresh process would hold none."""
        self.model = None
        if self.device.type == "cuda":
            forget_compiled_steps(self.device)
        _, self.model = model_from_checkpoint(checkpoint, self.device)

    def sample(self, config: dict[str, Any], jobs: list[SamplingJob], seed: int) -> list[SampledCrystal]:
        if self.model is None:
            raise RuntimeError("this sampling worker holds no model yet: SamplingPool.use names one first")
        sampling_config = config_from_dict(config)
        key = repr(sampling_config.diffusion) + repr(sampling_config.objective)
        if key not in self.diffusions:
            self.diffusions[key] = Diffusion(sampling_config, self.device)
        sampler = Sampler(self.model, self.diffusions[key], sampling_config, self.device, self.precision)
        return sampler.sample_jobs(jobs, seed)

    def match(self, start: int, jobs: list) -> tuple[int, list]:
        return _match_chunk(start, jobs)

    def ready(self) -> bool:
        return True


def _match_chunk(start: int, jobs: list) -> tuple[int, list]:
    """The answers of jobs (one-to-one matches or METRe tiles, cross_matching.match_work), and where they start."""
    return start, [match_work(job) for job in jobs]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads for a block, the caller's restored after (sampling in the caller's process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sampling_resources(workers: int, threads: int = 1) -> tuple[int, bool, int]:
    """(workers, use_gpu, threads per worker) for this Ray cluster; fails before anything starts.

    workers = 0 takes the GPUs (else CPUs) free now, at least one: a Tune trial that ASHA stopped
    can keep its placement group's CPU for a while after the sweep's trials end, and a pool
    sized by the cluster's total would wait for it (predictions do not depend on the count).
    """
    import ray

    resources, free = ray.cluster_resources(), ray.available_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        workers = workers or max(1, min(gpus, int(free.get("GPU", 0))))
        if workers > gpus:
            raise ValueError(f"{workers} sampling workers asked for, but the cluster has {gpus} GPUs")
        return workers, True, 1
    workers = workers or max(1, min(cpus, int(free.get("CPU", 0))) // threads)
    if workers * threads > cpus:
        raise ValueError(f"{workers} sampling workers x {threads} threads asked for, but the cluster has {cpus} CPUs")
    return workers, False, threads


class SamplingPool:
    """Sampling actors holding a model, kept across evaluations: a step-size search reuses them for one model,
    a sweep's final stage for every cell's (`use` hands them the next).

    The actors start at the first evaluation (`wait_ready`), sized by what the cluster has free
    then: a sweep's final stage whose cells were all evaluated before it was resumed starts none.
    When none of them can start within start_timeout_s (default `WORKER_START_TIMEOUT_S`), the
    pool samples and matches in the calling process instead, and says so on stderr.
    """

    def __init__(self, checkpoint: dict[str, Any] | None, workers: int = 0, threads: int = 1,
                 precision: str = "fp32", start_timeout_s: float | None = None):
        """checkpoint: the model to start with; None when `use` will name one before the first evaluation."""
        self.workers, self.threads, self.use_gpu = workers, threads, False  # decided when the actors start
        self.precision = precision
        self.start_timeout_s = WORKER_START_TIMEOUT_S if start_timeout_s is None else start_timeout_s
        self.here: SamplingWorker | None = None  # the model in this process, once no actor could start
        self.actors: list[Any] = []
        self._checkpoint = checkpoint
        self._started = False

    def _start_actors(self) -> None:
        import ray

        self.workers, self.use_gpu, self.threads = sampling_resources(self.workers, self.threads)
        # "DEFAULT": outside the caller's placement group (a Tune trial holds almost no resources of its own).
        actor = ray.remote(SamplingWorker).options(num_cpus=self.threads, num_gpus=1 if self.use_gpu else 0,
                                                   scheduling_strategy="DEFAULT")
        checkpoint_ref = ray.put(self._checkpoint)
        self.actors = [actor.remote(checkpoint_ref, self.precision, self.threads) for _ in range(self.workers)]

    @property
    def in_process(self) -> bool:
        return self.here is not None

    def wait_ready(self, grace_s: float = 30.0) -> None:
        """Until one actor has started and loaded the model, and the others have had grace_s seconds more; those
        not started by then are let go (the predictions do not depend on the number of actors). With no actor
        started within start_timeout_s, the model is loaded here and the pool samples in this process.

        Waiting for every actor, or for the first one without a limit, could wait forever: in a sweep
        another trial's training, or the placement group of a trial that early stopping ended, can
        hold the CPUs they need while this trial holds the first actor's or its own (seen: the
        step-size search of one trial and the training of the next waited on each other).
        """
        import ray

        if self._started:
            return
        self._started = True
        self._start_actors()
        waiting = {worker.ready.remote(): worker for worker in self.actors}
        first, _ = ray.wait(list(waiting), num_returns=1, timeout=self.start_timeout_s)
        if not first:
            self._load_here()
            return
        ray.get(first)  # an actor that failed to start raises here
        ready, late = ray.wait(list(waiting), num_returns=len(waiting), timeout=grace_s)
        ray.get(ready)
        for ref in late:
            ray.kill(waiting[ref])
        self.actors = [waiting[ref] for ref in ready]
        self.workers = len(self.actors)

    def use(self, checkpoint: dict[str, Any]) -> None:
        """Sample with this checkpoint's model from now on: the started actors (or this process) load it."""
        import ray

        self.wait_ready()
        if checkpoint is self._checkpoint:
            return
        self._checkpoint = checkpoint
        if self.here is not None:
            with torch_threads(self.threads):
                self.here.load(checkpoint)
        else:
            checkpoint_ref = ray.put(checkpoint)
            ray.get([worker.load.remote(checkpoint_ref) for worker in self.actors])

    def _load_here(self) -> None:
        import ray

        free = {name: amount for name, amount in ray.available_resources().items() if name in ("CPU", "GPU")}
        self.close()
        with torch_threads(self.threads):
            self.here = SamplingWorker(self._checkpoint, self.precision, self.threads)
        self.workers = 1
        print(f"equicsp: no sampling worker could start on Ray within {self.start_timeout_s:g} s (free now: {free}); "
              f"sampling and matching in this process instead, on {self.here.device} with {self.threads} thread(s): "
              "the same predictions, one worker's speed", file=sys.stderr, flush=True)

    def sample(self, config: Config, compositions: list[torch.Tensor], indices: list[int], num_samples: int,
               seed: int, show_progress: bool = True, label: str = "") -> list[SampledCrystal]:
        """k samples of every composition, the batches spread over the actors; label names the bar (e.g. the arm)."""
        from ray.util import ActorPool

        batches = sampling_batches(compositions, num_samples, config.sampler.batch_size, indices)
        settings = config.to_dict()
        if self.here is not None:
            outputs = (self._run_here(self.here.sample, settings, jobs, seed) for jobs in batches)
        else:
            outputs = ActorPool(self.actors).map_unordered(
                lambda worker, jobs: worker.sample.remote(settings, jobs, seed), batches)
        predictions: list[SampledCrystal] = []
        for crystals in tqdm(outputs, total=len(batches), desc=_bar(label, f"sampling ({self.workers} workers)"), unit="batch",
                             disable=not show_progress):
            predictions.extend(crystals)
        return predictions

    def match(self, jobs: list, show_progress: bool = True, label: str = "") -> list:
        """StructureMatcher on the pool's own actors (which hold their CPUs for as long as the pool lives)."""
        from ray.util import ActorPool

        size = matching_chunk_size(len(jobs), self.workers)
        chunks = [(start, jobs[start:start + size]) for start in range(0, len(jobs), size)]
        if self.here is not None:
            outputs = (_match_chunk(*chunk) for chunk in chunks)
        else:
            outputs = ActorPool(self.actors).map_unordered(lambda worker, chunk: worker.match.remote(*chunk), chunks)
        return in_job_order(list(tqdm(outputs, total=len(chunks), desc=_bar(label, "matching"), unit="chunk",
                                      disable=not show_progress)))

    def _run_here(self, method: Callable[..., list[SampledCrystal]], *args: Any) -> list[SampledCrystal]:
        with torch_threads(self.threads):  # the actors' thread count: the same numbers as theirs
            return method(*args)

    def close(self) -> None:
        import ray

        for worker in self.actors:
            ray.kill(worker)
        self.actors = []
        self.here = None

    def __enter__(self) -> SamplingPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _bar(label: str, what: str) -> str:
    return f"{label}: {what}" if label else what


def free_cpus() -> int:
    import ray

    return int(ray.available_resources().get("CPU", 0))


def match_on_ray(jobs: list, show_progress: bool = True, label: str = "") -> list:
    """StructureMatcher over every job (cross_matching.match_work) in one-CPU Ray tasks; results in the jobs' order."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    chunk = matching_chunk_size(len(jobs), cpus)
    task = ray.remote(num_cpus=1, scheduling_strategy="DEFAULT")(_match_chunk)
    pending = [task.remote(start, jobs[start:start + chunk]) for start in range(0, len(jobs), chunk)]
    parts: list[tuple[int, list]] = []
    with tqdm(total=len(jobs), desc=_bar(label, "matching"), unit="job", disable=not show_progress) as progress:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            parts.append(ray.get(done[0]))
            progress.update(len(parts[-1][1]))
    return in_job_order(parts)


def in_job_order(parts: list[tuple[int, list]]) -> list:
    """The answers of chunks that came back in any order, (first job's position, answers) each, in job order."""
    return [answer for _, answers in sorted(parts, key=lambda part: part[0]) for answer in answers]


@dataclass
class MatchingOnRay:
    """StructureMatcher beside a sampling pool: on Ray tasks spread over the cluster, or on the pool's own workers.

    The pool's actors hold their CPUs, and Ray tasks might wait on them forever; so a pool of
    one evaluation (`pool_is_ours`) is closed first and its CPUs go to the tasks. A pool kept
    for later evaluations matches on its actors, unless they are GPU workers and more CPUs than
    actors are free: then Ray tasks match there. A pool that samples in this process (no actor
    could start) matches here too: Ray tasks would wait for the same CPUs.
    """

    pool: SamplingPool
    pool_is_ours: bool

    def match(self, jobs: list, show_progress: bool = True, label: str = "") -> list:
        if self.pool.in_process:
            return self.pool.match(jobs, show_progress, label)
        if self.pool_is_ours:
            self.pool.close()
            return match_on_ray(jobs, show_progress, label)
        if self.pool.use_gpu and free_cpus() > self.pool.workers:
            return match_on_ray(jobs, show_progress, label)
        return self.pool.match(jobs, show_progress, label)


def evaluate_checkpoint(checkpoint: dict[str, Any], dataset: CrystalDataset, settings: EvaluationSettings,
                        show_progress: bool = True, pool: SamplingPool | None = None, label: str = "") -> Evaluation:
    """The evaluator on Ray, with a checkpoint read into memory: sampling actors, matching in Ray tasks.

    A pool can be passed in to keep its actors between evaluations (it is handed this checkpoint's
    model); without one, a pool samples and goes (see `MatchingOnRay` for where matching runs).
    """
    settings.check()
    connect_ray()
    begin = time.perf_counter()
    own_pool = pool is None
    pool = pool or SamplingPool(checkpoint, settings.workers, settings.threads, settings.precision)
    try:
        pool.use(checkpoint)
        startup_s = time.perf_counter() - begin
        evaluation = Evaluator(pool, MatchingOnRay(pool, own_pool)).evaluate(
            config_from_dict(checkpoint["config"]), dataset, settings, show_progress, label)
    finally:
        if own_pool:
            pool.close()
    evaluation.startup_s = startup_s
    return evaluation
