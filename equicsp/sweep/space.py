"""Search-space domains of a sweep (a float or int range, a set of choices) and how Optuna draws from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class FloatRange:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int
    log: bool = False


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]


Domain = FloatRange | IntRange | Choice


def domain_problem(domain: Domain) -> str:
    """Why a domain holds nothing to search, or ""."""
    if isinstance(domain, Choice):
        return "no options" if not domain.options else ""
    if not domain.low < domain.high:
        return f"low {domain.low} is not below high {domain.high}"
    if domain.log and domain.low <= 0:
        return f"a log-scale range needs low > 0, not {domain.low}"
    return ""


def domain_contains(domain: Domain, value: Any) -> bool:
    if isinstance(domain, Choice):
        return value in domain.options
    return domain.low <= value <= domain.high


def example_value(domain: Domain) -> Any:
    """A value inside the domain (its first option or its low end), to check that a config accepts it."""
    return domain.options[0] if isinstance(domain, Choice) else domain.low


def suggest(trial: optuna.Trial, name: str, domain: Domain) -> Any:
    if isinstance(domain, FloatRange):
        return trial.suggest_float(name, domain.low, domain.high, log=domain.log)
    if isinstance(domain, IntRange):
        return trial.suggest_int(name, domain.low, domain.high, log=domain.log)
    return trial.suggest_categorical(name, list(domain.options))
