"""Files on disk: the cache shared by preprocessed datasets and von Mises tables, atomic saves, output folders.

The cache is an optimisation: a cache folder that cannot be written (full, read-only) is
reported once and the command carries on without it, and a cache file is stored with a
checksum of its payload, so a damaged one (a flipped bit, a truncated write) is rebuilt
rather than loaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from equicsp.data.outputs import check_writable

T = TypeVar("T")

# A cache file: this marker, the SHA-256 of the payload, then the payload (torch.save's bytes).
CACHE_MAGIC = b"equicsp-cache-v2\n"
_DIGEST_SIZE = hashlib.sha256().digest_size
_warned: set[str] = set()


def cache_dir() -> Path:
    """$EQUICSP_CACHE_DIR, else ~/.cache/equicsp (created when it can be; see check_cache_writable)."""
    path = _cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _warn_cache_unwritable(error)
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("EQUICSP_CACHE_DIR") or Path.home() / ".cache" / "equicsp")


def check_cache_writable() -> None:
    """Warn once, before a command's work, when the cache folder cannot be written: the work goes on uncached."""
    try:
        check_writable(_cache_root(), "cache folder")
    except OSError as error:
        _warn_cache_unwritable(error)


def _warn_cache_unwritable(error: OSError) -> None:
    """One warning per cache folder and process, however many files fail to be written."""
    root = _cache_root()
    if str(root) in _warned:
        return
    _warned.add(str(root))
    warnings.warn(f"the cache folder {root} cannot be written ({error.strerror or error}); carrying on without caching "
                  "(set $EQUICSP_CACHE_DIR to a writable folder to keep preprocessed data between runs)", stacklevel=3)


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

    A file that cannot be read back (truncated by a full disk or a killed process, changed
    on disk so that its checksum no longer matches, or of another layout) is reported by
    name, removed and answered with None, so that the caller rebuilds it instead of failing
    on it forever.
    """
    if not path.exists():
        return None
    try:
        return read(torch.load(io.BytesIO(_checked_payload(path.read_bytes())), weights_only=True))
    except Exception as error:  # torch.load and read raise many types for a damaged file
        reason = weights_only_refusal(error) or f"{type(error).__name__}: {error}"
        warnings.warn(f"cache file {path} is unreadable ({reason}); rebuilding it", stacklevel=2)
        with contextlib.suppress(OSError):  # a read-only cache: the rebuilt data is used without being stored
            path.unlink(missing_ok=True)
        return None


def weights_only_refusal(error: Exception) -> str | None:
    """Why torch's weights-only loader refused a file, without torch's advice to load it unrestricted (which
    would run whatever code the file names); None for any other error."""
    message = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "weights only load failed" not in message.lower():
        return None
    found = re.search(r"GLOBAL ([\w.]+)", message)
    named = f"the Python object {found.group(1)}" if found else "Python objects"
    return f"it refers to {named}, which a file of plain tensors never holds and which loading could run as code"


def _checked_payload(content: bytes) -> bytes:
    """The payload of a cache file, after checking its marker and checksum."""
    if not content.startswith(CACHE_MAGIC):
        raise ValueError("not an equicsp cache file of this version")
    digest = content[len(CACHE_MAGIC):len(CACHE_MAGIC) + _DIGEST_SIZE]
    payload = content[len(CACHE_MAGIC) + _DIGEST_SIZE:]
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("checksum mismatch: the file changed on disk after it was written")
    return payload


def store_cached(obj: object, path: Path) -> None:
    """Save obj as a cache file with its checksum; a cache that cannot be written is warned about once, not an error."""
    payload = _torch_bytes(obj)
    _store_in_cache(path, lambda temporary: temporary.write_bytes(
        CACHE_MAGIC + hashlib.sha256(payload).digest() + payload))


def store_cached_text(text: str, path: Path) -> None:
    """Write a text cache file, warning once (not failing) when the cache cannot be written."""
    _store_in_cache(path, lambda temporary: temporary.write_text(text))


def _store_in_cache(path: Path, write: Callable[[Path], object]) -> None:
    try:
        _write_atomically(path, write)
    except OSError as error:
        _warn_cache_unwritable(error)


def save_atomically(obj: object, path: Path) -> None:
    """torch.save to a temporary name, then rename, so a concurrent reader never sees half a file."""
    payload = _torch_bytes(obj)
    _write_atomically(path, lambda temporary: temporary.write_bytes(payload))


def _torch_bytes(obj: object) -> bytes:
    # Serialised in memory first: a failed file write is then an OSError with its errno (a full disk says
    # so), where torch's own file writer reports any failure as "unexpected pos" or "file write failed".
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_text_atomically(text: str, path: Path) -> None:
    """Write text to a temporary name, then rename, like save_atomically."""
    _write_atomically(path, lambda temporary: temporary.write_text(text))


def copy_atomically(source: Path, path: Path) -> None:
    """Copy source to path through a temporary name, like save_atomically."""
    _write_atomically(path, lambda temporary: temporary.write_bytes(Path(source).read_bytes()))


# What _write_atomically names its temporary files: "<name>.<pid>.tmp".
TEMPORARY_NAME = re.compile(r".+\.\d+\.tmp$")


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """write(temporary), then rename it to path.

    When the write fails (a full disk, say) the temporary file is removed, not left to keep
    the disk full, and the error is one sentence naming the file that could not be written.
    """
    temporary = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # the folder itself refuses writes: there is no temporary file to remove
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(describe_write_error(path, error)) from error
        raise


def describe_write_error(path: Path, error: OSError) -> str:
    """One sentence for a failed write of path: a full disk is named as such."""
    if error.errno == errno.ENOSPC:
        return f"no space left on {path.parent} (writing {path.name})"
    return f"cannot write {path}: {error.strerror or error}"


def remove_orphaned_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files that a killed writer left in folder (call with the folder locked); returns them."""
    removed = []
    for candidate in Path(folder).glob("*.tmp"):
        if candidate.is_file() and TEMPORARY_NAME.match(candidate.name):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed
