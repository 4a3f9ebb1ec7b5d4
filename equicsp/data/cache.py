"""Files on disk: the cache shared by preprocessed datasets and von Mises tables, atomic saves, output folders."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def cache_dir() -> Path:
    """$EQUICSP_CACHE_DIR, else ~/.cache/equicsp."""
    root = os.environ.get("EQUICSP_CACHE_DIR") or Path.home() / ".cache" / "equicsp"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(*parts: object) -> str:
    """A short stable hash of JSON-able parts, bytes and tensors."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def load_cached(path: Path, read: Callable[[Any], T]) -> T | None:
    """read(what the cache file holds), or None when there is no such file.

    A file that cannot be read back (truncated by a full disk or a killed process, or of
    another layout) is reported by name, removed and answered with None, so that the caller
    rebuilds it instead of failing on it forever.
    """
    if not path.exists():
        return None
    try:
        return read(torch.load(path, weights_only=True))
    except Exception as error:  # torch.load and read raise many types for a damaged file
        warnings.warn(f"cache file {path} is unreadable ({type(error).__name__}: {error}); rebuilding it",
                      stacklevel=2)
        path.unlink(missing_ok=True)
        return None


def save_atomically(obj: object, path: Path) -> None:
    """torch.save to a temporary name, then rename, so a concurrent reader never sees half a file."""
    _write_atomically(path, lambda temporary: torch.save(obj, temporary))


def write_text_atomically(text: str, path: Path) -> None:
    """Write text to a temporary name, then rename, like save_atomically."""
    _write_atomically(path, lambda temporary: temporary.write_text(text))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary), then rename it to path.

    When the write fails (a full disk, say) the temporary file is removed, not left to keep
    the disk full, and the error names the file that could not be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)):  # torch's file writer reports a failed write as RuntimeError
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise OSError(f"cannot write {path}: {reason}") from error
        raise


def check_writable_folder(folder: Path, what: str = "output folder") -> Path:
    """Create folder (with its parents) and write a probe file in it, so that a command fails before its work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OSError(f"cannot write to {what} {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".equicsp-probe-"):
            pass
    except OSError as error:
        raise OSError(f"cannot write to {what} {folder}: {error.strerror or error}") from None
    return folder
