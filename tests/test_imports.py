"""Imports point one way: folders are layers, and the GPU path needs neither pymatgen, Ray nor MLflow."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "equicsp"
# Each layer may import the layers listed after it, never those before it (config, devices and task: shared by all).
LAYERS = ("cli", "sweep", "platform", "evaluation", "engine", "model", "data")
SHARED = ("config", "devices", "task")


def loaded_after(code: str, watched: tuple[str, ...]) -> list[str]:
    """Which of the watched modules a fresh interpreter holds after running code in the repository's root."""
    probe = f"import sys; {code}; print(sorted(m for m in {watched!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                            cwd=ROOT)
    return ast.literal_eval(result.stdout.strip())


def imported_packages(source: Path) -> set[str]:
    """The equicsp modules a file imports (at any depth: function-level imports count), as dotted names."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("equicsp.")}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module == "equicsp":
                names |= {f"equicsp.{alias.name}" for alias in node.names}
            elif node.module.startswith("equicsp."):
                names.add(node.module)
    return names


def layer_of(dotted: str) -> str:
    return dotted.split(".")[1]


def test_every_module_sits_in_a_layer_folder():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py")
                   if p.stem not in SHARED + ("__init__", "train", "sample", "evaluate", "generate"))
    assert loose == [], f"modules outside the layer folders: {loose}"
    for command in ("train", "sample", "evaluate", "generate"):  # `python -m equicsp.<command>` stays a thin alias
        assert imported_packages(PACKAGE / f"{command}.py") == {f"equicsp.cli.{command}"}


def test_layers_import_only_the_layers_below_them():
    wrong = []
    for source in PACKAGE.rglob("*.py"):
        relative = source.relative_to(PACKAGE)
        if len(relative.parts) < 2 or relative.name == "__main__.py":  # aliases and `python -m` entry points
            continue
        layer = relative.parts[0]
        allowed = set(LAYERS[LAYERS.index(layer):]) | set(SHARED)
        for target in imported_packages(source):
            if layer_of(target) not in allowed:
                wrong.append(f"{relative} imports {target}")
    assert wrong == []


def test_shared_modules_import_no_layer():
    for name in SHARED:
        assert {layer_of(t) for t in imported_packages(PACKAGE / f"{name}.py")} <= set(SHARED)


def test_the_training_and_sampling_modules_import_without_pymatgen_ray_or_mlflow():
    # benchmarks/gpu.py, gpu_session.py and what it runs (`train --local`, gpu_sample.py) are what runs on the GPU
    # machine, which has none of them, nor pooch (`data fetch`'s downloader).
    code = ("import runpy; import equicsp.engine.training, equicsp.engine.sampler, equicsp.model.denoiser, "
            "equicsp.model.diffusion, equicsp.data.batches, equicsp.engine.compiled, equicsp.cli.train; "
            "runpy.run_path('benchmarks/gpu.py', run_name='imported'); "
            "runpy.run_path('benchmarks/gpu_session.py', run_name='imported'); "
            "runpy.run_path('benchmarks/gpu_sample.py', run_name='imported')")
    assert loaded_after(code, ("ray", "mlflow", "pymatgen", "optuna", "smact", "matminer", "pooch")) == []


def test_what_every_ray_worker_imports_leaves_out_torch_geometric_and_dynamo():
    """Each training worker, sampling actor and matching task is a fresh process; torch_geometric imports
    torch._dynamo, 2-3 s that each of them (dozens in a sweep) paid before its first step."""
    code = ("import equicsp.platform.ray_train, equicsp.platform.ray_evaluation, equicsp.sweep.trials, "
            "equicsp.cli.sample, equicsp.cli.evaluate")
    assert loaded_after(code, ("torch_geometric", "torch._dynamo")) == []


def omp_spin_count(code: str, **environment: str) -> str:
    """libgomp's spin count (0: idle threads sleep at once) in a fresh interpreter that runs code, then torch."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    probe = f"{code}; import torch; torch.ones(64, 64).sum()"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True,
                            cwd=ROOT, env={**env, "OMP_DISPLAY_ENV": "VERBOSE", **environment})
    return next(line.split("=")[1].strip(" '") for line in result.stderr.splitlines() if "GOMP_SPINCOUNT" in line)


def test_torchs_openmp_threads_wait_passively_unless_the_user_chose_otherwise():
    # Spinning idle threads take the cores of a busy machine from the threads doing the work (benchmarks/throughput.py).
    assert omp_spin_count("pass") != "0"  # torch alone spins
    assert omp_spin_count("import equicsp.config") == "0"
    assert omp_spin_count("import equicsp.config", OMP_WAIT_POLICY="ACTIVE") not in ("0", "300000")
