"""How many formula units a sampled cell holds: given by the user, or the sizes training saw for such formulas.

CSP samples a fixed composition, so `SrTiO3` means a 5-atom cell. A user rarely knows how many
formula units the stable cell holds; `auto` answers from the training set: the numbers of
formula units of training crystals of the same family (the same reduced ratios, e.g. every
ABX3 with 1:1:3), else the cell sizes of training formulas with as many atoms per formula
unit, within the model's `data.max_atoms`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from math import gcd
from typing import SupportsInt

from equicsp.data.crystals import CrystalDataset


def reduced_composition(atom_types: Iterable[SupportsInt]) -> tuple[tuple[int, int], ...]:
    """((Z, count / gcd), ...) sorted by Z, of a crystal's atomic numbers: the same for SrTiO3 and Sr2Ti2O6."""
    counts = Counter(int(z) for z in atom_types)
    divisor = gcd(*counts.values()) if counts else 1
    return tuple(sorted((z, count // divisor) for z, count in counts.items()))


def reduced_counts(formula: str) -> dict[str, int]:
    """'Sr2Ti2O6' -> {'Sr': 1, 'Ti': 1, 'O': 3}, in the order written."""
    from pymatgen.core import Composition

    try:
        reduced = Composition(formula).reduced_composition
    except Exception as error:
        raise ValueError(f"cannot read formula {formula!r}: {error}") from None
    counts = {str(element): round(amount) for element, amount in reduced.items()}
    if not counts or any(abs(amount - round(amount)) > 1e-8 for amount in reduced.values()):
        raise ValueError(f"{formula!r}: not a formula with integer counts")
    return counts


def cell_formula(counts: dict[str, int], units: int) -> str:
    """The cell's formula, counts multiplied by units: ({'Sr': 1, 'Ti': 1, 'O': 3}, 2) -> 'Sr2Ti2O6'."""
    return "".join(f"{element}{amount * units if amount * units > 1 else ''}" for element, amount in counts.items())


def parse_units(text: str) -> list[int] | None:
    """'1,2,4' -> [1, 2, 4]; 'auto' -> None (decided from the training set)."""
    if text.strip() == "auto":
        return None
    try:
        units = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--formula-units {text!r}: give whole numbers such as 1,2,4, or auto") from None
    if not units or units[0] < 1:
        raise ValueError(f"--formula-units {text!r}: give whole numbers >= 1, such as 1,2,4, or auto")
    return units


def _family(counts: list[int]) -> tuple[int, ...]:
    return tuple(sorted(counts))


def training_cells(dataset: CrystalDataset) -> Counter:
    """(sorted reduced counts, formula units) -> how many training crystals have it."""
    from math import gcd

    seen: Counter = Counter()
    for start, stop in zip(dataset.offsets[:-1].tolist(), dataset.offsets[1:].tolist()):
        amounts = list(Counter(dataset.atom_types[start:stop].tolist()).values())
        units = 0
        for amount in amounts:
            units = gcd(units, amount)
        seen[(_family([amount // units for amount in amounts]), units)] += 1
    return seen


def units_seen_in_training(formula: str, dataset: CrystalDataset, max_atoms: int) -> tuple[list[int], str]:
    """The formula units to sample formula with, and a sentence saying where they come from."""
    counts = reduced_counts(formula)
    family, per_unit = _family(list(counts.values())), sum(counts.values())
    seen = training_cells(dataset)
    fits = lambda units: units * per_unit <= max_atoms  # noqa: E731
    same = sorted({units for (kind, units) in seen if kind == family and fits(units)})
    if same:
        ratio = ":".join(str(amount) for amount in family)
        return same, f"{formula}: {same} formula units, as training crystals with ratios {ratio}"
    sized = sorted({units for (kind, units) in seen if sum(kind) == per_unit and fits(units)})
    if sized:
        return sized, f"{formula}: {sized} formula units, as training formulas of {per_unit} atoms per unit"
    return [1], (f"{formula}: no training formula like it; sampling 1 formula unit "
                 f"(give --formula-units 1,2,... to choose)")


def unseen_composition(formula: str, dataset: CrystalDataset) -> str:
    """"" when some training crystal has formula's elements' ratios (its family, e.g. 1:1:3) and every element of
    it occurs in training, else a sentence saying what the model has not seen: it then samples far outside its data."""
    from pymatgen.core import Element

    counts = reduced_counts(formula)
    known = {Element.from_Z(z).symbol for z in set(dataset.atom_types.tolist())}
    missing = [element for element in counts if element not in known]
    if missing:
        return f"{formula}: no training crystal holds {', '.join(missing)}; the model has not seen such a composition"
    family = _family(list(counts.values()))
    if not any(kind == family for kind, _ in training_cells(dataset)):
        ratio = ":".join(str(amount) for amount in family)
        return (f"{formula}: no training crystal has its element ratios ({ratio}); the model has not seen such a "
                "composition, expect a poor structure")
    return ""
