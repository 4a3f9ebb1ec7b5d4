"""`equicsp COMMAND ...`: one console script for every command (`equicsp train --help`, ...)."""

from __future__ import annotations

import importlib
import runpy
import sys

COMMANDS = {
    "train": "train a model (Ray Train, or --local in this process)",
    "sample": "structures for a formula from a trained model, as CIFs",
    "evaluate": "CSP match rate and RMSE of a logged run or a checkpoint",
    "generate": "new crystals from a generation model, with their scores",
    "data": "fetch a benchmark, split a CSV, check a CSV or CIF folder",
    "sweep": "run a sweep script, e.g. `equicsp sweep sweeps/ablation.py --profile smoke`",
}


def usage() -> str:
    lines = ["usage: equicsp COMMAND [options]   (equicsp COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"equicsp: no command {command!r}\n{usage()}")
    if command == "sweep":
        if not rest or rest[0].startswith("-"):
            raise SystemExit("usage: equicsp sweep SCRIPT [options]   e.g. equicsp sweep sweeps/ablation.py --profile smoke")
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")
        return
    sys.argv = [f"equicsp {command}", *rest]
    importlib.import_module(f"equicsp.cli.{command}").main(rest)


if __name__ == "__main__":
    main()
