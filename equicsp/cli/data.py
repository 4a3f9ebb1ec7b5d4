"""`python -m equicsp.data`: fetch a benchmark, split a CDVAE CSV into train/val/test, or check a CSV or CIF folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from equicsp.data import fetch
from equicsp.data.crystals import DatasetError, PreprocessOptions, load_crystals
from equicsp.data.splits import split_csv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m equicsp.data", description=__doc__.split(": ", 1)[1].splitlines()[0])
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "fetch":  # its own parser, with the download options
        raise SystemExit(fetch.main(argv[1:]))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", add_help=False,
                        help="download a benchmark's published CSVs, checked against pinned git blob ids "
                             "(`fetch --help` for its options)")
    split = commands.add_parser("split", help="shuffle a CDVAE CSV into train/val/test CSVs")
    split.add_argument("source", type=Path)
    split.add_argument("--out", type=Path, required=True)
    split.add_argument("--fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2))
    split.add_argument("--limit", type=int, default=None, help="keep this many rows after shuffling")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--force", action="store_true", help="replace train/val/test CSVs already in --out")
    check = commands.add_parser("check", help="parse a CSV or CIF folder and report unusable rows")
    check.add_argument("path")
    check.add_argument("--max-atoms", type=int, default=PreprocessOptions.max_atoms)
    check.add_argument("--report", type=Path, help="write the machine-readable report (JSON) here")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            counts = split_csv(args.source, args.out, tuple(args.fractions), args.limit, args.seed, args.force)
            print(", ".join(f"{name}: {count}" for name, count in counts.items()))
            return
        if args.report and not args.report.parent.is_dir():  # before the parsing, which can take long
            raise DatasetError(f"cannot write the report to {args.report}: no folder {args.report.parent}")
        dataset = load_crystals(args.path, PreprocessOptions(max_atoms=args.max_atoms))
        print(dataset.report.summary())
        for skipped in dataset.report.skipped:
            print(f"  {skipped.source}: {skipped.reason}")
        if args.report:
            args.report.write_text(dataset.report.to_json())
    except (ValueError, OSError) as error:  # DatasetError is a ValueError
        raise SystemExit(f"error: {error}") from None

if __name__ == "__main__":
    main()
