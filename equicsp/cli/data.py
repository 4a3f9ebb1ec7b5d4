"""`python -m equicsp.data`: fetch a benchmark, split a CDVAE CSV into train/val/test, or check a CSV or CIF folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from equicsp.cli.options import HelpFormatter, examples
from equicsp.data import fetch
from equicsp.data.crystals import DatasetError, PreprocessOptions, load_crystals
from equicsp.data.splits import GROUPINGS, split_csv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m equicsp.data", description=__doc__.split(": ", 1)[1].splitlines()[0],
        formatter_class=HelpFormatter,
        epilog=examples("python -m equicsp.data fetch mp_20", "python -m equicsp.data check data/mp_20/test.csv",
                        "python -m equicsp.data split my_crystals.csv --out data/mine --limit 1000"))
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "fetch":  # its own parser, with the download options
        raise SystemExit(fetch.main(argv[1:]))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", add_help=False,
                        help="download a benchmark's published CSVs, checked against pinned git blob ids "
                             "(`fetch --help` for its options)")
    split = commands.add_parser("split", help="shuffle a CDVAE CSV into train/val/test CSVs", formatter_class=HelpFormatter,
                                epilog=examples("python -m equicsp.data split my_crystals.csv --out data/mine",
                                                "python -m equicsp.data split my_crystals.csv --out data/mine "
                                                "--group-by composition"))
    split.add_argument("source", type=Path, help="a CDVAE-style CSV (a cif column)")
    split.add_argument("--out", type=Path, required=True, help="folder for train.csv, val.csv and test.csv")
    split.add_argument("--fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2), metavar=("TRAIN", "VAL", "TEST"),
                       help="the shares of the rows")
    split.add_argument("--limit", type=int, default=None, help="keep this many rows after shuffling")
    split.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    split.add_argument("--force", action="store_true", help="replace train/val/test CSVs already in --out")
    split.add_argument("--group-by", choices=GROUPINGS, default="none",
                       help="composition: keep every reduced composition (all its polymorphs) in one split")
    check = commands.add_parser("check", help="parse a CSV or CIF folder and report unusable rows",
                                formatter_class=HelpFormatter,
                                epilog=examples("python -m equicsp.data check data/mp_20/train.csv --report report.json"))
    check.add_argument("path", help="a CSV file or a folder of CIF files")
    check.add_argument("--max-atoms", type=int, default=PreprocessOptions.max_atoms,
                       help="crystals with more atoms are reported as skipped")
    check.add_argument("--report", type=Path, help="write the machine-readable report (JSON) here")
    args = parser.parse_args(argv)
    try:
        if args.command == "split":
            sizes = split_csv(args.source, args.out, tuple(args.fractions), args.limit, args.seed, args.force,
                              args.group_by, show_progress=True)
            print("\n".join(sizes.lines()))
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
