"""Throughput benchmark: training, sampling, von Mises tables and matching, side by side in one run.

    python benchmarks/throughput.py [--out benchmarks/results/cpu.md] [--quick]
    python benchmarks/throughput.py --under-load [--quick]     # -> benchmarks/results/throughput.md

Prints a Markdown report and writes it to --out. Training and sampling run on real Perov-5
batches (the bundled sample, or --data) with the full EquiCSP objective, at the paper's
Perov-5 size (4 x 256, K = 128) and at 6 x 512, in float32 and with bf16 autocast. Sampling
is timed over real predictor-corrector steps and reported per step and as crystals/s for a
1000-step run. The reference figures are the public EquiCSP code on this class of machine
(2 cores, torch 2.13 CPU), as given in the project's issue.

--under-load times a training, a sampling and a generation step (the perov_5 model) on a
quiet machine and beside a busy-loop process per core, for each OpenMP wait policy: torch's
own (idle threads spin a while), PASSIVE (what `import equicsp` sets) and ACTIVE. libgomp
reads the policy once, when torch loads it, so each cell runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from equicsp.config import make_config
from equicsp.data.batches import CrystalBatch, DeviceCrystals
from equicsp.data.crystals import CrystalDataset, PreprocessOptions, load_crystals
from equicsp.devices import resolve_device
from equicsp.engine.sampler import Sampler
from equicsp.evaluation.csp import ground_truth
from equicsp.evaluation.metrics import CrystalArrays, evaluate_matches
from equicsp.model.denoiser import build_denoiser
from equicsp.model.diffusion import Diffusion
from equicsp.model.objective import Objective
from equicsp.model.schedules import geometric_sigmas
from equicsp.model.von_mises import build_tables

REFERENCE = {"train_4x256": 351.0, "train_6x512": 91.0, "sample_4x256": 0.85, "match_per_process": 80.0}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Dense matmul GFLOP/s at the shape of the Fourier projection (the largest matmul per step)."""
    a = torch.randn(6400, 768, device=device, dtype=dtype)
    b = torch.randn(768, 1024, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 20
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * 6400 * 768 * 1024 * repeats / (time.perf_counter() - start) / 1e9


def training_throughput(config, batch, device, repeats: int) -> dict[str, float]:
    diffusion = Diffusion(config, device)
    model = build_denoiser(config).to(device)
    objective = Objective(diffusion, model, config.run.precision)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        loss = objective(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), 0.5)
        optimizer.step()

    for _ in range(2):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    size = batch.num_atoms.shape[0]
    return {"seconds": seconds, "crystals_per_s": size / seconds, "gflop": counter.get_total_flops() / 1e9,
            "gflop_per_s": counter.get_total_flops() / 1e9 / seconds}


def sampling_throughput(config, batch, device, steps: int) -> dict[str, float]:
    config = replace(config, sampler=replace(config.sampler, num_steps=steps))
    diffusion = Diffusion(config, device)
    model = build_denoiser(config).to(device)
    sampler = Sampler(model, diffusion, config, device, config.run.precision)
    keys = torch.arange(batch.num_atoms.shape[0])
    sampler.sample_batch(batch.atom_types, batch.num_atoms, keys, seed=0)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    sampler.sample_batch(batch.atom_types, batch.num_atoms, keys, seed=0)
    synchronize(device)
    per_step = (time.perf_counter() - start) / steps
    size = batch.num_atoms.shape[0]
    return {"steps_per_s": 1 / per_step, "crystals_per_s_1000": size / (1000 * per_step)}


def profile_training(config, batch, device, rows: int = 12) -> str:
    diffusion = Diffusion(config, device)
    model = build_denoiser(config).to(device)
    objective = Objective(diffusion, model, config.run.precision)
    for _ in range(2):
        objective(batch).total.backward()
    with torch.profiler.profile() as profiler:
        objective(batch).total.backward()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def matching_throughput(dataset, pairs: int, processes: int) -> float:
    indices = [i % len(dataset) for i in range(pairs)]
    truths = ground_truth(dataset, indices)
    rng = np.random.default_rng(0)
    predictions = [[CrystalArrays.of(t.atom_types, (np.array(t.frac_coords) + rng.normal(0, 0.02, (len(t.atom_types), 3))) % 1,
                                     t.lengths, t.angles)] for t in truths]
    start = time.perf_counter()
    evaluate_matches(truths, predictions, processes=processes, show_progress=False)
    return pairs / (time.perf_counter() - start)


WAIT_POLICIES = {"torch's default (spin)": None, "PASSIVE (equicsp's)": "PASSIVE", "ACTIVE": "ACTIVE"}
WORKLOADS = ("train", "sample", "generate")


def first_batch(dataset: CrystalDataset, size: int, device: torch.device) -> CrystalBatch:
    """The dataset's first `size` crystals as one batch on the device, cut as training cuts them."""
    return DeviceCrystals(dataset, device).batch(list(range(min(size, len(dataset)))))


def workload_rate(kind: str, steps: int) -> float:
    """Steps a second of one workload at the perov_5 model size (4 x 256), after a warm-up step: a training step on
    64 bundled crystals, a sampling step of 50 of their compositions, or a generation step of 50 crystals."""
    from equicsp.evaluation.generation import generate

    task = {"diffusion.task": "generation"} if kind == "generate" else {}
    config = make_config("perov_5", "equicsp", {"sampler.num_steps": steps, **task})
    device = torch.device("cpu")
    if kind == "train":
        batch = first_batch(load_crystals("bundled:perov_5/train.csv", show_progress=False), 64, device)
        return 1 / training_throughput(config, batch, device, steps)["seconds"]
    model = build_denoiser(config)
    if kind == "sample":
        batch = first_batch(load_crystals("bundled:perov_5/test.csv", show_progress=False), 50, device)
        keys = torch.arange(batch.num_atoms.shape[0])
        sampler = Sampler(model, Diffusion(config, device), config, device)
        run = lambda: sampler.sample_batch(batch.atom_types, batch.num_atoms, keys, seed=0)  # noqa: E731
    else:
        run = lambda: generate(model, config, [0] * 5 + [1], 50, show_progress=False)  # noqa: E731  5-atom cells
    run()
    start = time.perf_counter()
    run()
    return steps / (time.perf_counter() - start)


def busy_loops(count: int) -> list[subprocess.Popen]:
    """count processes that each keep a core busy: the competing load of a machine running other work."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def rate_in_process(kind: str, steps: int, policy: str | None) -> float:
    """workload_rate in a fresh interpreter with this OMP_WAIT_POLICY (None: unset, torch's default)."""
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy:
        environment["OMP_WAIT_POLICY"] = policy
    done = subprocess.run([sys.executable, __file__, "--rate", kind, "--steps", str(steps)], env=environment,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} with OMP_WAIT_POLICY={policy} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def wait_policy_report(quick: bool, workloads: tuple[str, ...] = WORKLOADS) -> str:
    """Markdown: steps/s per workload, wait policy and load, with what passive waiting costs and gains."""
    steps = {"train": 2, "sample": 5, "generate": 5} if quick else {"train": 5, "sample": 20, "generate": 20}
    policies = dict(list(WAIT_POLICIES.items())[:2]) if quick else WAIT_POLICIES
    cores = os.cpu_count() or 1
    rates: dict[tuple[str, str, bool], float] = {}
    for loaded in (False, True):
        competitors = busy_loops(cores) if loaded else []
        try:
            for kind in workloads:
                for label, policy in policies.items():
                    rates[kind, label, loaded] = rate_in_process(kind, steps[kind], policy)
                    print(f"{kind}, {label}, {'loaded' if loaded else 'quiet'}: "
                          f"{rates[kind, label, loaded]:.2f} steps/s", file=sys.stderr, flush=True)
        finally:
            for process in competitors:
                process.kill()
                process.wait()
    default, passive = list(policies)[:2]
    lines = [f"# OpenMP wait policy under load: {platform.processor() or platform.machine()}, {cores} cores, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}{' (--quick)' if quick else ''}", "",
             f"Steps/s of the perov_5 model (4 x 256), each cell in a fresh process; loaded: {cores} busy-loop "
             "processes beside it (one per core). The second table compares PASSIVE with torch's default.", "",
             "| workload | wait policy | quiet steps/s | loaded steps/s |", "|---|---|---|---|"]
    for kind in workloads:
        lines += [f"| {kind} ({steps[kind]} steps) | {label} | {rates[kind, label, False]:.2f} | "
                  f"{rates[kind, label, True]:.2f} |" for label in policies]
    lines += ["", "| workload | PASSIVE's quiet-machine cost | PASSIVE's loaded-machine gain |", "|---|---|---|"]
    lines += [f"| {kind} | {100 * (1 - rates[kind, passive, False] / rates[kind, default, False]):+.0f} % | "
              f"x{rates[kind, passive, True] / rates[kind, default, True]:.1f} |" for kind in workloads]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bundled:perov_5/train.csv")
    parser.add_argument("--out", type=Path,
                        help="default: benchmarks/results/cpu.md, or throughput.md with --under-load")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke check)")
    parser.add_argument("--under-load", action="store_true",
                        help="only the wait-policy table: quiet and loaded, per policy (out: benchmarks/results/throughput.md)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                        help="--under-load: which steps to time")
    parser.add_argument("--rate", choices=WORKLOADS, help=argparse.SUPPRESS)  # one cell of --under-load, in its process
    parser.add_argument("--steps", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rate:
        print(json.dumps(workload_rate(args.rate, args.steps)))
        return
    if args.under_load:
        report = wait_policy_report(args.quick, tuple(args.workloads))
        out = args.out or Path("benchmarks/results/throughput.md")
        print(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"written to {out}", file=sys.stderr)
        return
    device = resolve_device(args.device)
    repeats, sample_steps = (2, 3) if args.quick else (5, 10)
    dataset = load_crystals(args.data, PreprocessOptions(max_atoms=20), show_progress=False)
    batch = first_batch(dataset, args.batch_size, device)
    lines = [f"# Throughput on {device.type}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
             "", f"Batch {batch.num_atoms.shape[0]} Perov-5 crystals from {args.data}; full EquiCSP objective "
             "(permutation loss: two passes per step).", ""]
    peaks = {"fp32": matmul_rate(torch.float32, device), "bf16": matmul_rate(torch.bfloat16, device)}
    lines += [f"Dense matmul rate: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", "",
              "| model | precision | train crystals/s | x public | step GFLOP | GFLOP/s | % of matmul rate "
              "| PC steps/s | sample crystals/s (1000 steps) | x public |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, layers, hidden in (("4x256", 4, 256), ("6x512", 6, 512)):
        for precision in ("fp32", "bf16"):
            config = make_config("perov_5", "equicsp", {"model.num_layers": layers, "model.hidden_dim": hidden,
                                                        "run.precision": precision})
            train = training_throughput(config, batch, device, repeats)
            sample = sampling_throughput(config, batch, device, sample_steps)
            sample_reference = REFERENCE.get(f"sample_{name}")
            sample_ratio = f"{sample['crystals_per_s_1000'] / sample_reference:.2f}" if sample_reference else "n/a"
            lines.append(
                f"| {name} | {precision} | {train['crystals_per_s']:.0f} "
                f"| {train['crystals_per_s'] / REFERENCE[f'train_{name}']:.2f} | {train['gflop']:.0f} "
                f"| {train['gflop_per_s']:.0f} | {100 * train['gflop_per_s'] / peaks[precision]:.0f} "
                f"| {sample['steps_per_s']:.2f} | {sample['crystals_per_s_1000']:.2f} | {sample_ratio} |")
            print(lines[-1], flush=True)
    start = time.perf_counter()
    build_tables(52, geometric_sigmas(1000, 0.005, 0.5), num_samples=10_000)
    table_seconds = time.perf_counter() - start
    lines += ["", f"Von Mises tables, N <= 52 x 1000 steps x 10,000 draws per cell: {table_seconds:.1f} s "
              "(public code: ~20 min)", ""]
    pairs = 64 if args.quick else 256
    rates = {p: matching_throughput(dataset, pairs, p) for p in (1, 2)}
    lines += ["| matching processes | pairs/s | x public (80 pairs/s per process) |", "|---|---|---|"]
    lines += [f"| {p} | {rate:.0f} | {rate / REFERENCE['match_per_process']:.2f} |" for p, rate in rates.items()]
    config = make_config("perov_5", "equicsp")
    lines += ["", "Where one fp32 training step's time goes (4x256, torch profiler, self CPU time):", "", "```",
              profile_training(config, batch, device), "```"]
    report = "\n".join(lines) + "\n"
    print(report)
    out = args.out or Path("benchmarks/results/cpu.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
