"""What every command's options share: help that shows defaults and examples, deprecated spellings, --verbose."""

from __future__ import annotations

import argparse
import logging
import os
import sys

PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # read by MLflow at each download (tracking.py turns it off)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and the examples as written, and each option's default after its help.

    argparse's ArgumentDefaultsHelpFormatter would also print "(default: None)" for an option whose
    help already says what its absence means, and rewrap the examples.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, [], argparse.SUPPRESS)
                or text == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def examples(*commands: str) -> str:
    """An epilog of example command lines."""
    return "examples:\n" + "\n".join(f"  {command}" for command in commands)


def deprecated(new: str) -> type[argparse.Action]:
    """An action for an old spelling of option `new`: it still works, hidden from --help, with a warning."""

    class DeprecatedSpelling(argparse._StoreAction):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {option_string} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return DeprecatedSpelling


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own output too: MLflow's download bars, Optuna's and Ray Tune's logs")


def show_library_output(verbose: bool) -> None:
    """With --verbose, MLflow draws its download bars again (the environment reaches Ray workers started after).

    Without it, Ray Tune's legacy reporter, which prints nothing at verbose 0 (its new one prints its
    configuration box whatever the verbosity), and MLflow's warnings only (not its store's INFO lines)."""
    if verbose:
        os.environ[PROGRESS_BAR_ENV] = "true"
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported, here or in a worker
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # and where it is imported already
