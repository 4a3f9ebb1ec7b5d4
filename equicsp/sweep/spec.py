"""What a sweep runs (SweepSpec) and where (SweepLaunch), and the checks that refuse a bad spec before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from equicsp.config import ARMS, Config, ConfigError, apply_overrides, make_config, trains_the_same
from equicsp.sweep.space import Domain, FloatRange, domain_problem, example_value
from equicsp.task import TASKS, task_of


class SweepError(ValueError):
    """A sweep that cannot start, with the reason."""


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep. Config fields are named `section.field` as everywhere else."""

    name: str
    preset: str = "perov_5"
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0,)
    trials_per_cell: int = 1  # Optuna trials per (arm, seed); the first uses the config's defaults
    space: dict[str, Domain] = field(default_factory=lambda: {"objective.perm_loss_weight": FloatRange(0.1, 10, True)})
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed config fields for every trial
    step_lr: FloatRange = FloatRange(1e-6, 1e-3, log=True)
    step_lr_trials: int = 6
    step_lr_crystals: int = 64  # validation crystals sampled per step size
    test_samples: int = 1  # k of the final evaluation (best of k)
    test_limit: int | None = None  # None: the whole test split
    asha: bool = False  # stop poor trials early on the validation loss
    search_seed: int = 0
    share_models: bool = True  # arms that differ only at sampling time (PM on/off) sample one trained model
    leakage: bool = False  # also score the test crystals no training crystal answers (leakage.py)
    task: str = "csp"  # diffusion.task of every arm: csp (Table 2) or generation (docs/method.md#generation)
    num_generated: int = 1000  # task generation: crystals each cell's best model generates for the final stage

    def arm_space(self, arm: str) -> dict[str, Domain]:
        """The searched fields that act in this arm (the permutation-loss weight only with the loss)."""
        has_perm_loss = ARMS[arm].objective.perm_loss
        return {name: domain for name, domain in self.space.items()
                if name != "objective.perm_loss_weight" or has_perm_loss}

    def config_for(self, arm: str, values: dict[str, Any]) -> Config:
        return make_config(self.preset, arm, {"diffusion.task": self.task, **self.overrides, **values})

    def model_owner(self, arm: str) -> str:
        """The arm whose trained model `arm` samples: the first arm listed that trains the same (else itself).

        The PM correction acts in the sampler only, so e.g. `equicsp` and `no_pm` compute the
        same losses epoch for epoch: the sweep trains one and samples it both ways.
        """
        if not self.share_models:
            return arm
        objective = self.config_for(arm, {}).objective
        return next(other for other in self.arms if trains_the_same(self.config_for(other, {}).objective, objective))

    @property
    def trained_arms(self) -> tuple[str, ...]:
        """The arms the sweep trains models for; every other arm samples one of theirs."""
        return tuple(arm for arm in self.arms if self.model_owner(arm) == arm)

    def sharing_arms(self, owner: str) -> tuple[str, ...]:
        """The other arms that sample owner's trained model."""
        return tuple(arm for arm in self.arms if arm != owner and self.model_owner(arm) == owner)


@dataclass(frozen=True)
class SweepLaunch:
    """Where and how a sweep runs."""

    tracking_uri: str | None = None
    experiment: str = "equicsp-sweeps"
    storage_path: str | None = None  # default $EQUICSP_STORAGE_PATH, else ./runs/sweeps; shared storage on a cluster
    workers_per_trial: int = 1  # Ray Train workers of each training run
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    max_concurrent: int = 0  # 0: as many trials as the cluster fits
    max_failures: int = 2
    eval_workers: int = 0  # final evaluation sampling workers (0: one per GPU, else one per CPU)
    system_metrics: bool = False  # MLflow system/* metrics of every training run (they crowd the runs' charts)
    verbose: bool = False  # Ray Tune's status tables and Optuna's study lines too (our progress lines always)


def validate_spec(spec: SweepSpec) -> None:
    """Everything about the spec that can be wrong, before Ray starts."""
    unknown = [arm for arm in spec.arms if arm not in ARMS]
    if unknown:
        raise SweepError(f"unknown arm(s) {unknown}; the arms are {list(ARMS)}")
    if not spec.arms or not spec.seeds:
        raise SweepError("a sweep needs at least one arm and one seed")
    if spec.task not in TASKS:
        raise SweepError(f"task must be one of {', '.join(TASKS)}, not {spec.task!r}")
    if "diffusion.task" in {**spec.overrides, **spec.space}:
        raise SweepError("diffusion.task is the sweep's task: set it with --task, not as an override or a searched field")
    if task_of(spec.task).diffuses_types and spec.leakage:
        raise SweepError("leakage scores CSP predictions of test compositions; a generation sweep has none")
    if spec.num_generated < 1:
        raise SweepError("num_generated must be >= 1")
    if spec.trials_per_cell < 1 or spec.step_lr_trials < 1 or spec.test_samples < 1 or spec.step_lr_crystals < 1:
        raise SweepError("trials, step_lr trials, test samples and step_lr crystals must all be >= 1")
    for name, domain in {**spec.space, "sampler.step_lr": spec.step_lr}.items():
        problem = domain_problem(domain)
        if problem:
            raise SweepError(f"the search space for {name} is empty: {problem}")
    for arm in spec.arms:
        try:
            config = spec.config_for(arm, {})
            apply_overrides(config, {name: example_value(domain) for name, domain in spec.arm_space(arm).items()})
        except ConfigError as error:
            raise SweepError(f"arm {arm}: {error}") from None
    if spec.trials_per_cell > 1 and not any(spec.arm_space(arm) for arm in spec.arms):
        raise SweepError(f"{spec.trials_per_cell} trials per cell asked for, but the search space is empty for "
                         f"every arm: nothing for Optuna to choose")
