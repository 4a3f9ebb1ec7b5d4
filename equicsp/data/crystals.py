"""Crystals from CDVAE CSV files or folders of CIFs, as tensors: parsing, caching, bad-row report.

A CSV has one crystal per row in a `cif` column (other columns are kept as metadata); a
folder holds one crystal per `.cif` file. Every structure is parsed by pymatgen, optionally
reduced to its primitive cell, Niggli-reduced, and stored as atom types, fractional
coordinates and the six lattice parameters. A row that cannot be used is skipped and
reported with the reason and where it is: "line N" of a CSV (the file's own line number,
1-based, header included, the line where the row's record starts: a CIF cell spans many
lines) or the CIF file's name; it never fails the dataset.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from equicsp.data.cache import cache_dir, cache_key, load_cached, store_cached

if TYPE_CHECKING:
    from torch_geometric.data import Data

PREPROCESS_VERSION = 1
MAX_ATOMIC_NUMBER = 100  # the denoiser's embedding table has one row per Z = 1 .. 100
BUNDLED_PREFIX = "bundled:"
SPLITS = ("train", "val", "test")
csv.field_size_limit(sys.maxsize)


class DatasetError(ValueError):
    """A dataset that cannot be used at all (missing, or no usable row)."""


@dataclass(frozen=True)
class PreprocessOptions:
    max_atoms: int = 20
    niggli: bool = True
    primitive: bool = False


@dataclass(frozen=True)
class SkippedRow:
    row: int  # 0-based data row of a CSV (header excluded), or index in the sorted CIF folder
    source: str  # "line 17" (the CSV line where the row starts, 1-based, header included) or the CIF file name
    reason: str


@dataclass
class DataReport:
    path: str
    total: int
    skipped: list[SkippedRow] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.total - len(self.skipped)

    def summary(self) -> str:
        line = f"{self.path}: {self.kept} of {self.total} crystals usable"
        if self.skipped:
            reasons: dict[str, int] = {}
            for skipped in self.skipped:
                kind = skipped.reason.split(":")[0]
                reasons[kind] = reasons.get(kind, 0) + 1
            line += ", skipped " + ", ".join(f"{count} ({kind})" for kind, count in sorted(reasons.items()))
        return line

    def to_json(self) -> str:
        return json.dumps({"path": self.path, "total": self.total, "kept": self.kept,
                           "skipped": [asdict(s) for s in self.skipped]}, indent=1)


@dataclass(frozen=True)
class ParsedCrystal:
    atom_types: list[int]
    frac_coords: list[list[float]]
    lengths: list[float]
    angles: list[float]


def parse_cif(text: str, options: PreprocessOptions) -> ParsedCrystal:
    """One CIF -> a reduced crystal; raises ValueError with the reason when it is unusable."""
    from pymatgen.core import Structure

    _check_cif_text(text, options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(text, fmt="cif")
    except Exception as error:  # pymatgen raises many types for a malformed CIF
        raise ValueError(f"unparsable CIF: {type(error).__name__}: {error}".strip()) from None
    if not structure.is_ordered:
        raise ValueError("disordered: partial occupancies are not supported")
    unknown = sorted({str(site.specie) for site in structure
                      if getattr(site.specie, "Z", 0) < 1 or site.specie.Z > MAX_ATOMIC_NUMBER})
    if unknown:
        raise ValueError(f"unknown element: {', '.join(unknown)}")
    if not np.all(np.isfinite(structure.lattice.abc + structure.lattice.angles)) or not structure.volume > 0:
        raise ValueError(f"non-finite lattice: {structure.lattice.parameters}")
    if options.primitive:
        structure = structure.get_primitive_structure()
    if len(structure) > options.max_atoms:  # Niggli reduction keeps the count, and takes seconds on a large cell
        raise ValueError(f"too large: {len(structure)} atoms > max_atoms {options.max_atoms}")
    if options.niggli:
        structure = structure.get_reduced_structure(reduction_algo="niggli")
    return ParsedCrystal(
        atom_types=[site.specie.Z for site in structure],
        frac_coords=(structure.frac_coords % 1.0).tolist(),
        lengths=list(structure.lattice.abc),
        angles=list(structure.lattice.angles),
    )


_CELL_NUMBER = re.compile(r"^\s*_cell_(length_[abc]|angle_(?:alpha|beta|gamma))\s+(\S+)", re.MULTILINE | re.IGNORECASE)
_CIF_TOKEN = re.compile(r"'[^']*'|\"[^\"]*\"|\S+")


def _check_cif_text(text: str, options: PreprocessOptions) -> None:
    """What the CIF text shows cheaply, before pymatgen builds anything: a cell length <= 0 (which pymatgen
    turns into a mirrored cell), an angle outside (0, 180), or more atom sites than max_atoms (parsing a
    10,000-atom cell takes a minute)."""
    for name, value in _CELL_NUMBER.findall(text):
        number = _cif_number(value)
        if number is None:
            continue  # pymatgen reports what it cannot read
        if name.startswith("length") and not number > 0:
            raise ValueError(f"bad cell: _cell_{name} is {value}, a length must be > 0")
        if name.startswith("angle") and not 0 < number < 180:
            raise ValueError(f"bad cell: _cell_{name} is {value}, an angle must be between 0 and 180 degrees")
    sites = _atom_site_count(text)
    if sites is not None and sites > options.max_atoms:
        # The listed sites are at most the cell's atoms (symmetry only adds): a lower bound, even for the primitive cell.
        raise ValueError(f"too large: {sites} atom sites listed > max_atoms {options.max_atoms}")


def _cif_number(value: str) -> float | None:
    """'3.81(2)' -> 3.81; None for '?', '.' and what is not a number."""
    try:
        return float(value.split("(")[0])
    except ValueError:
        return None


def _atom_site_count(text: str) -> int | None:
    """Rows of the first loop of atom positions, or None when the text is not simple enough to count cheaply."""
    lines = [line.strip() for line in text.splitlines()]
    at = 0
    while at < len(lines):
        if lines[at].startswith(";"):  # a text field may hold anything: leave the counting to pymatgen
            return None
        if lines[at].lower() != "loop_":
            at += 1
            continue
        at += 1
        tags = []
        while at < len(lines) and lines[at].startswith("_"):
            tags.append(lines[at].split()[0].lower())
            at += 1
        values = 0
        while at < len(lines) and not lines[at].startswith(("_", ";")) and \
                not lines[at].lower().startswith(("loop_", "data_")):
            tokens = _CIF_TOKEN.findall(lines[at])
            comment = next((i for i, token in enumerate(tokens) if token.startswith("#")), len(tokens))
            values += comment
            at += 1
        if any(tag.startswith(("_atom_site_fract_", "_atom_site_cartn_")) for tag in tags):
            return values // len(tags)
    return None


def _parse_chunk(texts: list[str], options: PreprocessOptions) -> list[ParsedCrystal | str]:
    results: list[ParsedCrystal | str] = []
    for text in texts:
        try:
            results.append(parse_cif(text, options))
        except ValueError as error:
            results.append(str(error))
    return results


@dataclass
class RawRecords:
    """What a source file holds before parsing: CIF texts, their labels and metadata."""

    cifs: list[str]
    sources: list[str]
    metadata: list[dict[str, str]]
    empty_reason: str = "empty cif cell"  # the reason given for a row whose CIF text is blank


def _check_text_file(path: Path) -> None:
    """A binary file given as a CSV (a NUL byte near the start, which no CSV text holds) is an error naming it."""
    with open(path, "rb") as handle:
        if b"\0" in handle.read(65536):
            raise DatasetError(f"{path}: not a readable CSV text file (it holds NUL bytes: a binary file?)")


def read_records(path: Path) -> RawRecords:
    if path.is_dir():
        files = sorted(path.glob("*.cif"))
        return RawRecords([f.read_text(errors="replace") for f in files], [f.name for f in files],
                          [{"file": f.name} for f in files], "empty file")
    _check_text_file(path)
    records = RawRecords([], [], [])
    try:
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None or "cif" not in header:
                raise DatasetError(f"{path}: no 'cif' column (columns: {header})")
            while True:
                line = reader.line_num + 1  # where the next record starts (its CIF cell may span many lines)
                values = next(reader, None)
                if values is None:
                    break
                if not values:  # a blank line holds no row
                    continue
                row = {name: values[i] if i < len(values) else "" for i, name in enumerate(header)}
                records.cifs.append(row.pop("cif"))
                records.sources.append(f"line {line}")
                records.metadata.append({key or "index": value for key, value in row.items()})
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"{path}: not a readable CSV text file ({error})") from None
    return records


def _content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(path.glob("*.cif")) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode() if path.is_dir() else b"")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def parse_records(records: RawRecords, options: PreprocessOptions, workers: int | None = None,
                  show_progress: bool = True) -> list[ParsedCrystal | str]:
    """Parse every CIF, in parallel processes when there are many."""
    workers = workers or min(os.cpu_count() or 1, 8)
    texts = records.cifs
    if workers <= 1 or len(texts) < 200:
        return _parse_chunk(texts, options)
    chunk = max(16, math.ceil(len(texts) / (workers * 8)))
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    results: list[ParsedCrystal | str] = []
    with ProcessPoolExecutor(workers) as pool:
        progress = tqdm(total=len(texts), desc="parsing CIFs", unit="crystal", disable=not show_progress)
        for parsed in pool.map(_parse_chunk, chunks, [options] * len(chunks)):
            results.extend(parsed)
            progress.update(len(parsed))
        progress.close()
    return results


class CrystalDataset(torch.utils.data.Dataset):
    """Crystals as flat tensors; item i is a PyG Data with atom_types, frac_coords, lengths, angles."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: list[dict[str, str]], report: DataReport):
        self.atom_types = tensors["atom_types"]  # (total_atoms,)
        self.frac_coords = tensors["frac_coords"]  # (total_atoms, 3)
        self.lengths = tensors["lengths"]  # (M, 3) Angstrom
        self.angles = tensors["angles"]  # (M, 3) degrees
        self.num_atoms = tensors["num_atoms"]  # (M,)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.num_atoms.cumsum(0)])
        self.metadata = metadata
        self.report = report

    def __len__(self) -> int:
        return self.num_atoms.shape[0]

    def __getitem__(self, index: int) -> Data:
        from torch_geometric.data import Data  # here, not at the top: importing PyG costs 2-3 s (segments.py)

        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return Data(atom_types=self.atom_types[start:stop], frac_coords=self.frac_coords[start:stop],
                    lengths=self.lengths[index:index + 1], angles=self.angles[index:index + 1],
                    num_atoms=stop - start, num_nodes=stop - start, crystal_id=index)

    @property
    def max_atoms(self) -> int:
        return int(self.num_atoms.max())

    def content_key(self) -> str:
        """A digest of the crystals themselves (not of the file they came from)."""
        return cache_key(self.atom_types, self.frac_coords, self.lengths, self.angles, self.num_atoms)

    def subset(self, indices: list[int]) -> CrystalDataset:
        items = [self[i] for i in indices]
        return CrystalDataset(stack_crystals(items), [self.metadata[i] for i in indices], self.report)


def random_crystals(num_atoms: list[int], seed: int = 0) -> CrystalDataset:
    """Crystals of these sizes with random elements, coordinates and plausible cells: for benchmarks and tests,
    where a step's cost and a path's numbers depend on the sizes alone (no CIF, no pymatgen)."""
    generator = torch.Generator().manual_seed(seed)
    count, total = len(num_atoms), sum(num_atoms)
    tensors = {
        "atom_types": torch.randint(1, 84, (total,), generator=generator),
        "frac_coords": torch.rand(total, 3, generator=generator),
        "lengths": 3 + 5 * torch.rand(count, 3, generator=generator),
        "angles": 70 + 40 * torch.rand(count, 3, generator=generator),
        "num_atoms": torch.tensor(num_atoms, dtype=torch.long),
    }
    return CrystalDataset(tensors, [{} for _ in range(count)], DataReport("random crystals", count))


def stack_crystals(items: list[Data]) -> dict[str, torch.Tensor]:
    return {
        "atom_types": torch.cat([item.atom_types for item in items]),
        "frac_coords": torch.cat([item.frac_coords for item in items]),
        "lengths": torch.cat([item.lengths for item in items]),
        "angles": torch.cat([item.angles for item in items]),
        "num_atoms": torch.tensor([item.atom_types.shape[0] for item in items], dtype=torch.long),
    }


def resolve_path(path: str | Path) -> Path:
    """A user path, or `bundled:NAME[/FILE]` for the sample shipped with the package."""
    text = str(path)
    if text.startswith(BUNDLED_PREFIX):
        return Path(str(resources.files("equicsp") / "sample_data" / text[len(BUNDLED_PREFIX):]))
    return Path(text).expanduser()


def load_crystals(path: str | Path, options: PreprocessOptions = PreprocessOptions(), use_cache: bool = True,
                  workers: int | None = None, show_progress: bool = True) -> CrystalDataset:
    """A CSV file or CIF folder -> CrystalDataset, from the cache when this content was seen before."""
    resolved = resolve_path(path)
    if not resolved.exists():
        raise DatasetError(f"{path}: no such file or folder")
    key = cache_key("crystals", PREPROCESS_VERSION, _content_hash(resolved), asdict(options))
    cached = cache_dir() / "crystals" / f"{key}.pt"
    if use_cache:
        dataset = load_cached(cached, lambda stored: _dataset_from_cache(stored, str(path)))
        if dataset is not None:
            return dataset

    records = read_records(resolved)
    if show_progress:  # pymatgen parses a few hundred crystals a second: minutes for MP-20
        print(f"reading {path}: {len(records.cifs):,} crystals to parse (cached for the next run)...",
              file=sys.stderr, flush=True)
    parsed = parse_records(records, options, workers, show_progress)
    report = DataReport(str(path), len(parsed))
    kept: list[ParsedCrystal] = []
    metadata: list[dict[str, str]] = []
    for row, (result, source, meta) in enumerate(zip(parsed, records.sources, records.metadata)):
        if not records.cifs[row].strip():
            result = records.empty_reason
        if isinstance(result, str):
            report.skipped.append(SkippedRow(row, source, result))
        else:
            kept.append(result)
            metadata.append({**meta, "source": source})
    if not kept:
        detail = f" (first reason: {report.skipped[0].source}: {report.skipped[0].reason})" if report.skipped else ""
        raise DatasetError(f"{path}: no usable crystal in {report.total} rows{detail}")
    tensors = {
        "atom_types": torch.tensor([z for c in kept for z in c.atom_types], dtype=torch.long),
        "frac_coords": torch.tensor([x for c in kept for x in c.frac_coords], dtype=torch.float32),
        "lengths": torch.tensor([c.lengths for c in kept], dtype=torch.float32),
        "angles": torch.tensor([c.angles for c in kept], dtype=torch.float32),
        "num_atoms": torch.tensor([len(c.atom_types) for c in kept], dtype=torch.long),
    }
    if use_cache:
        store_cached({"tensors": tensors, "metadata": metadata, "total": report.total,
                         "skipped": [[s.row, s.source, s.reason] for s in report.skipped]}, cached)
    return CrystalDataset(tensors, metadata, report)


def _dataset_from_cache(stored: dict, path: str) -> CrystalDataset:
    tensors = stored["tensors"]
    missing = {"atom_types", "frac_coords", "lengths", "angles", "num_atoms"} - set(tensors)
    if missing:
        raise KeyError(f"no {', '.join(sorted(missing))} tensors")
    report = DataReport(path, int(stored["total"]), [SkippedRow(*s) for s in stored["skipped"]])
    return CrystalDataset(tensors, list(stored["metadata"]), report)
