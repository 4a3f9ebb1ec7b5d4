"""A training run's output folder (`train --out`): one writer at a time, no leftovers, one run per folder.

A run continues in a folder only when the folder's run had the same config (up to
`RESUMABLE_FIELDS` below) and the same data: its last.pt carries the content keys of the
training and validation crystals. Every check here runs before anything in the folder is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from equicsp.config import RENAMED_FIELDS, Config, ConfigError, flatten
from equicsp.data.cache import remove_orphaned_temporaries
from equicsp.data.outputs import check_writable
from equicsp.engine.checkpoint import read_checkpoint

# What a resumed run may change: how long it trains, how often it checkpoints and logs, where it
# runs and whether its steps are compiled, and the sampler (used after training only). Anything
# else would continue another run.
RESUMABLE_FIELDS = ("optim.epochs", "run.checkpoint_every", "run.log_every", "run.device", "run.compile",
                    "sampler.step_lr", "sampler.num_steps", "sampler.batch_size", "sampler.clip_lattice",
                    "sampler.clip_types")


def resume_differences(stored: dict[str, Any], config: Config) -> list[str]:
    """"name old -> new" for each field of config that a run stored with these flat values may not change.

    stored is `Config.flat()` of the stored run, or its MLflow params (the same values as strings).
    """
    differences = []
    defaults = Config().flat()  # a field added since the run was stored had its default then
    for name, value in config.flat().items():
        if name in RESUMABLE_FIELDS:
            continue
        renamed = {RENAMED_FIELDS.get(key, key): value for key, value in stored.items()}
        old = renamed.get(name, defaults.get(name, "<absent>"))
        if str(old) != str(value):
            differences.append(f"{name} {old} -> {value}")
    return differences

LOCK_NAME = ".equicsp.lock"
# What a --local run may do with a folder holding another run; Ray mode has no --no-resume.
LOCAL_REMEDY = "train into another --out, or pass --no-resume to start this config from epoch 0 there (overwriting that run)"
OTHER_OUT = "train into another --out"


class RunFolderBusy(RuntimeError):
    """Another process trains into the same folder."""


@contextmanager
def claimed_run_folder(folder: Path) -> Iterator[Path]:
    """The folder, made and checked writable, held for this process alone, and cleared of the temporary files a
    killed writer left; a RunFolderBusy when another process holds it, an OSError when it cannot be written."""
    folder = check_writable(Path(folder))
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderBusy(f"{folder} is in use by another training process; wait for it to finish, "
                            "or train into another --out") from None
    try:
        remove_orphaned_temporaries(folder)
        yield folder
    finally:
        lock.release()


def check_resumable(config: Config, out_dir: Path, remedy: str = LOCAL_REMEDY) -> None:
    """A ConfigError when out_dir holds a run (last.pt, else config.yaml) of another config."""
    found = _stored_config(Path(out_dir))
    if found is None:
        return
    source, stored = found
    differences = resume_differences(flatten(stored), config)
    if differences:
        raise ConfigError(f"{source} belongs to a run with another config ({'; '.join(differences)}); {remedy}")


def _stored_config(out_dir: Path) -> tuple[Path, dict] | None:
    last, saved = out_dir / "last.pt", out_dir / "config.yaml"
    if last.exists():
        return last, read_checkpoint(last)["config"]
    if not saved.is_file():
        return None
    try:
        stored = yaml.safe_load(saved.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{saved}: not a readable config; remove it or train into another --out") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"{saved}: not a config; remove it or train into another --out")
    return saved, stored


def check_same_data(out_dir: Path, data_keys: dict[str, str], remedy: str = LOCAL_REMEDY) -> None:
    """A ConfigError when out_dir/last.pt was trained on other crystals than data_keys describe."""
    last = Path(out_dir) / "last.pt"
    if last.exists():
        refuse_other_data(str(last), read_checkpoint(last).get("data_keys"), data_keys, remedy)


def refuse_other_data(source: str, stored: dict[str, str] | None, data_keys: dict[str, str], remedy: str) -> None:
    """A ConfigError naming the splits whose content differs; a run stored before content keys were kept passes."""
    if not stored:
        return
    changed = [split for split, key in data_keys.items() if split in stored and stored[split] != key]
    if changed:
        raise ConfigError(f"{source} was trained on other data (the {' and '.join(changed)} crystals changed since); "
                          f"{remedy}")


def kept_epoch(out_dir: Path) -> int | None:
    """The epoch that out_dir/last.pt holds, or None when there is none (or it cannot be read)."""
    try:
        return int(read_checkpoint(Path(out_dir) / "last.pt")["epoch"])
    except (ValueError, KeyError):
        return None
