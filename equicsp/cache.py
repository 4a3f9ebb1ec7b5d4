"""The on-disk cache shared by preprocessed datasets and von Mises tables."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


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


def save_atomically(obj: object, path: Path) -> None:
    """torch.save to a temporary name, then rename, so a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def write_text_atomically(text: str, path: Path) -> None:
    """Write text to a temporary name, then rename; the temporary file is removed if writing fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
