"""One vocabulary across the commands: every option described with its default, examples, old spellings kept."""

import argparse
import runpy
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("train", "sample", "evaluate", "generate", "data")
SWEEPS = ("ablation", "hyperparams")


class Parsed(Exception):
    """Raised by parse_args to hand the command's parser over before anything runs."""


def parser_of(main) -> argparse.ArgumentParser:
    def capture(parser, *args, **kwargs):
        raise Parsed(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(Parsed) as caught:
        main([])
    return caught.value.args[0]


def every_parser():
    import importlib

    mains = {name: importlib.import_module(f"equicsp.cli.{name}").main for name in COMMANDS}
    mains.update({name: runpy.run_path(str(ROOT / "sweeps" / f"{name}.py"), run_name="imported")["main"]
                  for name in SWEEPS})
    for name, main in mains.items():
        parser = parser_of(main)
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{name} {sub}", subparser) for sub, subparser in action.choices.items()
                            if subparser.add_help)


def test_every_option_of_every_command_is_described_and_each_help_ends_with_examples():
    for name, parser in every_parser():
        undescribed = [action.option_strings or action.dest for action in parser._actions
                       if not action.help and not isinstance(action, argparse._SubParsersAction)]
        assert undescribed == [], name
        text = parser.format_help()
        assert "examples:\n" in text and text.rstrip().splitlines()[-1].startswith("  "), name


def test_a_default_is_shown_unless_the_help_says_what_the_absence_means():
    import equicsp.cli.evaluate as evaluate

    text = " ".join(parser_of(evaluate.main).format_help().split())
    assert "(best of k) (default: 1)" in text and "--precision {fp32,tf32,bf16} sampling precision (default: fp32)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_old_spellings_still_work_with_a_warning(capsys):
    from equicsp.cli.generate import main, parse_arguments

    assert parse_arguments(["--checkpoint", "m.pt", "--num", "5", "--out", "g"]).num_samples == 5
    assert "--num is deprecated; use --num-samples" in capsys.readouterr().err
    assert "--num " not in parser_of(main).format_help()  # hidden
    with pytest.raises(SystemExit):
        parse_arguments(["--checkpoint", "m.pt", "--out", "g"])
    assert "required: --num-samples" in capsys.readouterr().err
    hyperparams = runpy.run_path(str(ROOT / "sweeps" / "hyperparams.py"), run_name="imported")
    captured = []
    with mock.patch.dict(hyperparams["main"].__globals__,
                         {"run_from_command_line": lambda spec, launch: captured.append(spec)}):
        hyperparams["main"](["--arm", "diffcsp"])
    assert captured[0].arms == ("diffcsp",) and captured[0].name == "hyperparams-smoke-diffcsp"
    assert "--arm is deprecated; use --arms" in capsys.readouterr().err


def test_verbose_brings_the_libraries_output_back_in_a_sweep():
    from equicsp.cli.sweep import add_launch_arguments, launch_from_arguments

    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    assert launch_from_arguments(parser.parse_args([])).verbose is False  # quiet by default
    assert launch_from_arguments(parser.parse_args(["--verbose"])).verbose is True
