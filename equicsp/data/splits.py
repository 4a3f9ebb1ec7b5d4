"""A dataset folder's train/val/test splits: finding the folder, loading the splits, and shuffling a CSV into them."""

from __future__ import annotations

import csv
import math
import random
import sys
from dataclasses import replace
from pathlib import Path

from equicsp.config import Config
from equicsp.data.crystals import (
    BUNDLED_PREFIX,
    SPLITS,
    CrystalDataset,
    DatasetError,
    PreprocessOptions,
    _check_text_file,
    load_crystals,
    resolve_path,
)
from equicsp.data.fetch import DATASETS, default_data_dir, fetch_hint


def preprocess_options(config: Config) -> PreprocessOptions:
    """The preprocessing a model's config asks for (its test crystals must be read the same way)."""
    return PreprocessOptions(config.data.max_atoms, config.data.niggli, config.data.primitive)


def find_data_folder(path: str, fallbacks: list[Path] = ()) -> str:
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
    if not config.data.path:
        fetched = default_data_dir(config.preset)
        if config.preset not in DATASETS or not (fetched / "train.csv").is_file():
            raise DatasetError(fetch_hint(config.preset) + ", or pass --data FOLDER" if config.preset in DATASETS
                               else f"no data.path for preset {config.preset!r}: pass --data FOLDER")
        config = replace(config, data=replace(config.data, path=str(fetched)))
    root = resolve_path(config.data.path)
    if not root.is_dir():
        raise DatasetError(f"data.path {config.data.path!r} is not a folder with train/val/test files")
    options = preprocess_options(config)
    datasets = {}
    for split in splits:
        candidates = [root / f"{split}.csv", root / split]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise DatasetError(f"{root}: no {split}.csv and no {split}/ folder of CIFs")
        datasets[split] = load_crystals(found, options, show_progress=show_progress)
    return datasets


def check_fractions(fractions: tuple[float, float, float]) -> None:
    """train/val/test fractions: finite, none negative, and a positive train fraction (they need not sum to 1)."""
    if len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions):
        raise ValueError(f"--fractions must be three finite numbers >= 0 (train val test), not {list(fractions)}")
    if fractions[0] <= 0:
        raise ValueError(f"the train fraction must be > 0, not {fractions[0]}")


def split_csv(source: Path, out_dir: Path, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
              limit: int | None = None, seed: int = 0, force: bool = False) -> dict[str, int]:
    """Shuffle the rows of a CDVAE CSV (optionally keep `limit`) into train/val/test CSVs.

    Existing train/val/test CSVs in out_dir are replaced only with force.
    """
    check_fractions(fractions)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, not {limit}")
    existing = [str(out_dir / f"{name}.csv") for name in SPLITS if (out_dir / f"{name}.csv").exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} exist already; pass --force to replace them")
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
    random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit else rows
    total = sum(fractions)
    train_end = round(len(rows) * fractions[0] / total)
    val_end = train_end + round(len(rows) * fractions[1] / total)
    parts = {"train": rows[:train_end], "val": rows[train_end:val_end], "test": rows[val_end:]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with open(out_dir / f"{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(part)
    return {name: len(part) for name, part in parts.items()}
