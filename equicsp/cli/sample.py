"""`python -m equicsp.sample`: crystal structures for a formula from a trained model, as CIFs.

The model is a checkpoint file or a logged MLflow training run (`--run-id`, which also brings
the step size a sweep tuned for it). `--formula-units 1,2,4` samples cells of that many formula
units each; `auto`, the sizes the training set holds for such formulas. Each CIF written is
reported with its shortest interatomic distance and SMACT validity, flagged INVALID with the
reason when it fails the validity checks of the evaluation. A sampled crystal with a
non-finite lattice or coordinates (a diverged model) is not written: it is reported on
stderr, the others are written, and the command exits non-zero. The CIFs reach `--out` together once
the sampling is done (see data/outputs.py): a folder holding files is replaced only with `--force`,
and an interrupted command leaves it as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from equicsp.cli.options import HelpFormatter, add_verbose_argument, examples, show_library_output
from equicsp.config import COMPILE_SETTINGS, PRECISIONS, Config
from equicsp.data.cells import cell_formula, parse_units, reduced_counts, units_seen_in_training, unseen_composition
from equicsp.data.crystals import MAX_ATOMIC_NUMBER, DatasetError
from equicsp.data.outputs import OutputFolder, interrupted, output_path
from equicsp.data.splits import find_data_folder, load_split
from equicsp.devices import resolve_device
from equicsp.engine.checkpoint import CheckpointError, model_from_checkpoint, read_checkpoint
from equicsp.engine.sampler import COMPILE_HELP, Sampler, with_sampler_options
from equicsp.evaluation.metrics import (
    MIN_VOLUME,
    CrystalArrays,
    closest_distance,
    composition_valid,
    structural_problem,
    structure_of,
)
from equicsp.model.diffusion import Diffusion
from equicsp.platform import mlflow_store, tracking
from equicsp.task import TUNED_STEP_LR, task_of


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
    if not types:
        raise ValueError(f"formula {formula!r} has no atoms: give each element a count of at least 1")
    return torch.tensor(types, dtype=torch.long)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m equicsp.sample", description=__doc__.split(":", 1)[1].strip().split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog=examples("python -m equicsp.sample --run-id 26104baf --formula SrTiO3 --out cifs/",
                        "python -m equicsp.sample --checkpoint runs/train/best.pt --formula BaTiO3 --formula KNbO3 "
                        "--num-samples 5 --out cifs/",
                        "python -m equicsp.sample --run-id 26104baf --formula SrTiO3 --formula-units auto --out cifs/"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a checkpoint file (best.pt)")
    source.add_argument("--run-id", help="an MLflow training run: its best checkpoint and the step size a sweep tuned")
    parser.add_argument("--tracking-uri", help=mlflow_store.TRACKING_URI_HELP)
    parser.add_argument("--formula", required=True, action="append", help="e.g. SrTiO3; repeat for several")
    parser.add_argument("--formula-units",
                        help="formula units per cell, e.g. 1,2,4 (each is sampled), or auto: the cell sizes the "
                             "training set holds for such formulas (default: the formula as written)")
    parser.add_argument("--num-samples", type=int, default=1, help="structures sampled per formula (and cell size)")
    parser.add_argument("--out", type=output_path, required=True,
                        help="folder for the CIFs, written as a whole when the sampling is done")
    parser.add_argument("--force", action="store_true", help="replace what --out holds (refused otherwise)")
    parser.add_argument("--step-lr", type=float,
                        help="Langevin step size (default: the step size a sweep tuned for --run-id, else the config's)")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: every timestep)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="sampling precision")
    parser.add_argument("--compile", choices=COMPILE_SETTINGS, help=COMPILE_HELP)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    show_library_output(args.verbose)
    return args


def load_source(args: argparse.Namespace) -> tuple[dict, float | None, list[Path]]:
    """(checkpoint, the step size tuned for it or None, where a relative data.path may be) of --checkpoint or --run-id."""
    if args.checkpoint:
        checkpoint = read_checkpoint(args.checkpoint)
        above = [folder / checkpoint["config"]["data"]["path"] for folder in args.checkpoint.resolve().parents]
        return checkpoint, checkpoint.get(TUNED_STEP_LR), above  # a sweep writes its tuned step into the checkpoint
    tracker = tracking.Tracker.resolve(args.tracking_uri)
    mlflow_store.check_reachable(tracker.uri)
    args.run_id = tracker.resolve_run_id(args.run_id)
    run = tracker.get_run(args.run_id)
    checkpoint = tracker.read_logged_checkpoint(args.run_id)
    print(f"model of {tracker.describe_run(args.run_id)}")
    logged = run.data.tags.get(tracking.DATA_DIR_TAG)
    return checkpoint, run.data.metrics.get(TUNED_STEP_LR), [Path(logged)] if logged else []


def cells_to_sample(args: argparse.Namespace, config: Config, data_folders: list[Path]) -> list[tuple[str, torch.Tensor]]:
    """(CIF name stem, atomic numbers) of every cell asked for; a warning for a composition unlike the training set's."""
    units = None if args.formula_units is None else parse_units(args.formula_units)
    try:
        root = find_data_folder(config.data.path, data_folders)
        training = load_split(config, "train", root, False)
    except DatasetError as error:
        if args.formula_units is not None and units is None:
            raise ValueError(f"--formula-units auto needs the model's training data, which is not reachable here "
                             f"({error}); give the units instead, e.g. --formula-units 1,2,4") from None
        training = None  # only the warning below is lost
    unseen = [unseen_composition(formula, training) for formula in args.formula] if training is not None else []
    for warning in filter(None, unseen):
        print(f"warning: {warning}", file=sys.stderr)
    if args.formula_units is None:
        return [(formula, composition_of(formula)) for formula in args.formula]
    cells = []
    for formula in args.formula:
        counts = reduced_counts(formula)
        if units is None:
            assert training is not None  # --formula-units auto without the training data was refused above
            chosen, reason = units_seen_in_training(formula, training, config.data.max_atoms)
            print(reason)
        else:
            chosen = units
        cells += [(name, composition_of(name)) for name in (cell_formula(counts, n) for n in chosen)]
    return cells


def validity_line(crystal, structure) -> tuple[str, bool]:
    """The shortest interatomic distance, then the evaluation's two validity flags apart: the structure (distances,
    volume) and the composition (SMACT: charge balance and electronegativity); valid when both are."""
    problem = structural_problem(CrystalArrays.of(crystal.atom_types, crystal.frac_coords, crystal.lengths,
                                                  crystal.angles))
    smact = composition_valid(tuple(sorted(site.specie.Z for site in structure)))
    closest = "n/a"  # a flat cell has no meaningful distances (and LAPACK complains about it): the reason says why
    if structure.volume > MIN_VOLUME:
        with contextlib.suppress(Exception):  # a lattice pymatgen cannot reduce; structural_problem says why
            closest = f"{closest_distance(structure):.2f} A"
    structure_flag = f"INVALID ({problem})" if problem else "valid"
    return (f"closest atoms {closest}; structure {structure_flag}; composition (SMACT) {'valid' if smact else 'INVALID'}",
            not problem and smact)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    output = OutputFolder(args.out, args.force)
    try:
        sample_into(args, output)
    except KeyboardInterrupt:
        raise interrupted(f"no CIF was written to {args.out} (it keeps what it held); rerun the same command "
                          "to sample again") from None
    finally:
        output.close()


def sample_into(args: argparse.Namespace, output: OutputFolder) -> None:
    """Check everything, sample, then write every CIF into output at once."""
    try:
        if args.num_samples < 1:
            raise ValueError("--num-samples must be >= 1")
        [composition_of(formula) for formula in args.formula]  # a bad formula fails before the model loads
        output.open()  # checked and held before the sampling, whose results would be lost
        device = resolve_device(args.device)
        checkpoint, tuned_step_lr, data_folders = load_source(args)
        config, model = model_from_checkpoint(checkpoint, device, source=args.checkpoint or f"run {args.run_id}")
        task_of(config).check_predicts_structures()
        step_lr = args.step_lr if args.step_lr is not None else tuned_step_lr
        if args.step_lr is None and tuned_step_lr is not None:
            print(f"step_lr {tuned_step_lr:.3g}: the step size a sweep tuned for this model")
        config = with_sampler_options(config, step_lr, args.num_steps, compile=args.compile)
        cells = cells_to_sample(args, config, data_folders)
        if max(len(types) for _, types in cells) > config.data.max_atoms:
            raise ValueError(f"a formula has more atoms than the model's data.max_atoms ({config.data.max_atoms})")
    except (ValueError, OSError, CheckpointError, tracking.TrackingError) as error:
        raise SystemExit(f"error: {error}") from None
    sampler = Sampler(model, Diffusion(config, device), config, device, args.precision)
    crystals = sampler.sample([types for _, types in cells], args.num_samples, seed=args.seed)
    try:
        with output.writing() as folder:
            unwritten, invalid = write_cifs(crystals, cells, folder)
    except OSError as error:
        raise SystemExit(f"error: {error}") from None
    if invalid:
        print(f"{invalid} of {len(crystals) - unwritten} written crystals are INVALID: they fail the evaluation's "
              "validity checks (the reason is on each line)", file=sys.stderr)
    if unwritten:
        raise SystemExit(f"error: {unwritten} of {len(crystals)} sampled crystals were not finite and not written")


def write_cifs(crystals: list, cells: list[tuple[str, torch.Tensor]], folder: Path) -> tuple[int, int]:
    """Each finite crystal as a CIF in folder, reported on a line; (how many were not finite, how many invalid)."""
    unwritten, invalid = 0, 0
    for crystal in crystals:
        name = f"{cells[crystal.composition_index][0]}_{crystal.sample_index}.cif"
        part = crystal.non_finite_part()
        if part:
            unwritten += 1
            print(f"{name}: not written: non-finite {part} (the model's weights or --step-lr may have diverged)",
                  file=sys.stderr)
            continue
        structure = structure_of(crystal)
        structure.to(filename=str(folder / name))
        validity, valid = validity_line(crystal, structure)
        invalid += not valid
        print(f"{name}: {structure.composition.reduced_formula}, a b c = "
              f"{' '.join(f'{v:.3f}' for v in structure.lattice.abc)}, volume {structure.volume:.1f} A^3, {validity}")
    return unwritten, invalid


if __name__ == "__main__":
    main()
