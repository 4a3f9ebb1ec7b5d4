"""The config on the command line: `--config`, `--preset`, `--objective-preset` and one `--section.field` option per
config field, each described by its field's comment in equicsp/config.py."""

from __future__ import annotations

import argparse
import inspect
import io
import tokenize
import typing
from dataclasses import fields
from pathlib import Path

from equicsp.config import (
    DATASET_PRESETS,
    OBJECTIVE_PRESETS,
    SECTIONS,
    Config,
    ConfigError,
    apply_overrides,
    field_types,
    load_config,
    make_config,
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --preset, --objective-preset and one --section.field option per config field."""
    parser.add_argument("--config", type=Path, help="a YAML config (as saved with every run)")
    parser.add_argument("--preset", choices=sorted(DATASET_PRESETS), help="dataset preset")
    parser.add_argument("--objective-preset", choices=sorted(OBJECTIVE_PRESETS), help="a Table 2 row")
    group = parser.add_argument_group("config fields (section.field VALUE; the default is the perov_5 preset's, "
                                      "--preset and --config set their own)")
    defaults = make_config().flat()
    for section, section_cls in typing.get_type_hints(Config).items():
        if section in SECTIONS:
            docs = field_docs(section_cls)
            for name in field_types(section_cls):
                group.add_argument(f"--{section}.{name}", dest=f"cfg:{section}.{name}", metavar="VALUE", default=None,
                                   help=f"{docs.get(name, '')} (default: {defaults[f'{section}.{name}']})".lstrip())


def field_docs(section_cls: type) -> dict[str, str]:
    """Each field's comment in the dataclass's source (on its line, else the comment lines just above it): the one
    place a field is documented, which `train --help` shows."""
    source = inspect.getsource(section_cls)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("# ").strip()
    lines = source.splitlines()
    docs = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if not name.isidentifier() or line.lstrip().startswith("#") or ":" not in line:
            continue
        above: list[str] = []
        while number - len(above) - 1 in comments and lines[number - len(above) - 2].lstrip().startswith("#"):
            above.insert(0, comments[number - len(above) - 1])
        docs[name] = comments.get(number) or " ".join(above)
    return {name: text for name, text in docs.items() if name in {f.name for f in fields(section_cls)}}


def config_from_arguments(args: argparse.Namespace) -> Config:
    overrides = {key[4:]: value for key, value in vars(args).items() if key.startswith("cfg:") and value is not None}
    if args.config:
        base = load_config(args.config)
        if args.preset or args.objective_preset:
            raise ConfigError("give either --config or --preset/--objective-preset, not both")
        return apply_overrides(base, overrides).validate()
    return make_config(args.preset or "perov_5", args.objective_preset or "equicsp", overrides)
