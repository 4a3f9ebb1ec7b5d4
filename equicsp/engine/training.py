"""The per-process training loop: used as is by the Ray workers and by `python -m equicsp.train --local`.

Adam, ReduceLROnPlateau on the validation loss, gradient clipping by value, a checkpoint every `run.checkpoint_every`
epochs (last.pt) with the best epoch's weights (best.pt), and resume from the last. The best weights are copied on the
device when an epoch improves and written with the next checkpoint: a write waits for the device and copies every
tensor to the host (27-55 ms at Perov-5's size on a CPU; a GPU epoch should take under 0.1 s), and most early epochs
improve. Every epoch's shuffling is seeded by (seed, epoch) and every crystal's noise is keyed by (seed, epoch,
dataset index), so a resumed run continues exactly as an uninterrupted one would, and the noise does not depend on the
batch size or the number of workers.

A run resumes only a run of the same config and data: the fields in `RESUMABLE_FIELDS` (epochs,
checkpoint and log intervals, device, sampler) may change, any other difference is an error
naming the fields, and so are other crystals (every checkpoint carries the datasets' content
keys), raised before anything in the folder is written (run_folder.py).

When training diverges: a non-finite training loss in any step, or a non-finite validation
loss, stops the run with `TrainingDiverged` naming the epoch and the first bad step. Nothing
of that epoch is saved, so last.pt and best.pt keep the last good weights (best.pt is written
then, when a better epoch came after the last checkpoint). The losses are summed on the device
and read once per epoch, so the check costs no host synchronisation per step; a step with
non-finite gradients but a finite loss (gradients are clipped by value, so infinities become
finite) shows up as a non-finite loss in the next step or in validation.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from equicsp.config import Config, ConfigError
from equicsp.data.batches import DeviceCrystals
from equicsp.data.cache import check_cache_writable, write_text_atomically
from equicsp.data.crystals import CrystalDataset
from equicsp.data.splits import load_splits
from equicsp.devices import resolve_device
from equicsp.engine.checkpoint import load_weights, read_checkpoint, save_checkpoint, save_weights, unwrap
from equicsp.engine.compiled import LossStep, compile_enabled, configure_precision
from equicsp.engine.eta import EpochTimer, duration
from equicsp.engine.run_folder import (
    LOCAL_REMEDY,
    check_resumable,
    check_same_data,
    claimed_run_folder,
    refuse_other_data,
)
from equicsp.model.denoiser import build_denoiser
from equicsp.model.diffusion import Diffusion
from equicsp.model.num_atoms import atom_count_histogram
from equicsp.model.objective import Objective
from equicsp.task import task_of


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops and the epoch's weights are not saved."""


def shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    """The same on every worker, so they agree on the epoch's order before taking their shards."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class TrainingState:
    epoch: int = 0  # epochs completed
    best_val: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)


class DeviceClock:
    """Seconds of the device's work from its creation to stop(), read after a later read-back has waited for the
    device. On a GPU, CUDA events: they time the stream without a synchronisation of their own, where the host's
    clock would time only the launches. On a CPU, the host's clock."""

    def __init__(self, device: torch.device):
        self._events = None
        if device.type == "cuda":
            self._stream = torch.cuda.current_stream(device)
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record(self._stream)
        self._began, self._host_seconds = time.perf_counter(), 0.0

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record(self._stream)
        self._host_seconds = time.perf_counter() - self._began

    def seconds(self) -> float:
        if self._events is not None:
            return self._events[0].elapsed_time(self._events[1]) / 1000
        return self._host_seconds


@dataclass
class DevicePass:
    """One pass over a worker's shard, its loss sums still on the device (read back with others, once)."""

    prefix: str  # "train" or "val": the metrics' prefix
    sums: torch.Tensor  # (len(objective.loss_names),) float64: each loss term summed over crystals
    crystals: int = 0
    steps: int = 0
    clock: DeviceClock | None = None
    first_bad: torch.Tensor | None = None  # 1-based step of the first non-finite training loss, 0 when none

    def add(self, terms: torch.Tensor, crystals: int) -> None:
        self.sums += terms * crystals
        self.crystals += crystals
        self.steps += 1


# DistributedDataParallel's settings. The model's buffers are constants, the same on every worker:
# broadcasting them before each forward would be a collective per step and, compiled, a graph break.
DDP_SETTINGS = {"broadcast_buffers": False}


class TrainingLoop:
    """One process's training; Ray Train runs one per worker with its rank and world size.

    The global batch is optim.batch_size crystals: each of world_size workers takes
    batch_size / world_size of it, and DDP averages the gradients, so the update matches a
    single process on the whole batch at the same learning rate.
    """

    def __init__(self, config: Config, train_set: CrystalDataset, val_set: CrystalDataset,
                 device: torch.device, rank: int = 0, world_size: int = 1,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None, show_progress: bool = True,
                 compile_backend: str = "inductor"):
        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.train_set, self.val_set = train_set, val_set
        # What the crystals are, stored in every checkpoint: a resume on changed data is refused.
        self.data_keys = {"train": train_set.content_key(), "val": val_set.content_key()}
        # The data lives on the device; batches are cut there by index (batches.py).
        self.train_crystals, self.val_crystals = DeviceCrystals(train_set, device), DeviceCrystals(val_set, device)
        torch.manual_seed(config.run.seed)
        self.diffusion = Diffusion(config, device, announce=say if show_progress and rank == 0 else None)
        for dataset in (train_set, val_set):
            self.diffusion.check_atom_counts(dataset.num_atoms)
        model = build_denoiser(config).to(device)
        self.model = wrap_model(model) if wrap_model else model
        self.objective = Objective(self.diffusion, self.model, config.run.precision)
        # Compiled steps need static shapes: batches are padded to buckets with room for one padding crystal.
        compiled = self.compiled = compile_enabled(config.run.compile, device)
        configure_precision(config.run.precision, device, compiled)
        self.losses = LossStep(self.objective, config.run.seed, device, compiled, compile_backend,
                               distributed=wrap_model is not None)
        o = config.optim
        # Fused Adam: one kernel for every parameter on a GPU instead of a few per tensor (the same update).
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.lr, fused=device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=o.plateau_factor, patience=o.plateau_patience, min_lr=o.min_lr)
        self.state = TrainingState()
        self._best_weights: dict[str, torch.Tensor] | None = None  # on the device, not yet in best.pt
        self._best_epoch = 0
        self.show_progress = show_progress and rank == 0
        if o.batch_size % world_size:
            raise ConfigError(f"optim.batch_size {o.batch_size} is not divisible by {world_size} workers")
        self.local_batch_size = o.batch_size // world_size
        self.capacity = self.local_batch_size + 1 if compiled else None

    def _shard(self, dataset: CrystalDataset, epoch: int, shuffle: bool) -> list[list[int]]:
        """This worker's batches of the epoch, as lists of dataset indices."""
        order = (torch.randperm(len(dataset), generator=shuffle_generator(self.config.run.seed, epoch))
                 if shuffle else torch.arange(len(dataset)))
        # Every worker gets the same number of batches (DDP needs equal steps): pad by wrapping.
        per_worker = math.ceil(len(dataset) / self.world_size)
        order = torch.cat([order, order[:per_worker * self.world_size - len(order)]])
        mine = order[self.rank::self.world_size].tolist()
        return [mine[start:start + self.local_batch_size] for start in range(0, len(mine), self.local_batch_size)]

    def train_epoch(self) -> dict[str, float]:
        """One epoch of training: its metrics, read back from the device once."""
        done = self._train_pass()
        return self._train_metrics(done, *self._read_back(done))

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The objective on the validation set with fixed noise (the same draws every epoch)."""
        return self._validation_metrics(*self._read_back(self._validation_pass()))

    def step_epoch(self) -> dict[str, float]:
        """Train one epoch, validate, step the LR schedule; returns the epoch's metrics.

        Both passes' losses come back from the device together: one synchronisation an epoch.
        """
        train = self._train_pass()
        with torch.no_grad():
            val = self._validation_pass()
        train_means, val_means = self._read_back(train, val)
        metrics = self._train_metrics(train, train_means)
        metrics.update(self._validation_metrics(val_means))
        # The validation loss without the permutation term: comparable across permutation-loss weights.
        metrics["val_denoise"] = metrics["val_total"] - self.config.objective.perm_loss_weight * metrics["val_perm"]
        self.scheduler.step(metrics["val_total"])
        self.state.epoch += 1
        improved = metrics["val_total"] < self.state.best_val
        self.state.best_val = min(self.state.best_val, metrics["val_total"])
        if improved:
            self._keep_best_weights()
        metrics.update(epoch=self.state.epoch, lr=self.optimizer.param_groups[0]["lr"], improved=float(improved))
        self.state.history.append(metrics)
        return metrics

    def _train_pass(self) -> DevicePass:
        epoch = self.state.epoch
        self.model.train()
        clock, first_bad = DeviceClock(self.device), torch.zeros((), dtype=torch.long, device=self.device)
        done = DevicePass("train", self._zero_sums(), clock=clock, first_bad=first_bad)
        loader = self._shard(self.train_set, epoch, shuffle=True)
        batches = self.train_crystals.batches(loader, self.capacity)
        progress = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not self.show_progress)
        for (step, indices), batch in zip(enumerate(progress, start=1), batches):
            total, terms = self.losses(batch, epoch + 1)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_value_(self.model.parameters(), self.config.optim.grad_clip)
            self.optimizer.step()
            done.add(terms, len(indices))
            # 1-based step of the first nan/inf loss, kept on the device.
            done.first_bad = first_bad = torch.where((first_bad == 0) & ~torch.isfinite(terms[0]), step, first_bad)
        clock.stop()
        return done

    def _validation_pass(self) -> DevicePass:
        self.model.eval()
        done = DevicePass("val", self._zero_sums())
        loader = self._shard(self.val_set, 0, shuffle=False)
        for indices, batch in zip(loader, self.val_crystals.batches(loader, self.capacity)):
            _, terms = self.losses(batch, 0)  # step 0: the same draws every epoch
            done.add(terms, len(indices))
        return done

    def _zero_sums(self) -> torch.Tensor:
        return torch.zeros(len(self.objective.loss_names), dtype=torch.float64, device=self.device)

    def _read_back(self, *passes: DevicePass) -> list[dict[str, float]]:
        """Each pass's per-crystal loss means over every worker's shard: one all-reduce, one copy to the host."""
        # new_full fills on the device; new_tensor([n]) would be a copy from pageable host memory, which waits for
        # the device: a sync per pass.
        totals = torch.cat([torch.cat([done.sums, done.sums.new_full((1,), done.crystals)]) for done in passes])
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        rows = totals.cpu().view(len(passes), -1).tolist()
        return [{f"{done.prefix}_{name}": value / max(row[-1], 1.0) for name, value in zip(self.objective.loss_names, row)}
                for done, row in zip(passes, rows)]

    def _train_metrics(self, done: DevicePass, metrics: dict[str, float]) -> dict[str, float]:
        assert done.clock is not None and done.first_bad is not None  # _train_pass gives a training pass both
        if not all(math.isfinite(value) for value in metrics.values()):
            bad = int(done.first_bad)
            where = f"first at step {bad} of {done.steps}" if bad else "first on another worker"
            raise TrainingDiverged(f"training diverged: non-finite training loss in epoch {self.state.epoch + 1}, "
                                   f"{where} (optim.lr {self.optimizer.param_groups[0]['lr']:g}); nothing of this "
                                   "epoch is saved, the last checkpoints keep the last good weights")
        seconds = done.clock.seconds()
        metrics.update(crystals_per_s=done.crystals * self.world_size / seconds, epoch_time_s=seconds)
        return metrics

    def _validation_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        if not all(math.isfinite(value) for value in metrics.values()):
            raise TrainingDiverged(f"training diverged: non-finite validation loss after epoch {self.state.epoch + 1} "
                                   "(its last step left non-finite weights); nothing of this epoch is saved, "
                                   "the last checkpoints keep the last good weights")
        return metrics

    def _keep_best_weights(self) -> None:
        """A copy of the weights on the device (no host synchronisation), for save_best."""
        self._best_weights = {name: value.detach().clone() for name, value in unwrap(self.model).state_dict().items()}
        self._best_epoch = self.state.epoch

    def checkpoint_due(self) -> bool:
        """Whether the epoch just finished ends with a checkpoint (every run.checkpoint_every epochs, and the last)."""
        epoch = self.state.epoch
        return epoch % self.config.run.checkpoint_every == 0 or epoch == self.config.optim.epochs

    def save_checkpoints(self, folder: Path) -> None:
        """folder/best.pt when a better epoch came since the last write, then folder/last.pt."""
        self.save_best(folder / "best.pt")
        self.save(folder / "last.pt")

    def save_best(self, path: Path) -> None:
        """The best epoch's weights, when they are newer than the last ones written: what sampling reads (no
        optimiser state or history, which last.pt holds for resuming)."""
        if self._best_weights is None:
            return
        save_weights(path, self.config, self._best_weights, epoch=self._best_epoch, best_val=self.state.best_val,
                     tables_key=self.diffusion.tables_key or "", data_keys=self.data_keys,
                     **generation_state(self.config, self.train_set))
        self._best_weights = None

    def save(self, path: Path) -> None:
        """Everything a resumed run needs: weights, optimiser, schedule, history."""
        save_checkpoint(path, self.config, self.model, optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), epoch=self.state.epoch, best_val=self.state.best_val,
                        history=self.state.history, tables_key=self.diffusion.tables_key or "",
                        data_keys=self.data_keys, **generation_state(self.config, self.train_set))

    def restore(self, path: Path, remedy: str = LOCAL_REMEDY) -> None:
        """Continue from a checkpoint of last.pt's kind; a ConfigError when it was trained on other crystals."""
        stored = read_checkpoint(path, self.device)
        refuse_other_data(str(path), stored.get("data_keys"), self.data_keys, remedy)
        load_weights(self.model, stored["model"], path)
        self.optimizer.load_state_dict(stored["optimizer"])
        self.scheduler.load_state_dict(stored["scheduler"])
        self.state = TrainingState(int(stored["epoch"]), float(stored["best_val"]), list(stored.get("history", [])))


def generation_state(config: Config, train_set: CrystalDataset) -> dict[str, list[int]]:
    """What a generation checkpoint adds: the training set's atom-count histogram, from which N is drawn."""
    if not task_of(config).stores_atom_counts:
        return {}
    return {"num_atoms_distribution": atom_count_histogram(train_set.num_atoms, config.data.max_atoms)}


def say(line: str) -> None:
    """What a run is doing while it does it (tqdm's bars go to stderr too)."""
    print(line, file=sys.stderr, flush=True)


def start_line(loop: TrainingLoop) -> str:
    """The run in one line: its data, model size, device, epochs and batch."""
    config, train_set = loop.config, loop.train_set
    folder = Path(train_set.report.path).parent
    parameters = sum(parameter.numel() for parameter in loop.model.parameters())
    compiled = "; steps compiled during the first epoch" if loop.compiled else ""
    return (f"training: data {folder} ({len(train_set):,} train, {len(loop.val_set):,} val crystals); "
            f"model {config.model.num_layers} layers x {config.model.hidden_dim} hidden, "
            f"{parameters / 1e6:.2f} M parameters; device {loop.device}; "
            f"{config.optim.epochs} epochs, batch {config.optim.batch_size}{compiled}")


def epoch_line(metrics: dict[str, float], epochs: int, timer: EpochTimer) -> str:
    """'epoch k/N: losses, lr, speed, time left'; the time left once a second epoch is timed (the first warms up)."""
    epoch = int(metrics["epoch"])
    left = timer.left(epochs - epoch) if len(timer.seconds) > 1 and epoch < epochs else None
    eta = f", about {duration(left)} left" if left is not None else ""
    return (f"epoch {epoch}/{epochs}: train {metrics['train_total']:.4f} val {metrics['val_total']:.4f} "
            f"lr {metrics['lr']:.2e} {metrics['crystals_per_s']:.0f} crystals/s{eta}")


def resume_line(last: Path, epoch: int, epochs: int) -> str:
    if epoch >= epochs:
        return f"{last} is at epoch {epoch} of {epochs}: nothing left to train (raise --optim.epochs to go on)"
    return f"resuming from {last} at epoch {epoch} of {epochs}"


def train(config: Config, out_dir: Path, resume: bool = True, show_progress: bool = True) -> TrainingLoop:
    """Single-process training into out_dir/{last,best}.pt, resuming from last.pt when present.

    Resuming needs the same config and data as the stored run (see run_folder); every check
    runs, and the data is read, before anything in out_dir is written. The folder is held by
    this process for the whole run (run_folder.claimed_run_folder).
    """
    device = resolve_device(config.run.device)
    with claimed_run_folder(out_dir) as out_dir:
        if resume:
            check_resumable(config, out_dir)
        check_cache_writable()
        datasets = load_splits(config, ("train", "val"), show_progress)
        for dataset in datasets.values():
            if dataset.report.skipped:
                print(dataset.report.summary(), file=sys.stderr)
        loop = TrainingLoop(config, datasets["train"], datasets["val"], device, show_progress=show_progress)
        last = out_dir / "last.pt"
        if resume:
            check_same_data(out_dir, loop.data_keys)
        write_text_atomically(config.to_yaml(), out_dir / "config.yaml")
        if show_progress:
            print(start_line(loop), flush=True)
        if resume and last.exists():
            loop.restore(last)
            if show_progress:
                print(resume_line(last, loop.state.epoch, config.optim.epochs), flush=True)
        timer = EpochTimer()
        while loop.state.epoch < config.optim.epochs:
            began = time.perf_counter()
            metrics = run_epoch(loop, out_dir)
            timer.add(time.perf_counter() - began)
            if show_progress and loop.state.epoch % config.run.log_every == 0:
                print(epoch_line(metrics, config.optim.epochs, timer), flush=True)
    return loop


def run_epoch(loop: TrainingLoop, out_dir: Path) -> dict[str, float]:
    """One epoch of `train`: loop.step_epoch, then the checkpoints in out_dir when one is due. A diverged epoch
    writes the best weights that came after the last checkpoint before its error goes on."""
    try:
        metrics = loop.step_epoch()
    except TrainingDiverged:
        loop.save_best(out_dir / "best.pt")
        raise
    if loop.checkpoint_due():
        loop.save_checkpoints(out_dir)
    return metrics
