"""Compiled steps (run.compile): the same losses and samples as the eager path, on mixed-size data.

On a CPU the tests compile with torch's "aot_eager" backend: Dynamo captures each step as one
graph (fullgraph: a graph break, which would cost a GPU its CUDA graph, fails the test) and
AOTAutograd traces its backward, while the kernels stay eager, so a test takes seconds, not
the minutes inductor's C++ code generation takes here. On CUDA the steps run through inductor.
"""

import pytest
import torch
import torch.multiprocessing as mp
from conftest import FAST
from torch import nn

from equicsp.config import ConfigError, make_config
from equicsp.data.crystals import random_crystals
from equicsp.engine.compiled import compile_enabled
from equicsp.engine.sampler import Sampler
from equicsp.engine.training import DDP_SETTINGS, TrainingLoop
from equicsp.model.denoiser import build_denoiser
from equicsp.model.diffusion import Diffusion
from equicsp.model.noise import sample_keys

SIZES = [1, 3, 5, 7, 12, 2, 4, 6, 8, 9, 10]  # 11 crystals: batches of 4, 4 and 3, each of another size mix


def small_config(preset: str = "equicsp", **overrides):
    return make_config("smoke", preset, {**FAST, "data.max_atoms": 12, **overrides})


def test_a_compiled_training_loop_gives_the_eager_losses():
    history = {}
    for setting in ("off", "on"):
        config = small_config(**{"run.compile": setting})
        loop = TrainingLoop(config, random_crystals(SIZES, 0), random_crystals(SIZES[:5], 1), torch.device("cpu"),
                            show_progress=False, compile_backend="aot_eager")
        history[setting] = [loop.step_epoch() for _ in range(2)]
        weights = torch.cat([p.detach().flatten() for p in loop.model.parameters()])
        history[setting].append({"weights": weights})
    eager, compiled = history["off"], history["on"]
    for epoch in range(2):
        for name in ("train_total", "train_perm", "train_coord_score", "val_total", "val_lattice_noise"):
            assert compiled[epoch][name] == pytest.approx(eager[epoch][name], rel=1e-5), (epoch, name)
    torch.testing.assert_close(compiled[2]["weights"], eager[2]["weights"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task", ["csp", "generation"])
def test_compiled_sampling_gives_the_eager_samples(task):
    counts = [3, 1, 7, 12, 5]
    keys = sample_keys(torch.arange(5), torch.zeros(5, dtype=torch.long))
    types = torch.randint(1, 80, (sum(counts),), generator=torch.Generator().manual_seed(1))
    results = {}
    for setting in ("off", "on"):
        config = small_config(**{"run.compile": setting, "diffusion.task": task})
        torch.manual_seed(0)
        sampler = Sampler(build_denoiser(config), Diffusion(config), config, compile_backend="aot_eager")
        assert sampler.compiled == (setting == "on")
        results[setting] = (sampler.sample_batch(types, counts, keys, seed=3) if task == "csp"
                            else sampler.generate_batch(counts, keys, seed=3))
    for eager, compiled in zip(results["off"], results["on"]):
        assert compiled.shape == eager.shape
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compile_is_chosen_per_device_and_checked():
    assert not compile_enabled("auto", torch.device("cpu")) and compile_enabled("auto", torch.device("cuda"))
    assert compile_enabled("on", torch.device("cpu")) and not compile_enabled("off", torch.device("cuda"))
    with pytest.raises(ConfigError, match="run.compile must be auto, on or off"):
        small_config(**{"run.compile": "yes"})
    with pytest.raises(ConfigError, match="run.precision must be one of fp32, tf32, bf16"):
        small_config(**{"run.precision": "fp16"})
    assert small_config(**{"run.precision": "tf32"}).run.precision == "tf32"


def test_samplers_at_other_step_sizes_share_the_compiled_step():
    """A step-size search builds a Sampler per step size; each must not compile its step again."""
    from torch._dynamo.utils import counters

    counts, keys = [3, 6], sample_keys(torch.arange(2), torch.zeros(2, dtype=torch.long))
    types = torch.randint(1, 80, (9,), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = build_denoiser(small_config())
    torch._dynamo.reset()
    counters.clear()
    for step_lr in (1e-5, 3e-4, 2e-3):
        config = small_config(**{"run.compile": "on", "sampler.step_lr": step_lr})
        Sampler(model, Diffusion(config), config, compile_backend="aot_eager").sample_batch(types, counts, keys, 0)
    assert counters["stats"]["unique_graphs"] == 1


def test_bf16_without_compiled_steps_on_cuda_says_why_it_is_slow(monkeypatch):
    from equicsp.engine import compiled
    from equicsp.engine.compiled import configure_precision

    with pytest.warns(UserWarning, match="waits on kernel launches"):
        configure_precision("bf16", torch.device("cuda"), compiled=False)
    import warnings

    monkeypatch.setattr(compiled, "cpu_has_fast_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configure_precision("bf16", torch.device("cuda"), compiled=True)
        configure_precision("bf16", torch.device("cpu"), compiled=False)  # with AMX, bf16 is the CPU's fast path


def test_bf16_on_a_cpu_without_bf16_arithmetic_says_why_it_is_slow(monkeypatch):
    """On 2 AVX2-only AMD cores a bf16 training step ran 24x slower than fp32, without a word."""
    from equicsp.engine import compiled

    monkeypatch.setattr(compiled, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without bf16 arithmetic .* use fp32"):
        compiled.configure_precision("bf16", torch.device("cpu"), compiled=False)


def test_the_sampling_commands_override_the_models_compile_setting():
    from equicsp.engine.sampler import with_sampler_options
    from equicsp.evaluation.csp import EvaluationSettings

    model_config = small_config(**{"run.compile": "auto"})
    assert with_sampler_options(model_config, compile="off").run.compile == "off"
    assert with_sampler_options(model_config).run.compile == "auto"
    assert EvaluationSettings(compile="on").sampling_config(model_config).run.compile == "on"
    with pytest.raises(ConfigError, match="run.compile"):
        with_sampler_options(model_config, compile="always")


def _ddp_worker(rank: int, world: int, store: str, setting: str, out: str) -> None:
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    config = small_config(**{"run.compile": setting, "optim.batch_size": 4})
    loop = TrainingLoop(config, random_crystals([4] * 8, 0), random_crystals([4] * 4, 1), torch.device("cpu"), rank,
                        world, wrap_model=lambda model: nn.parallel.DistributedDataParallel(model, **DDP_SETTINGS),
                        show_progress=False, compile_backend="aot_eager")
    # Each step's loss terms (training and validation) as this worker computed them, and the gradients the
    # optimiser is given: after backward, so after DDP's all-reduce, before clipping (by value, which would hide
    # small differences).
    steps, gradients = [], []
    losses, clip = loop.losses, nn.utils.clip_grad_value_

    def recorded_losses(batch, step):
        total, terms = losses(batch, step)
        steps.append(terms.clone())
        return total, terms

    def recorded_clip(parameters, clip_value, *args, **kwargs):
        parameters = list(parameters)
        gradients.append(torch.cat([p.grad.flatten() for p in parameters]))
        return clip(parameters, clip_value, *args, **kwargs)

    loop.losses = recorded_losses
    nn.utils.clip_grad_value_ = recorded_clip  # this worker process's own torch
    history = [loop.step_epoch() for _ in range(2)]
    weights = torch.cat([p.detach().flatten() for p in loop.model.parameters()])
    torch.save({"history": history, "weights": weights, "graph_breaks": dict(counters["graph_break"]),
                "steps": torch.stack(steps), "gradients": torch.stack(gradients)}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_a_compiled_step_under_ddp_makes_the_eager_updates_and_broadcasts_no_buffers(tmp_path):
    """Two gloo workers with DistributedDataParallel, as Ray Train runs them: the compiled step (split at DDP's
    gradient buckets) gives the eager step's losses at every step, its all-reduced gradients and its weights;
    DDP broadcasting its buffers each step was a graph break and a collective."""
    results = {}
    for setting in ("off", "on"):
        out = tmp_path / f"{setting}.pt"
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / f"store-{setting}"), setting, str(out)), nprocs=2)
        results[setting] = [torch.load(f"{out}.{rank}") for rank in range(2)]
    # Dynamo does not trace DDP's own forward (it splits there, so the step is not one graph under DDP); a
    # buffer broadcast in it would be another split and a collective per step.
    breaks = " ".join(results["on"][0]["graph_breaks"])
    assert "_inside_ddp_forward" in breaks and "broadcast" not in breaks
    for eager, compiled in zip(results["off"][0]["history"], results["on"][0]["history"]):
        for name in ("train_total", "val_total"):
            assert compiled[name] == pytest.approx(eager[name], rel=1e-5), name
    # 8 training crystals at a global batch of 4 on 2 workers: 2 steps an epoch, and 1 validation step, per worker.
    for rank in range(2):
        eager, compiled = results["off"][rank], results["on"][rank]
        assert eager["steps"].shape[0] == 2 * 3
        torch.testing.assert_close(compiled["steps"], eager["steps"], rtol=1e-5, atol=1e-7)
        assert eager["gradients"].shape[0] == 2 * 2
        torch.testing.assert_close(compiled["gradients"], eager["gradients"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(compiled["weights"], eager["weights"], rtol=1e-4, atol=1e-6)
    for setting in ("off", "on"):  # the gradients were all-reduced: both workers stepped with the same ones
        assert torch.equal(results[setting][0]["gradients"], results[setting][1]["gradients"]), setting
        assert not torch.equal(results[setting][0]["steps"], results[setting][1]["steps"]), setting  # own shards
