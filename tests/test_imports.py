"""Imports point one way: the GPU path (training loop, denoiser, sampler) needs neither pymatgen, Ray nor MLflow."""

import ast
import subprocess
import sys
from pathlib import Path


def loaded_after(code: str, watched: tuple[str, ...]) -> list[str]:
    """Which of the watched modules a fresh interpreter holds after running code in the repository's root."""
    probe = f"import sys; {code}; print(sorted(m for m in {watched!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    return ast.literal_eval(result.stdout.strip())


def test_the_training_and_sampling_modules_import_without_pymatgen_ray_or_mlflow():
    # benchmarks/gpu.py is what runs on the GPU machine, which has none of them.
    code = ("import runpy; import equicsp.training, equicsp.sampler, equicsp.denoiser, equicsp.diffusion, "
            "equicsp.batches, equicsp.compiled; runpy.run_path('benchmarks/gpu.py', run_name='imported')")
    assert loaded_after(code, ("ray", "mlflow", "pymatgen", "optuna", "smact", "matminer")) == []


def test_what_every_ray_worker_imports_leaves_out_torch_geometric_and_dynamo():
    """Each training worker, sampling actor and matching task is a fresh process; torch_geometric imports
    torch._dynamo, 2-3 s that each of them (dozens in a sweep) paid before its first step."""
    code = "import equicsp.distributed, equicsp.ray_evaluation, equicsp.sweep.trials, equicsp.sample, equicsp.evaluate"
    assert loaded_after(code, ("torch_geometric", "torch._dynamo")) == []
