"""A dataset folder's train/val/test splits: finding the folder, loading the splits, and shuffling a CSV into them."""

from __future__ import annotations

import csv
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from equicsp.config import Config
from equicsp.data.cells import reduced_composition
from equicsp.data.crystals import (
    BUNDLED_PREFIX,
    SPLITS,
    CrystalDataset,
    DatasetError,
    PreprocessOptions,
    RawRecords,
    _check_text_file,
    load_crystals,
    parse_records,
    read_records,
    resolve_path,
)
from equicsp.data.fetch import DATASETS, fetch_hint, fetched_data


def preprocess_options(config: Config) -> PreprocessOptions:
    """The preprocessing a model's config asks for (its test crystals must be read the same way)."""
    return PreprocessOptions(config.data.max_atoms, config.data.niggli, config.data.primitive)


def find_data_folder(path: str, fallbacks: Sequence[Path] = ()) -> str:
    """A model's data.path, or where it is from here when it does not name a folder from this working folder.

    A relative data.path means the folder it was trained from; evaluating elsewhere, the
    fallbacks (for a logged run: the absolute folder recorded at launch; for a checkpoint file:
    the same relative path under the checkpoint's folders) are tried in order. The error
    names every place looked at.
    """
    resolved = resolve_path(path)
    if not path or "://" in path or path.startswith(BUNDLED_PREFIX) or resolved.is_dir():
        return path
    tried = [resolved.resolve()]
    for candidate in fallbacks:
        if candidate.is_dir():
            print(f"data.path {path!r} is not a folder from {Path.cwd()}; using {candidate}", file=sys.stderr)
            return str(candidate)
        tried.append(candidate)
    looked = ", ".join(dict.fromkeys(str(place) for place in tried))
    raise DatasetError(f"data.path {path!r} is not a folder (looked at {looked}); pass --data")


def load_split(config: Config, split: str, root: str | None = None, show_progress: bool = True) -> CrystalDataset:
    """One split of a model's data, read from root when its data.path was found elsewhere (find_data_folder)."""
    if root is not None:
        config = replace(config, data=replace(config.data, path=root))
    return load_splits(config, (split,), show_progress)[split]


def load_splits(config: Config, splits: tuple[str, ...] = SPLITS, show_progress: bool = True) -> dict[str, CrystalDataset]:
    """train/val/test from `data.path`: a folder holding train.csv, val.csv, test.csv (or train/, ... CIF folders)."""
    root, options = data_root(config), preprocess_options(config)
    return {split: load_crystals(split_source(root, split), options, show_progress=show_progress) for split in splits}


def split_size(config: Config, split: str) -> int:
    """One split's crystals before parsing (its CSV rows or CIF files): a second or so, for an estimate."""
    return len(read_records(split_source(data_root(config), split)).cifs)


def data_root(config: Config) -> Path:
    """The folder data.path names (the fetched benchmark's when empty); a DatasetError saying what is missing."""
    if not config.data.path:
        fetched = fetched_data(config.preset)
        if fetched is None:
            raise DatasetError(fetch_hint(config.preset) + ", or pass --data FOLDER" if config.preset in DATASETS
                               else f"no data.path for preset {config.preset!r}: pass --data FOLDER")
        config = replace(config, data=replace(config.data, path=str(fetched)))
    root = resolve_path(config.data.path)
    if not root.is_dir():
        raise DatasetError(f"data.path {config.data.path!r} is not a folder with train/val/test files")
    return root


def split_source(root: Path, split: str) -> Path:
    """root/<split>.csv, else root/<split>/ (a folder of CIFs)."""
    found = next((c for c in (root / f"{split}.csv", root / split) if c.exists()), None)
    if found is None:
        raise DatasetError(f"{root}: no {split}.csv and no {split}/ folder of CIFs")
    return found


def check_fractions(fractions: tuple[float, float, float]) -> None:
    """train/val/test fractions: finite, none negative, and a positive train fraction (they need not sum to 1)."""
    if len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions):
        raise ValueError(f"--fractions must be three finite numbers >= 0 (train val test), not {list(fractions)}")
    if fractions[0] <= 0:
        raise ValueError(f"the train fraction must be > 0, not {fractions[0]}")


GROUPINGS = ("none", "composition")  # split_csv's group_by: rows one by one, or every reduced composition whole
COMPOSITION_MAX_ATOMS = 1000  # larger rows are not parsed for their composition: each is a group of its own


@dataclass(frozen=True)
class SplitSizes:
    """What a split_csv wrote: crystals (rows) and distinct reduced compositions per split."""

    crystals: dict[str, int]
    compositions: dict[str, int]
    shared: int  # reduced compositions found in more than one split (0 when grouped by composition)
    unreadable: int  # rows whose CIF gave no composition: each placed on its own

    def lines(self) -> list[str]:
        return [", ".join(f"{name}: {count}" for name, count in self.crystals.items()),
                "reduced compositions: " + ", ".join(f"{name} {count}" for name, count in self.compositions.items())
                + f"; {self.shared} in more than one split"
                + (f"; {self.unreadable} rows without a readable CIF, each on its own" if self.unreadable else "")]


def split_csv(source: Path, out_dir: Path, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
              limit: int | None = None, seed: int = 0, force: bool = False, group_by: str = "none",
              show_progress: bool = False) -> SplitSizes:
    """Shuffle the rows of a CDVAE CSV (optionally keep `limit`) into train/val/test CSVs.

    group_by "composition" keeps the crystals of each reduced composition (SrTiO3 and Sr2Ti2O6 alike) in one split,
    so no polymorph of a test composition is in training (docs/method.md#polymorph-aware-splits): the shuffled
    rows' compositions are taken whole, in the order they first appear, into train until it holds its share of
    the rows, then val, then test. Existing train/val/test CSVs in out_dir are replaced only with force.
    """
    check_fractions(fractions)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, not {limit}")
    if group_by not in GROUPINGS:
        raise ValueError(f"--group-by must be one of {', '.join(GROUPINGS)}, not {group_by!r}")
    existing = [str(out_dir / f"{name}.csv") for name in SPLITS if (out_dir / f"{name}.csv").exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} exist already; pass --force to replace them")
    header, rows = _read_rows(source)
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    keys = composition_keys([row[header.index("cif")] if len(row) > header.index("cif") else "" for row in rows],
                            show_progress)
    total = sum(fractions)
    ends = (round(len(rows) * fractions[0] / total), round(len(rows) * (fractions[0] + fractions[1]) / total))
    places = _grouped_places(keys, ends) if group_by == "composition" else \
        [0 if i < ends[0] else 1 if i < ends[1] else 2 for i in range(len(rows))]
    parts = {name: [row for row, place in zip(rows, places) if place == number] for number, name in enumerate(SPLITS)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with open(out_dir / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(part)
    return _sizes(keys, places)


def _read_rows(source: Path) -> tuple[list[str], list[list[str]]]:
    if not Path(source).is_file():
        raise DatasetError(f"{source}: no such file")
    _check_text_file(source)
    try:
        with open(source, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [row for row in reader if row]
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{source}: not a readable CSV text file ({error})") from None
    if header is None or "cif" not in header:
        raise DatasetError(f"{source}: no 'cif' column (columns: {header})")
    return header, rows


def composition_keys(cifs: list[str], show_progress: bool = False) -> list[tuple | None]:
    """Each CIF's reduced composition (cells.reduced_composition of the structure pymatgen reads, symmetry applied,
    no Niggli reduction), None where it gives none (an unparsable, disordered or over-large crystal)."""
    options = PreprocessOptions(max_atoms=COMPOSITION_MAX_ATOMS, niggli=False, primitive=False)
    records = RawRecords(cifs=cifs, sources=[""] * len(cifs), metadata=[{}] * len(cifs))
    return [None if isinstance(parsed, str) else reduced_composition(parsed.atom_types)
            for parsed in parse_records(records, options, show_progress=show_progress)]


def _grouped_places(keys: list[tuple | None], ends: tuple[int, int]) -> list[int]:
    """0, 1 or 2 (train, val, test) per row: each composition's rows together, a row without one on its own."""
    groups: dict[object, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(("row", row) if key is None else key, []).append(row)
    places, taken = [0] * len(keys), 0
    for members in groups.values():  # in the order each composition first appears among the shuffled rows
        place = 0 if taken < ends[0] else 1 if taken < ends[1] else 2
        for row in members:
            places[row] = place
        taken += len(members)
    return places


def _sizes(keys: list[tuple | None], places: list[int]) -> SplitSizes:
    splits_of: dict[tuple, set[int]] = {}
    for key, place in zip(keys, places):
        if key is not None:
            splits_of.setdefault(key, set()).add(place)
    return SplitSizes(crystals={name: places.count(number) for number, name in enumerate(SPLITS)},
                      compositions={name: sum(number in found for found in splits_of.values())
                                    for number, name in enumerate(SPLITS)},
                      shared=sum(len(found) > 1 for found in splits_of.values()),
                      unreadable=sum(key is None for key in keys))
