"""Imports point one way: the GPU path (training loop, denoiser, sampler) needs neither pymatgen, Ray nor MLflow."""

import subprocess
import sys
from pathlib import Path


def test_the_training_and_sampling_modules_import_without_pymatgen_ray_or_mlflow():
    # benchmarks/gpu.py is what runs on the GPU machine, which has none of them.
    code = ("import sys, runpy; import equicsp.training, equicsp.sampler, equicsp.denoiser, equicsp.diffusion, "
            "equicsp.batches, equicsp.compiled; runpy.run_path('benchmarks/gpu.py', run_name='imported'); "
            "print(sorted(m for m in ('ray', 'mlflow', 'pymatgen', 'optuna', 'smact', 'matminer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[]"
