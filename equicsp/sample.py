"""`python -m equicsp.sample`: crystal structures for a formula from a trained checkpoint, as CIFs.

A sampled crystal with a non-finite lattice or coordinates (a diverged model) is not written:
it is reported on stderr, the others are written, and the command exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from equicsp.cache import check_writable_folder
from equicsp.checkpoint import CheckpointError, load_model
from equicsp.data import MAX_ATOMIC_NUMBER
from equicsp.devices import resolve_device
from equicsp.diffusion import Diffusion
from equicsp.metrics import structure_of
from equicsp.sampler import Sampler, with_sampler_options


def composition_of(formula: str) -> torch.Tensor:
    """'SrTiO3' -> (5,) atomic numbers, as written (no reduction to formula units)."""
    from pymatgen.core import Composition

    try:
        composition = Composition(formula)
    except Exception as error:
        raise ValueError(f"cannot read formula {formula!r}: {error}") from None
    types = []
    for element, amount in composition.items():
        z = getattr(element, "Z", 0)
        if not 1 <= z <= MAX_ATOMIC_NUMBER:
            raise ValueError(f"{formula!r}: unknown element {element}")
        if abs(amount - round(amount)) > 1e-8 or amount < 1:
            raise ValueError(f"{formula!r}: {element} has a non-integer count {amount}")
        types += [z] * int(round(amount))
    return torch.tensor(types, dtype=torch.long)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m equicsp.sample",
                                     description=__doc__.split(":", 1)[1].strip().split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--formula", required=True, action="append", help="e.g. SrTiO3; repeat for several")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--step-lr", type=float, help="Langevin step size (default: the checkpoint's config)")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: every timestep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    try:
        if args.num_samples < 1:
            raise ValueError("--num-samples must be >= 1")
        check_writable_folder(args.out)  # before the sampling, whose results would be lost
        compositions = [composition_of(formula) for formula in args.formula]
        device = resolve_device(args.device)
        config, model = load_model(args.checkpoint, device)
        config = with_sampler_options(config, args.step_lr, args.num_steps)
        if max(len(c) for c in compositions) > config.data.max_atoms:
            raise ValueError(f"a formula has more atoms than the model's data.max_atoms ({config.data.max_atoms})")
    except (ValueError, OSError, CheckpointError) as error:
        raise SystemExit(f"error: {error}") from None
    sampler = Sampler(model, Diffusion(config, device), config, device, args.precision)
    crystals = sampler.sample(compositions, args.num_samples, seed=args.seed)
    unwritten = 0
    for crystal in crystals:
        name = f"{args.formula[crystal.composition_index]}_{crystal.sample_index}.cif"
        part = crystal.non_finite_part()
        if part:
            unwritten += 1
            print(f"{name}: not written: non-finite {part} (the model's weights or --step-lr may have diverged)",
                  file=sys.stderr)
            continue
        structure = structure_of(crystal)
        structure.to(filename=str(args.out / name))
        print(f"{name}: {structure.composition.reduced_formula}, a b c = "
              f"{' '.join(f'{v:.3f}' for v in structure.lattice.abc)}, volume {structure.volume:.1f} A^3")
    if unwritten:
        raise SystemExit(f"error: {unwritten} of {len(crystals)} sampled crystals were not finite and not written")


if __name__ == "__main__":
    main()
