"""What `train` spends around each epoch on checkpoints: step_epoch alone, best.pt written after every improving
epoch (the policy before 2026-12-05), and training.run_epoch (the best weights copied on the device, written with
the next checkpoint), in alternating rounds in one process.

    python benchmarks/checkpoint_cost.py [--out benchmarks/results/checkpoint_cost.md] [--rounds 4] [--epochs 40]

The Perov-5 model (4 x 256) on random 5-atom crystals, batch 32, 128 + 32 crystals so that an epoch is short
enough for the writes to show; the history is filled to 1,750 epochs first, a run halfway through 3,500.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from equicsp.config import make_config
from equicsp.data.crystals import random_crystals
from equicsp.engine.training import TrainingLoop, run_epoch

HISTORY_EPOCHS = 1750


def step_epoch_only(loop: TrainingLoop, out: Path) -> None:
    loop.step_epoch()


def best_after_every_improvement(loop: TrainingLoop, out: Path) -> None:
    metrics = loop.step_epoch()
    if metrics["improved"]:
        loop.save(out / "best.pt")
    if loop.checkpoint_due():
        loop.save(out / "last.pt")


def with_run_epoch(loop: TrainingLoop, out: Path) -> None:
    run_epoch(loop, out)


MODES = {"step_epoch alone": step_epoch_only, "best.pt after every improving epoch (before)": best_after_every_improvement,
         "run_epoch: best weights kept on the device (now)": with_run_epoch}


def benchmark_config():
    return make_config("perov_5", "equicsp", {"optim.batch_size": 32, "optim.epochs": 10 ** 6, "run.compile": "off"})


@dataclass
class Timing:
    epoch_ms: float  # wall clock, everything
    writes_ms: float  # in TrainingLoop.save and save_best
    copies_ms: float  # in copying the best weights on the device (TrainingLoop._keep_best_weights)
    improved: int


def timed_calls(loop: TrainingLoop, names: tuple[str, ...]) -> list[float]:
    """Replaces these methods of this loop by ones adding their seconds to the returned list's one number."""
    spent = [0.0]
    for name in names:
        def timed(*args, original=getattr(loop, name), **kwargs):  # noqa: B008  binds this name's method now
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        setattr(loop, name, timed)
    return spent


def milliseconds_per_epoch(mode, epochs: int) -> Timing:
    torch.manual_seed(0)
    config = benchmark_config()
    loop = TrainingLoop(config, random_crystals([5] * 128), random_crystals([5] * 32, seed=1), torch.device("cpu"),
                        show_progress=False)
    loop.step_epoch()
    loop.state.history *= HISTORY_EPOCHS
    writes, copies = timed_calls(loop, ("save", "save_best")), timed_calls(loop, ("_keep_best_weights",))
    with tempfile.TemporaryDirectory(prefix="equicsp-checkpoint-cost-") as folder:
        start = time.perf_counter()
        for _ in range(epochs):
            mode(loop, Path(folder))
        seconds = time.perf_counter() - start
    return Timing(1000 * seconds / epochs, 1000 * writes[0] / epochs, 1000 * copies[0] / epochs,
                  sum(int(row["improved"]) for row in loop.state.history[-epochs:]))


def processor() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/checkpoint_cost.md"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    times: dict[str, list[Timing]] = {name: [] for name in MODES}
    for round_number in range(1, args.rounds + 1):
        for name, mode in MODES.items():
            timing = milliseconds_per_epoch(mode, args.epochs)
            times[name].append(timing)
            print(f"round {round_number}: {name}: {timing.epoch_ms:.0f} ms an epoch, {timing.writes_ms:.1f} in writes",
                  flush=True)
    bare = [timing.epoch_ms for timing in times["step_epoch alone"]]
    lines = [f"# Checkpoint cost per epoch ({processor()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads)", "",
             f"4 x 256, batch 32, 128 + 32 crystals, {args.epochs} epochs after a {HISTORY_EPOCHS}-epoch history, "
             f"{args.rounds} alternating rounds; `run.checkpoint_every` {benchmark_config().run.checkpoint_every}.", "",
             "| | ms an epoch (each round) | more than step_epoch alone (mean) | ms an epoch in checkpoint writes "
             "(mean) | ms an epoch copying the best weights (mean) | improving epochs |", "|---|---|---|---|---|---|"]
    for name, timings in times.items():
        extra = statistics.mean(timing.epoch_ms - base for timing, base in zip(timings, bare))
        lines.append(f"| {name} | {', '.join(f'{timing.epoch_ms:.0f}' for timing in timings)} | {extra:+.0f} | "
                     f"{statistics.mean(timing.writes_ms for timing in timings):.1f} | "
                     f"{statistics.mean(timing.copies_ms for timing in timings):.2f} | "
                     f"{timings[-1].improved} of {args.epochs} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)


if __name__ == "__main__":
    main()
