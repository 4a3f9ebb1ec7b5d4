"""StructureMatcher's rms distance with each crystal's structure reduction done once.

`StructureMatcher.get_rms_dist(generated, reference)` starts every call by copying both structures
and reducing each to its Niggli primitive cell (`_process_species`, `_get_reduced_structure`), and
only then rescales the pair to a common volume and searches the lattice mappings (`_preprocess`,
`_match`). With k samples per test crystal the reference is reduced k times; pymatgen's own
reduction cache (recent versions) still pays for two copies, a hash and an O(N^2) site-by-site
equality check on every call. Here `reduce_for_matching` runs the reduction once per structure,
with pymatgen's own functions, and `rms_dist` runs the rest of `get_rms_dist` on the reduced
pair: the same decision and the same rms, bit for bit (tests/test_matching.py checks it on
hundreds of pairs).

The functions reach into StructureMatcher's private methods on purpose: they are the pieces
`get_rms_dist` itself is made of, so the answers cannot drift from it. A pymatgen release that
renames them fails the equivalence test rather than changing a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure


class MatcherTolerances(TypedDict):
    """StructureMatcher's tolerance keyword arguments."""

    stol: float
    angle_tol: float
    ltol: float


# The published evaluation's (CDVAE's and DiffCSP's compute_metrics).
MATCHER_TOLERANCES = MatcherTolerances(stol=0.5, angle_tol=10, ltol=0.3)


@dataclass(frozen=True, eq=False)
class ReducedStructure:
    """A structure as a StructureMatcher compares it: species processed, Niggli-reduced, primitive."""

    structure: Structure
    composition_key: object  # the comparator's hash of the composition: different keys never match


def reduce_for_matching(matcher: StructureMatcher, structure: Structure) -> ReducedStructure:
    """What get_rms_dist does to one structure before it looks at the other: once, to reuse."""
    (processed,) = matcher._process_species([structure])
    reduced = matcher._get_reduced_structure(processed, matcher._primitive_cell, niggli=True)
    return ReducedStructure(reduced, matcher._comparator.get_hash(processed.composition))


def rms_dist(matcher: StructureMatcher, generated: ReducedStructure,
             reference: ReducedStructure) -> tuple[float, float] | None:
    """matcher.get_rms_dist(generated, reference) on structures reduced by reduce_for_matching.

    (normalised rms displacement, largest displacement), or None when they do not match. Two
    compositions the comparator tells apart are answered None without a lattice search, as
    StructureMatcher.fit answers them, and so are two primitive cells of different sizes when the
    matcher tries no supercells: get_rms_dist would find no assignment of sites in either case.
    """
    if not matcher._subset:
        if generated.composition_key != reference.composition_key:
            return None
        if not matcher._supercell and len(generated.structure) != len(reference.structure):
            return None
    # _preprocess copies both before it rescales them, so the reduced structures stay reusable.
    struct1, struct2, fu, s1_supercell = matcher._preprocess(generated.structure, reference.structure,
                                                             skip_structure_reduction=True)
    match = matcher._match(struct1, struct2, fu, s1_supercell, use_rms=True, break_on_match=False)
    if match is None:
        return None
    # pymatgen annotates _match's second item as a float; it is the array of site distances (get_rms_dist takes its max too).
    return match[0], max(match[1])  # type: ignore[call-overload]


def best_of_k(matcher: StructureMatcher, reference: Structure,
              generated: Sequence[Structure | None]) -> tuple[float | None, int]:
    """The best rms of k generated structures against one reference, reducing the reference once.

    (rms, index of the sample giving it), or (None, -1) when none matches. A None sample (one the
    caller found invalid) is skipped. Ties go to the earlier sample, as metrics.match_one keeps
    the first best.
    """
    target = reduce_for_matching(matcher, reference)
    best, best_index = None, -1
    for index, structure in enumerate(generated):
        if structure is None:
            continue
        found = rms_dist(matcher, reduce_for_matching(matcher, structure), target)
        if found is not None and (best is None or found[0] < best):
            best, best_index = found[0], index
    return best, best_index
