"""The task, chosen once from `diffusion.task`: crystal structure prediction or ab initio generation.

Like the ablation switches, the task is a choice of pieces, not a string tested in many places:
each layer reads what it needs from one `Task` (the model whether atom types are diffused, the
training loop what a checkpoint adds, the sweep which metric picks a trial and whether a step
size is searched), and `task_of` is the only place that looks at the name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from equicsp.config import Config, TaskName

# MLflow metric keys that more than one layer reads (one name each, everywhere).
VAL_MATCH_RATE = "val_match_rate"  # the step-size search's score: validation match rate at a step size
VAL_DENOISE = "val_denoise"  # the validation denoising loss
TUNED_STEP_LR = "tuned_step_lr"  # the Langevin step size a sweep's search chose for a model


@dataclass(frozen=True)
class Task:
    name: TaskName
    diffuses_types: bool  # the atom types are noised and denoised (a type head, the type DDPM); CSP keeps them given
    searches_step_size: bool  # a sweep tunes the Langevin step on validation crystals before the final stage
    trial_metric: str  # what Optuna optimises over a cell's trials and what picks each cell's best trial
    trial_mode: Literal["max", "min"]
    stores_atom_counts: bool  # checkpoints hold the training set's atom-count histogram, from which N is drawn

    def check_generates(self) -> None:
        """Refuse a CSP model where a generation model is needed, naming the command for each."""
        if not self.diffuses_types:
            raise TaskMismatch("this model predicts structures for given compositions (diffusion.task = csp): "
                               "use `python -m equicsp.sample` or `evaluate`, not `generate`")

    def check_predicts_structures(self) -> None:
        if self.diffuses_types:
            raise TaskMismatch("this is a generation model (diffusion.task = generation): it draws its own "
                               "compositions; use `python -m equicsp.generate`")


class TaskMismatch(ValueError):
    """A model of one task used where the other is needed."""


# Generation has no step-size search (sweep/step_size.search_metric says why): its trials are compared by their
# validation denoising loss; CSP's by the validation match rate at the tuned step.
CSP = Task("csp", diffuses_types=False, searches_step_size=True, trial_metric=VAL_MATCH_RATE, trial_mode="max",
           stores_atom_counts=False)
GENERATION = Task("generation", diffuses_types=True, searches_step_size=False, trial_metric=VAL_DENOISE,
                  trial_mode="min", stores_atom_counts=True)
TASKS: dict[str, Task] = {task.name: task for task in (CSP, GENERATION)}


def task_of(source: Config | str) -> Task:
    """The Task of a config (its diffusion.task) or of a task name."""
    name = source if isinstance(source, str) else source.diffusion.task
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {name!r}")
    return TASKS[name]
