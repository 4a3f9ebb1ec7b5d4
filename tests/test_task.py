"""The task is chosen once: each layer reads its piece from one Task, and a model of one task is refused by the other."""

import ast
from pathlib import Path

import pytest
import torch

from equicsp.config import make_config
from equicsp.engine.sampler import Sampler
from equicsp.model.denoiser import build_denoiser
from equicsp.model.diffusion import Diffusion
from equicsp.task import CSP, GENERATION, TaskMismatch, task_of

SMALL = {"model.num_layers": 1, "model.hidden_dim": 16, "model.time_dim": 16, "model.num_freqs": 4,
         "diffusion.timesteps": 5}
PACKAGE = Path(__file__).resolve().parent.parent / "equicsp"


def test_each_config_gets_its_tasks_pieces():
    csp = make_config("smoke", "equicsp", SMALL)
    generation = make_config("smoke", "equicsp", {**SMALL, "diffusion.task": "generation"})
    assert task_of(csp) is CSP and task_of(generation) is GENERATION
    assert Diffusion(csp).types is None and Diffusion(generation).types is not None
    assert build_denoiser(generation).type_head is not None and build_denoiser(csp).type_head is None
    assert (CSP.trial_mode, GENERATION.trial_mode) == ("max", "min")


def test_a_generation_model_is_refused_for_given_compositions_and_a_csp_model_for_generation():
    generation = make_config("smoke", "equicsp", {**SMALL, "diffusion.task": "generation"})
    sampler = Sampler(build_denoiser(generation), Diffusion(generation), generation)
    with pytest.raises(TaskMismatch, match="generation model.*equicsp.generate"):
        sampler.sample([torch.tensor([8, 8, 8, 22, 38])], 1, seed=0, show_progress=False)
    csp = make_config("smoke", "equicsp", SMALL)
    with pytest.raises(TaskMismatch, match="given compositions.*not `generate`"):
        Sampler(build_denoiser(csp), Diffusion(csp), csp).generate_batch([5], torch.zeros(1, dtype=torch.long), 0)


def test_no_module_compares_the_task_name_outside_config_and_the_task_factory():
    """The switches' rule for the task too: `task == "generation"` in five places became Task's fields."""
    found = []
    for source in PACKAGE.rglob("*.py"):
        if source.relative_to(PACKAGE).as_posix() in ("config.py", "task.py"):
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                parts = (node.left, *node.comparators)
                if any(isinstance(part, ast.Attribute) and part.attr == "task" for part in parts) or \
                        any(isinstance(part, ast.Constant) and part.value in ("csp", "generation") for part in parts):
                    found.append(f"{source.relative_to(PACKAGE)}:{node.lineno}")
    assert found == []
