"""Typed configuration: one dataclass per concern, presets from the paper, one flat name per field.

A field is named `section.field` everywhere: in YAML (nested), on the command line
(`--objective.perm_loss_weight 0.5`), in MLflow params and in sweep spaces.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run, with the reason."""


TaskName = Literal["csp", "generation"]
LatticeKind = Literal["projected", "matrix"]
Precision = Literal["fp32", "tf32", "bf16"]
CompileSetting = Literal["auto", "on", "off"]
TASKS: tuple[TaskName, ...] = typing.get_args(TaskName)
LATTICE_KINDS: tuple[LatticeKind, ...] = typing.get_args(LatticeKind)
PRECISIONS: tuple[Precision, ...] = typing.get_args(Precision)
COMPILE_SETTINGS: tuple[CompileSetting, ...] = typing.get_args(CompileSetting)


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 4  # message-passing layers of CSPNet
    hidden_dim: int = 256  # width of every layer
    num_freqs: int = 128  # Fourier features sin/cos(2 pi k d), k = 0 .. K-1, per axis
    time_dim: int = 256  # width of the sinusoidal timestep embedding
    # Add each crystal's mean of the n~ and score heads' outputs to every atom's (the EquiCSP code's MPTS-52 network).
    context_mean: bool = False


@dataclass(frozen=True)
class DiffusionConfig:
    task: TaskName = "csp"  # csp: structure from a composition | generation: atom types diffused too (docs/method.md#generation)
    timesteps: int = 1000  # diffusion steps T
    cosine_offset: float = 0.008  # s of the lattice's cosine noise schedule
    sigma_begin: float = 0.005  # smallest noise scale of the coordinates' geometric schedule (t = 1)
    sigma_end: float = 0.5  # largest noise scale of the coordinates' geometric schedule (t = T)
    von_mises_samples: int = 10_000  # Monte Carlo draws per (N, t) cell of the von Mises tables
    von_mises_seed: int = 0  # seed of those Monte Carlo draws


@dataclass(frozen=True)
class ObjectiveConfig:
    """The switches of the paper's Table 2 (a row is an objective preset) and the lattice representation.

    All switches on is EquiCSP. DiffCSP is all off with lattice = "matrix": its DDPM on the 3x3
    lattice matrix instead of EquiCSP's projected parameters.
    """

    lattice: LatticeKind = "projected"  # projected (EquiCSP) | matrix (DiffCSP)
    com_free_noise: bool = True  # periodic CoM-free noising of the coordinates
    von_mises: bool = True  # the von Mises target for the coordinate score (else the wrapped normal's)
    prob_model: bool = True  # the probabilistic model's correction in the sampler (acts in sampling only)
    perm_loss: bool = True  # the lattice permutation loss
    perm_loss_weight: float = 1.0  # weight of the permutation loss
    frame_average: bool = False  # frame averaging over lattice permutations (instead of the permutation loss)
    coord_noise_weight: float = 1.0  # weight of the n~ head's loss (DiffCSP's cost_coord); 0 leaves the head untrained
    type_noise_weight: float = 20.0  # weight of the atom-type noise loss (generation only; DiffCSP's cost_type)


@dataclass(frozen=True)
class SamplerConfig:
    step_lr: float = 5e-6  # the public EquiCSP code's default; the dataset presets set DiffCSP's (see README, Step sizes)
    num_steps: int = 0  # 0: every timestep; fewer: evenly spaced ones
    batch_size: int = 256  # crystals per sampling batch
    clip_lattice: bool = True  # clamp the implied clean lattice to physical cells (see Sampler.lattice_step)
    clip_types: bool = True  # clamp the implied clean atom types into [0, 1] (generation; see AtomTypeDiffusion.step)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # Adam's learning rate
    plateau_factor: float = 0.6  # the learning rate is multiplied by this on a plateau
    plateau_patience: int = 30  # epochs without a better validation loss before the rate drops
    min_lr: float = 1e-4  # the rate drops no lower
    grad_clip: float = 0.5  # by value
    batch_size: int = 256  # crystals per training step (split across workers)
    epochs: int = 3500  # training epochs


@dataclass(frozen=True)
class DataConfig:
    path: str = "bundled:perov_5"  # a folder with train.csv, val.csv, test.csv (CSV files or CIF folders)
    max_atoms: int = 20  # crystals with more atoms are skipped
    niggli: bool = True  # Niggli-reduce each cell on loading
    primitive: bool = False  # reduce each cell to its primitive cell on loading


@dataclass(frozen=True)
class RunConfig:
    seed: int = 0  # seed of the weights, the data order and the noise
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = "fp32"  # fp32 | tf32 (fp32 with TF32 matmuls on a GPU) | bf16 (autocast for the network's matmuls)
    compile: CompileSetting = "auto"  # auto (compiled steps on CUDA, eager elsewhere) | on | off: see compiled.py
    checkpoint_every: int = 10  # epochs
    log_every: int = 1  # epochs between logged metrics


@dataclass(frozen=True)
class Config:
    preset: str = "perov_5"
    objective_preset: str = "equicsp"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        validate(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """{"objective.perm_loss": True, ...}: the names used by MLflow params and sweeps."""
        return flatten(self.to_dict())


@dataclass(frozen=True)
class Arm:
    """A row of the paper's Table 2: its display name and its objective switches."""

    label: str
    objective: ObjectiveConfig


# Table 2 of the paper, in its order; the keys are the objective presets (and the sweeps' arms).
ARMS: dict[str, Arm] = {
    "equicsp": Arm("EquiCSP", ObjectiveConfig()),
    "no_perm_loss": Arm("w/o permutation loss", ObjectiveConfig(perm_loss=False)),
    "frame_average": Arm("Frame Average (no permutation loss)", ObjectiveConfig(perm_loss=False, frame_average=True)),
    "no_com_free": Arm("w/o periodic CoM-free noising",
                       ObjectiveConfig(com_free_noise=False, von_mises=False, prob_model=False)),
    "no_pm_vm": Arm("w/o probabilistic model and von Mises", ObjectiveConfig(von_mises=False, prob_model=False)),
    "no_vm": Arm("w/o von Mises", ObjectiveConfig(von_mises=False)),
    "no_pm": Arm("w/o probabilistic model", ObjectiveConfig(prob_model=False)),
    # Every switch off but EquiCSP's lattice: the control between the two methods.
    "none": Arm("all switches off (projected lattice)",
                ObjectiveConfig(com_free_noise=False, von_mises=False, prob_model=False, perm_loss=False,
                                coord_noise_weight=0.0)),
    "diffcsp": Arm("DiffCSP", ObjectiveConfig(lattice="matrix", com_free_noise=False, von_mises=False, prob_model=False,
                                              perm_loss=False, coord_noise_weight=0.0)),
}
OBJECTIVE_PRESETS: dict[str, ObjectiveConfig] = {name: arm.objective for name, arm in ARMS.items()}

# Switches that act in the sampler only: objectives that differ in nothing else train the same model.
SAMPLING_ONLY_SWITCHES = ("prob_model",)


def trains_the_same(first: ObjectiveConfig, second: ObjectiveConfig) -> bool:
    """Whether training under the two objectives computes the same losses, step for step."""
    return replace(first, **{name: getattr(second, name) for name in SAMPLING_ONLY_SWITCHES}) == second


def with_sampling_switches(config: Config, objective: ObjectiveConfig) -> Config:
    """The config with objective's sampling-only switches: how another arm samples a model trained here."""
    changes = {name: getattr(objective, name) for name in SAMPLING_ONLY_SWITCHES}
    return replace(config, objective=replace(config.objective, **changes)).validate()

_LARGE = ModelConfig(num_layers=6, hidden_dim=512)
# Step sizes are DiffCSP's recommended CSP values per dataset (its eval_utils, k = 1; with k = 20 it uses 5e-7 on
# Carbon-24); the EquiCSP code samples with 5e-6 everywhere. A sweep tunes it per model. Epochs: Appendix C.4.
# Training batch sizes: the public EquiCSP code's per dataset (the paper gives only the range 256-1024).
DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "perov_5": dict(data=DataConfig(max_atoms=20), optim=OptimConfig(epochs=3500, batch_size=1024),
                    sampler=SamplerConfig(step_lr=5e-7)),
    "carbon_24": dict(model=_LARGE, data=DataConfig(path="", max_atoms=24), optim=OptimConfig(epochs=4000, batch_size=512),
                      sampler=SamplerConfig(step_lr=5e-6)),
    "mp_20": dict(model=_LARGE, data=DataConfig(path="", max_atoms=20), optim=OptimConfig(epochs=1000, batch_size=256),
                  sampler=SamplerConfig(step_lr=1e-5)),
    "mpts_52": dict(model=replace(_LARGE, context_mean=True), data=DataConfig(path="", max_atoms=52),
                    optim=OptimConfig(epochs=1000, batch_size=128), sampler=SamplerConfig(step_lr=1e-5)),
    # Trains in about a minute on the bundled sample on 2 CPU cores.
    "smoke": dict(model=ModelConfig(num_layers=3, hidden_dim=128, num_freqs=32, time_dim=64),
                  diffusion=DiffusionConfig(timesteps=100, von_mises_samples=2000),
                  optim=OptimConfig(epochs=200, batch_size=64, plateau_patience=20),
                  sampler=SamplerConfig(step_lr=3e-4, batch_size=100), run=RunConfig(checkpoint_every=20)),
}


# Generation samples at its own step sizes (DiffCSP's and EquiCSP's recommended ab initio values; none for MPTS-52).
GENERATION_STEP_LR = {"perov_5": 1e-6, "carbon_24": 1e-5, "mp_20": 5e-6}


def make_config(preset: str = "perov_5", objective_preset: str = "equicsp",
                overrides: dict[str, Any] | None = None) -> Config:
    """A dataset preset, an objective preset (a Table 2 row), then `section.field` overrides."""
    if preset not in DATASET_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(DATASET_PRESETS)}")
    if objective_preset not in OBJECTIVE_PRESETS:
        raise ConfigError(f"unknown objective preset {objective_preset!r}; choose from {sorted(OBJECTIVE_PRESETS)}")
    objective = OBJECTIVE_PRESETS[objective_preset]
    sections = dict(DATASET_PRESETS[preset])
    if objective.lattice == "matrix":  # DiffCSP's own network: no per-crystal mean in the coordinate heads
        sections["model"] = replace(sections.get("model", ModelConfig()), context_mean=False)
    config = apply_overrides(Config(preset=preset, objective_preset=objective_preset, objective=objective, **sections),
                             overrides or {})
    chosen = {RENAMED_FIELDS.get(name, name) for name in overrides or {}}
    if config.diffusion.task == "generation" and preset in GENERATION_STEP_LR and "sampler.step_lr" not in chosen:
        config = replace(config, sampler=replace(config.sampler, step_lr=GENERATION_STEP_LR[preset]))
    return config.validate()


def field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or value == "None":
            return None
        annotation = options[0]
    try:
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
        if typing.get_origin(annotation) is Literal:
            return str(value)  # validate() names the allowed values
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {annotation.__name__}") from None
    return value


SECTIONS = {f.name: f.type for f in fields(Config) if f.name not in ("preset", "objective_preset")}


# Fields renamed since runs were first saved: configs, checkpoints and MLflow params under the old names still read.
RENAMED_FIELDS = {"objective.cost_coord": "objective.coord_noise_weight",
                  "objective.cost_type": "objective.type_noise_weight"}


def apply_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Replace `section.field` values (strings are parsed to the field's type); unknown names are errors."""
    section_types = typing.get_type_hints(Config)
    changes: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        name = RENAMED_FIELDS.get(name, name)
        section, _, field_name = name.partition(".")
        if section not in SECTIONS or not field_name:
            raise ConfigError(f"unknown config field {name!r}; sections are {sorted(SECTIONS)}")
        known = field_types(section_types[section])
        if field_name not in known:
            raise ConfigError(f"unknown config field {name!r}; {section} has {sorted(known)}")
        changes.setdefault(section, {})[field_name] = _coerce(value, known[field_name], name)
    for section, values in changes.items():
        config = replace(config, **{section: replace(getattr(config, section), **values)})
    return config


def config_from_dict(raw: dict[str, Any]) -> Config:
    """The inverse of Config.to_dict, strict about unknown keys."""
    raw = dict(raw)
    preset = raw.pop("preset", "perov_5")
    objective_preset = raw.pop("objective_preset", "equicsp")
    config = make_config(preset, objective_preset) if preset in DATASET_PRESETS else Config(preset=preset)
    flat: dict[str, Any] = {}
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"unknown config field {section!r}")
        flat.update({f"{section}.{key}": value for key, value in values.items()})
    config = replace(config, objective_preset=objective_preset)
    return apply_overrides(config, flat).validate()


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: is a folder, not a YAML config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, not a YAML config") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return config_from_dict(raw)


def validate(config: Config) -> None:
    objective, diffusion, model, sampler = config.objective, config.diffusion, config.model, config.sampler
    optim, run = config.optim, config.run
    problems = []
    if objective.von_mises and not objective.com_free_noise:
        problems.append("objective.von_mises needs objective.com_free_noise: the von Mises target models CoM-free noise")
    if objective.prob_model and not objective.com_free_noise:
        problems.append("objective.prob_model needs objective.com_free_noise: it corrects for the CoM removal")
    if objective.prob_model and objective.coord_noise_weight <= 0:
        problems.append("objective.prob_model needs objective.coord_noise_weight > 0: the correction uses the trained n~ head")
    if objective.lattice not in LATTICE_KINDS:
        problems.append(f"objective.lattice must be projected or matrix, not {objective.lattice!r}")
    if objective.lattice == "matrix" and (objective.perm_loss or objective.frame_average):
        problems.append("objective.perm_loss and objective.frame_average need objective.lattice = projected: "
                        "the axis permutations act on the projected lattice parameters")
    if objective.frame_average and objective.perm_loss:
        problems.append("objective.frame_average and objective.perm_loss exclude each other: "
                        "a frame-averaged model is equivariant already")
    for name, value in config.flat().items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{name} must be a finite number, not {value}")
    if objective.perm_loss_weight < 0 or objective.coord_noise_weight < 0:
        problems.append("loss weights (objective.perm_loss_weight, objective.coord_noise_weight) must be >= 0")
    if diffusion.task not in TASKS:
        problems.append(f"diffusion.task must be csp or generation, not {diffusion.task!r}")
    if diffusion.task == "generation" and objective.type_noise_weight <= 0:
        problems.append("diffusion.task = generation needs objective.type_noise_weight > 0: "
                        "the atom types are learnt by that loss")
    if diffusion.timesteps < 1:
        problems.append("diffusion.timesteps must be >= 1")
    if not 0 < diffusion.sigma_begin < diffusion.sigma_end:
        problems.append("need 0 < diffusion.sigma_begin < diffusion.sigma_end")
    if not 0 <= sampler.num_steps <= diffusion.timesteps:
        problems.append(f"sampler.num_steps must be in 0 .. diffusion.timesteps ({diffusion.timesteps})")
    for name, value in (("sampler.step_lr", sampler.step_lr), ("optim.lr", optim.lr), ("optim.grad_clip", optim.grad_clip)):
        if not value > 0:
            problems.append(f"{name} must be > 0, not {value}")
    if not optim.min_lr >= 0:
        problems.append(f"optim.min_lr must be >= 0, not {optim.min_lr}")
    if not 0 < optim.plateau_factor < 1:
        problems.append(f"optim.plateau_factor must be in (0, 1), not {optim.plateau_factor}")
    if min(run.checkpoint_every, run.log_every) < 1:
        problems.append(f"run.checkpoint_every and run.log_every must be >= 1 (epochs), "
                        f"not {run.checkpoint_every} and {run.log_every}")
    sizes = (model.num_layers, model.hidden_dim, model.num_freqs, model.time_dim, optim.batch_size, sampler.batch_size)
    if min(*sizes, optim.epochs) < 1:
        problems.append("sizes, batch sizes and epochs must be >= 1")
    if config.data.max_atoms < 1:
        problems.append("data.max_atoms must be >= 1")
    if run.precision not in PRECISIONS:
        problems.append(f"run.precision must be one of {', '.join(PRECISIONS)}, not {run.precision!r}")
    if run.compile not in COMPILE_SETTINGS:
        problems.append(f"run.compile must be auto, on or off, not {run.compile!r}")
    if not (run.device in ("auto", "cpu", "cuda") or run.device.startswith("cuda:")):
        problems.append(f"run.device must be auto, cpu, cuda or cuda:N, not {run.device!r}")
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))


def flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict (as stored in a checkpoint or config.yaml) as `section.field` names."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            out[key] = value
    return out
