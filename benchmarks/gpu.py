"""GPU benchmark: training and sampling steps beside the public EquiCSP code, timed in one run.

    python benchmarks/gpu.py [--refbench DIR] [--out benchmarks/results/gpu.md] [--quick]

Times, on the first CUDA device (on the CPU when there is none, and says so):
- a training step (objective, backward, clipping, Adam) with the full EquiCSP objective at
  the Perov-5 size (4 x 256) with batch 256 and 1024, and at 6 x 512 on 20-atom crystals
  with batch 256, in fp32 (and with TF32 / bf16 on a GPU);
- `TrainingLoop.train_epoch`'s crystals/s beside the bare step's, on the same data;
- a sampling step (two denoiser calls) at batch 256 and 4,096;
- whether a training and a sampling step synchronise with the host
  (`torch.cuda.set_sync_debug_mode("error")`);
- the public code's training and sampling steps, run by `refbench/ref_bench.py` (its own
  process: its package is also called `equicsp`) on the same device, in the same run.

Crystals are synthetic (random lattices, coordinates and elements) so the script needs no
dataset and no pymatgen; the step's cost depends on the sizes alone. Each result row is
printed and appended to --out as it finishes, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from equicsp.batches import DeviceCrystals
from equicsp.config import make_config
from equicsp.data import CrystalDataset, DataReport
from equicsp.denoiser import build_denoiser
from equicsp.diffusion import Diffusion
from equicsp.noise import sample_keys
from equicsp.objective import Objective
from equicsp.sampler import Sampler
from equicsp.training import TrainingLoop

ROOT = Path(__file__).resolve().parent.parent


def synthetic_crystals(count: int, atoms: int, seed: int = 0) -> CrystalDataset:
    """count crystals of `atoms` atoms each: random elements, coordinates and plausible cells."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "atom_types": torch.randint(1, 84, (count * atoms,), generator=generator),
        "frac_coords": torch.rand(count * atoms, 3, generator=generator),
        "lengths": 3 + 5 * torch.rand(count, 3, generator=generator),
        "angles": 70 + 40 * torch.rand(count, 3, generator=generator),
        "num_atoms": torch.full((count,), atoms, dtype=torch.long),
    }
    return CrystalDataset(tensors, [{} for _ in range(count)], DataReport("synthetic", count))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds of one call, after warm-up calls."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync_check(function, device: torch.device) -> str:
    """"none" when `function` makes no host synchronisation, else the first one torch reports."""
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        function()
        return "none"
    except RuntimeError as error:
        return f"synchronises: {str(error).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)


def model_config(size: str, precision: str, batch_size: int):
    preset = "perov_5" if size == "4x256" else "mp_20"
    overrides = {"run.precision": precision, "optim.batch_size": batch_size, "sampler.batch_size": batch_size,
                 "data.max_atoms": 20}
    return make_config(preset, "equicsp", overrides)


def training_step(size: str, atoms: int, batch_size: int, precision: str, device: torch.device, steps: int):
    """(seconds per step, sync report) of the bare step on one device batch."""
    config = model_config(size, precision, batch_size)
    torch.manual_seed(0)
    model = build_denoiser(config).to(device)
    objective = Objective(Diffusion(config, device), model, config.run.precision)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    crystals = synthetic_crystals(batch_size, atoms)
    batch = DeviceCrystals(crystals, device).batch(list(range(batch_size)))
    step_number = iter(range(1, 1_000_000))

    def step():
        loss = objective(batch, seed=0, step=next(step_number))
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), config.optim.grad_clip)
        optimizer.step()

    seconds = timed(step, device, steps, warmup=3)
    return seconds, sync_check(step, device)


def loop_rate(size: str, atoms: int, batch_size: int, device: torch.device, crystals: int) -> float:
    """TrainingLoop.train_epoch crystals/s (one warm-up epoch first)."""
    config = model_config(size, "fp32", batch_size)
    data = synthetic_crystals(crystals, atoms)
    loop = TrainingLoop(config, data, synthetic_crystals(64, atoms, seed=1), device, show_progress=False)
    loop.train_epoch()  # warm-up
    loop.state.epoch += 1
    return loop.train_epoch()["crystals_per_s"]


def sampling_step(size: str, atoms: int, batch_size: int, device: torch.device, steps: int):
    """(seconds per predictor-corrector step, sync report)."""
    config = make_config("perov_5" if size == "4x256" else "mp_20", "equicsp",
                         {"sampler.num_steps": steps, "data.max_atoms": 20})
    torch.manual_seed(0)
    sampler = Sampler(build_denoiser(config).to(device), Diffusion(config, device), config, device)
    types = torch.randint(1, 84, (batch_size * atoms,))
    counts = [atoms] * batch_size
    keys = sample_keys(torch.arange(batch_size), torch.zeros(batch_size, dtype=torch.long))
    run = lambda: sampler.sample_batch(types, counts, keys, seed=0)  # noqa: E731
    seconds = timed(run, device, 1, warmup=1) / steps
    return seconds, sync_check(run, device)


def reference(refbench: Path, device: torch.device, case: str, batch_size: int, steps: int) -> float | None:
    """The public code's seconds per step for a ref_bench case, or None when it could not run."""
    script = refbench / "ref_bench.py"
    if not script.exists():
        return None
    command = [sys.executable, str(script), "--device", "cuda" if device.type == "cuda" else "cpu", "--case", case,
               "--batch-size", str(batch_size), "--steps", str(steps), "--warmup", "3", "--sample-steps", "10"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=refbench)
    for line in result.stdout.splitlines():
        if line.startswith("{") and f'"case": "{case}"' in line:
            record = json.loads(line)
            if "s_per_step_median" in record:
                return record["s_per_step_median"]
            if "ms_per_step" in record:
                return record["ms_per_step"] / 1000
    print(f"reference {case} at batch {batch_size} did not run: {result.stderr.strip().splitlines()[-1:]}",
          file=sys.stderr)
    return None


class Report:
    """The Markdown table, printed and written row by row."""

    def __init__(self, out: Path, header: str):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.lines = [header, "", "| what | ours (ms) | public code (ms) | speed-up | host syncs in the step |",
                      "|---|---|---|---|---|"]
        self._flush()
        print("\n".join(self.lines), flush=True)

    def row(self, what: str, ours: float | None, theirs: float | None = None, syncs: str = "") -> None:
        def ms(value):
            return "-" if value is None else f"{1000 * value:.2f}"

        ratio = f"{theirs / ours:.1f}x" if ours and theirs else "-"
        line = f"| {what} | {ms(ours)} | {ms(theirs)} | {ratio} | {syncs} |"
        self.lines.append(line)
        print(line, flush=True)
        self._flush()

    def note(self, text: str) -> None:
        self.lines += ["", text]
        print(text, flush=True)
        self._flush()

    def _flush(self) -> None:
        self.out.write_text("\n".join(self.lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refbench", type=Path, default=ROOT.parent / "shared" / "refbench",
                        help="the public-code harness (default ../shared/refbench)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.md")
    parser.add_argument("--quick", action="store_true", help="few steps and small sizes (a smoke run of the script)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU here: measured on the CPU"
    steps = 3 if args.quick else 20
    report = Report(args.out, f"# GPU benchmark: {name}\n\ntorch {torch.__version__}; steps timed: median of {steps}")
    large = (64, 256) if args.quick else (256, 1024)
    cases = [("4x256", 5, large[0], "train_perov_4x256"), ("4x256", 5, large[1], "train_perov_4x256"),
             ("6x512", 20, large[0] // (4 if args.quick else 1), "train_mp20_6x512")]
    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" else [])
    for size, atoms, batch_size, case in cases:
        theirs = reference(args.refbench, device, case, batch_size, steps)
        for precision in precisions:
            seconds, syncs = training_step(size, atoms, batch_size, precision, device, steps)
            report.row(f"training step, {size}, {atoms}-atom crystals, batch {batch_size}, {precision}", seconds,
                       theirs if precision == "fp32" else None, syncs)
    bare, _ = training_step("4x256", 5, large[0], "fp32", device, steps)
    epoch_rate = loop_rate("4x256", 5, large[0], device, crystals=8 * large[0])
    report.row(f"TrainingLoop epoch, 4x256, batch {large[0]}: {epoch_rate:.0f} crystals/s = "
               f"{100 * epoch_rate * bare / large[0]:.0f} % of the bare step's rate", large[0] / epoch_rate)
    sample_sizes = (64, 256) if args.quick else (256, 4096)
    for batch_size in sample_sizes:
        theirs = reference(args.refbench, device, "sample_perov_4x256", batch_size, steps) if batch_size <= 1024 else None
        seconds, syncs = sampling_step("4x256", 5, batch_size, device, steps=5 if args.quick else 20)
        report.row(f"sampling step (2 denoiser calls), 4x256, batch {batch_size}", seconds, theirs, syncs)
    if device.type != "cuda":
        report.note("No CUDA device: every figure above was measured on the CPU, where the host synchronisation "
                    "check does not apply. The GPU targets of the issue are unmeasured.")


if __name__ == "__main__":
    main()
