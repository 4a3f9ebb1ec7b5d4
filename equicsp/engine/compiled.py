"""Compiled steps: the training loss and the sampler's predictor-corrector step under torch.compile.

On a GPU a step of this model is hundreds of small kernels, and launching them costs more than
running them. Compiled with mode "reduce-overhead", inductor fuses them and replays each
step as a CUDA graph: a few launches per step. A CUDA graph has fixed shapes, so batches are
padded to a few size buckets (batches.py; one graph each) and every per-step number (the
epoch that keys the noise, the sampler's timestep) enters as a device tensor, not a Python
int the graph would bake in.

`run.compile`: auto (compiled on CUDA, eager elsewhere: on a CPU compiling costs minutes and
saves little), on, off. The compiled and the eager step compute the same function; tests
check the losses, gradients and samples agree on CPU.
"""

from __future__ import annotations

import gc
import sys
import warnings
from collections.abc import Callable

import torch

from equicsp.data.batches import CrystalBatch, GraphSizes
from equicsp.model.diffusion import Diffusion
from equicsp.model.noise import Step
from equicsp.model.objective import Objective

# Graphs per compiled function: one per batch shape (GraphSizes.bucket) and grad mode. A dataset of 1 to 20 atoms
# at batch 256 makes about 20 training shapes, 1 to 52 at batch 64 about 50; past the limit a fullgraph
# compile is an error, not a fall-back.
RECOMPILE_LIMIT = 512


def compile_enabled(setting: str, device: torch.device) -> bool:
    """Whether run.compile (checked by Config.validate) compiles steps on this device."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def compile_step(function: Callable, device: torch.device, backend: str = "inductor", fullgraph: bool = True) -> Callable:
    """`function` compiled as one graph per input shape; on CUDA with inductor, replayed as CUDA graphs.

    fullgraph: a graph break is an error. Under DDP it is False: Dynamo cannot trace DDP's own
    bookkeeping (its reducer and its forward hooks), so the step becomes several graphs around
    it. That combination has not run on GPUs yet.
    """
    dynamo = torch._dynamo.config
    if hasattr(dynamo, "recompile_limit"):
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    else:  # torch < 2.6
        dynamo.cache_size_limit = max(dynamo.cache_size_limit, RECOMPILE_LIMIT)
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    return torch.compile(function, backend=backend, mode=mode, dynamic=False, fullgraph=fullgraph)


def forget_compiled_steps(device: torch.device) -> None:
    """Drop every compiled step and, on a GPU, the memory its CUDA graphs held, as a new process would have none.

    torch keeps compiled code per function, not per model: after a model is replaced, each call of
    the next would first check its parameters' addresses against the earlier model's CUDA graphs.
    """
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def begin_step(device: torch.device) -> None:
    """Tell the CUDA-graph runner a new iteration starts (the previous step's outputs have been consumed)."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


class LossStep:
    """objective(batch, seed, step) -> (total, the loss terms as one float64 vector in objective.loss_names' order).

    Compiled or eager, the same function; compiled, `step` reaches the graph as a device tensor.
    """

    def __init__(self, objective: Objective, seed: int, device: torch.device, compiled: bool,
                 backend: str = "inductor", distributed: bool = False):
        self.objective, self.seed, self.device, self.compiled = objective, seed, device, compiled
        self._function = (compile_step(self._terms, device, backend, fullgraph=not distributed) if compiled
                          else self._terms)
        self._step = torch.zeros((), dtype=torch.long, device=device)
        self._shapes = ShapeLog("training step")
        if compiled:
            keep_tables_in_place(objective.diffusion)

    def __call__(self, batch: CrystalBatch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.compiled:
            return self._terms(batch, step)
        self._shapes.see(batch.sizes, torch.is_grad_enabled())
        begin_step(self.device)
        self._step.fill_(step)
        return self._function(batch, self._step)

    def _terms(self, batch: CrystalBatch, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.objective(batch, self.seed, step)
        terms = torch.stack([getattr(loss, name).detach() for name in loss.names]).double()
        return loss.total, terms


class ShapeLog:
    """Says on stderr when a compiled step meets a new shape: its first call compiles (a while, once per shape)."""

    def __init__(self, what: str):
        self.what = what
        self.seen: set[tuple[object, ...]] = set()

    def see(self, sizes: GraphSizes, *mode: bool) -> None:
        key = (sizes, *mode)
        if key not in self.seen:
            self.seen.add(key)
            print(f"compiling the {self.what} for {sizes.crystals} crystals, {sizes.atoms} atoms, {sizes.edges} edges"
                  f"{'' if not mode or mode[0] else ' (no grad)'}: shape {len(self.seen)}", file=sys.stderr, flush=True)


def keep_tables_in_place(diffusion: Diffusion) -> None:
    """Mark the schedule and von Mises tables as fixed-address graph inputs, so no CUDA-graph replay copies them."""
    holders = [diffusion.schedule] + ([diffusion.tables] if diffusion.tables is not None else [])
    for holder in holders:
        for value in vars(holder).values():
            if isinstance(value, torch.Tensor):
                torch._dynamo.mark_static_address(value)


def configure_precision(precision: str, device: torch.device, compiled: bool) -> None:
    """tf32: fp32 matmuls on a GPU's tensor cores with a 10-bit mantissa (about 1e-3 relative error per product).

    Process-wide, as torch keeps it; fp32 and bf16 leave the setting as it is. bf16 gets a warning
    saying why it is likely slower than fp32 where it is: on CUDA without compiled steps, and on a
    CPU whose vector units have no bf16 arithmetic.
    """
    if precision == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "bf16" and device.type == "cuda" and not compiled:
        warnings.warn(BF16_EAGER_WARNING, stacklevel=3)
    if precision == "bf16" and device.type == "cpu" and cpu_has_fast_bf16() is False:
        warnings.warn(BF16_CPU_WARNING.format(capability=torch.backends.cpu.get_cpu_capability()), stacklevel=3)


def cpu_has_fast_bf16() -> bool | None:
    """Whether oneDNN runs bf16 matmuls on this CPU's vector units (AVX-512 or AMX), None when this torch cannot say."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


BF16_CPU_WARNING = (
    "run.precision bf16 on a CPU without bf16 arithmetic (torch sees {capability}; oneDNN needs AVX-512 or AMX): its "
    "bf16 matmuls fall back to a slow path: training ran 24-38x slower than fp32 when measured (2 AMD EPYC cores "
    "with AVX2: 20 against 472 crystals/s at 4 x 256, 3 against 115 at 6 x 512); use fp32")
BF16_EAGER_WARNING = (
    "run.precision bf16 with run.compile off on CUDA: at this model's sizes an eager step waits on kernel launches, "
    "not on arithmetic, and autocast adds a cast kernel before every matmul, so bf16 was slower than fp32 when "
    "measured (H200, eager: 23-27 ms against 17-22 ms a step); compiled steps fuse the casts (run.compile auto), "
    "or use fp32 / tf32")
