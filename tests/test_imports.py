"""Imports point one way: the GPU path (training loop, denoiser, sampler) needs neither pymatgen, Ray nor MLflow."""

import subprocess
import sys


def test_the_training_and_sampling_modules_import_without_pymatgen_ray_or_mlflow():
    code = ("import sys; import equicsp.training, equicsp.sampler, equicsp.denoiser, equicsp.diffusion, equicsp.batches; "
            "print(sorted(m for m in ('ray', 'mlflow', 'pymatgen', 'optuna', 'smact', 'matminer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
