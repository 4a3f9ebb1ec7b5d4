"""The per-process training loop: used as is by the Ray workers and by `python -m equicsp.train --local`.

Adam, ReduceLROnPlateau on the validation loss, gradient clipping by value, a
checkpoint every `run.checkpoint_every` epochs plus the best one, and resume from the last.
Every epoch's shuffling is seeded by (seed, epoch) and every crystal's noise is keyed by
(seed, epoch, dataset index), so a resumed run continues exactly as an uninterrupted one
would, and the noise does not depend on the batch size or the number of workers.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch_geometric.loader import DataLoader
from tqdm.auto import tqdm

from equicsp.checkpoint import read_checkpoint, save_checkpoint, unwrap
from equicsp.config import Config, ConfigError
from equicsp.data import CrystalDataset, load_splits
from equicsp.denoiser import build_denoiser
from equicsp.devices import resolve_device
from equicsp.diffusion import Diffusion
from equicsp.num_atoms import atom_count_histogram
from equicsp.objective import Objective

LOSS_NAMES = ("total", "lattice", "coord", "score", "perm")


def shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    """The same on every worker, so they agree on the epoch's order before taking their shards."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@dataclass
class TrainingState:
    epoch: int = 0  # epochs completed
    best_val: float = math.inf
    history: list[dict[str, float]] = field(default_factory=list)


class TrainingLoop:
    """One process's training; Ray Train runs one per worker with its rank and world size.

    The global batch is optim.batch_size crystals: each of world_size workers takes
    batch_size / world_size of it, and DDP averages the gradients, so the update matches a
    single process on the whole batch at the same learning rate.
    """

    def __init__(self, config: Config, train_set: CrystalDataset, val_set: CrystalDataset,
                 device: torch.device, rank: int = 0, world_size: int = 1,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None, show_progress: bool = True):
        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.train_set, self.val_set = train_set, val_set
        torch.manual_seed(config.run.seed)
        self.diffusion = Diffusion(config, device)
        for dataset in (train_set, val_set):
            self.diffusion.check_atom_counts(dataset.num_atoms)
        model = build_denoiser(config).to(device)
        self.model = wrap_model(model) if wrap_model else model
        self.objective = Objective(self.diffusion, self.model, config.run.precision)
        o = config.optim
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=o.plateau_factor, patience=o.plateau_patience, min_lr=o.min_lr)
        self.state = TrainingState()
        self.show_progress = show_progress and rank == 0
        if o.batch_size % world_size:
            raise ConfigError(f"optim.batch_size {o.batch_size} is not divisible by {world_size} workers")
        self.local_batch_size = o.batch_size // world_size

    def _shard(self, dataset: CrystalDataset, epoch: int, shuffle: bool) -> DataLoader:
        order = (torch.randperm(len(dataset), generator=shuffle_generator(self.config.run.seed, epoch))
                 if shuffle else torch.arange(len(dataset)))
        # Every worker gets the same number of batches (DDP needs equal steps): pad by wrapping.
        per_worker = math.ceil(len(dataset) / self.world_size)
        order = torch.cat([order, order[:per_worker * self.world_size - len(order)]])
        mine = order[self.rank::self.world_size].tolist()
        return DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=self.local_batch_size, shuffle=False)

    def train_epoch(self) -> dict[str, float]:
        epoch = self.state.epoch
        self.model.train()
        sums = dict.fromkeys(self.objective.loss_names, 0.0)
        crystals = 0
        start = time.perf_counter()
        loader = self._shard(self.train_set, epoch, shuffle=True)
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not self.show_progress):
            batch = batch.to(self.device)
            loss = self.objective(batch, self.config.run.seed, epoch + 1)
            self.optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            nn.utils.clip_grad_value_(self.model.parameters(), self.config.optim.grad_clip)
            self.optimizer.step()
            size = batch.num_atoms.shape[0]
            crystals += size
            for name, value in loss.as_floats().items():
                sums[name] += value * size
        elapsed = time.perf_counter() - start
        metrics = self._mean_over_workers(sums, crystals, "train")
        metrics.update(crystals_per_s=crystals * self.world_size / elapsed, epoch_time_s=elapsed)
        return metrics

    def _mean_over_workers(self, sums: dict[str, float], crystals: int, prefix: str) -> dict[str, float]:
        """Per-crystal means of the loss sums over every worker's shard."""
        names = self.objective.loss_names  # LOSS_NAMES, plus "type" when the atom types are diffused
        totals = torch.tensor([sums[name] for name in names] + [crystals], dtype=torch.float64)
        if self.world_size > 1 and torch.distributed.is_initialized():
            totals = totals.to(self.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        count = max(float(totals[-1]), 1.0)
        return {f"{prefix}_{name}": float(value) / count for name, value in zip(names, totals[:-1])}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The objective on the validation set with fixed noise (the same draws every epoch)."""
        self.model.eval()
        sums = dict.fromkeys(self.objective.loss_names, 0.0)
        crystals = 0
        for batch in self._shard(self.val_set, 0, shuffle=False):
            batch = batch.to(self.device)
            loss = self.objective(batch, self.config.run.seed, 0)  # step 0: the same draws every epoch
            size = batch.num_atoms.shape[0]
            crystals += size
            for name, value in loss.as_floats().items():
                sums[name] += value * size
        return self._mean_over_workers(sums, crystals, "val")

    def step_epoch(self) -> dict[str, float]:
        """Train one epoch, validate, step the LR schedule; returns the epoch's metrics."""
        metrics = self.train_epoch()
        metrics.update(self.validate())
        # The validation loss without the permutation term: comparable across permutation-loss weights.
        metrics["val_denoise"] = metrics["val_total"] - self.config.objective.perm_loss_weight * metrics["val_perm"]
        self.scheduler.step(metrics["val_total"])
        self.state.epoch += 1
        improved = metrics["val_total"] < self.state.best_val
        self.state.best_val = min(self.state.best_val, metrics["val_total"])
        metrics.update(epoch=self.state.epoch, lr=self.optimizer.param_groups[0]["lr"], improved=float(improved))
        self.state.history.append(metrics)
        return metrics

    def save(self, path: Path) -> None:
        save_checkpoint(path, self.config, self.model, optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), epoch=self.state.epoch, best_val=self.state.best_val,
                        history=self.state.history, tables_key=self.diffusion.tables_key or "",
                        **generation_state(self.config, self.train_set))

    def restore(self, path: Path) -> None:
        stored = read_checkpoint(path, self.device)
        unwrap(self.model).load_state_dict(stored["model"])
        self.optimizer.load_state_dict(stored["optimizer"])
        self.scheduler.load_state_dict(stored["scheduler"])
        self.state = TrainingState(int(stored["epoch"]), float(stored["best_val"]), list(stored.get("history", [])))


def generation_state(config: Config, train_set: CrystalDataset) -> dict[str, list[int]]:
    """What a generation checkpoint adds: the training set's atom-count histogram, from which N is drawn."""
    if config.diffusion.task != "generation":
        return {}
    return {"num_atoms_distribution": atom_count_histogram(train_set.num_atoms, config.data.max_atoms)}


def train(config: Config, out_dir: Path, resume: bool = True, show_progress: bool = True,
          on_epoch_end: Callable[[dict[str, float]], None] | None = None) -> TrainingLoop:
    """Single-process training into out_dir/{last,best}.pt, resuming from last.pt when present."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config.to_yaml())
    datasets = load_splits(config, ("train", "val"), show_progress)
    for dataset in datasets.values():
        if dataset.report.skipped:
            print(dataset.report.summary(), file=sys.stderr)
    loop = TrainingLoop(config, datasets["train"], datasets["val"], resolve_device(config.run.device),
                        show_progress=show_progress)
    last = out_dir / "last.pt"
    if resume and last.exists():
        loop.restore(last)
    while loop.state.epoch < config.optim.epochs:
        metrics = loop.step_epoch()
        if metrics["improved"]:
            loop.save(out_dir / "best.pt")
        if loop.state.epoch % config.run.checkpoint_every == 0 or loop.state.epoch == config.optim.epochs:
            loop.save(last)
        if on_epoch_end:
            on_epoch_end(metrics)
        if show_progress and loop.state.epoch % config.run.log_every == 0:
            print(f"epoch {loop.state.epoch}: train {metrics['train_total']:.4f} val {metrics['val_total']:.4f} "
                  f"lr {metrics['lr']:.2e} {metrics['crystals_per_s']:.0f} crystals/s", flush=True)
    return loop
