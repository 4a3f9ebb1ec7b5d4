"""Folders that fail like real disks: a tiny tmpfs that fills up, and a read-only one (root only: mount)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on folder with these mount options; the test is skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip() or 'not root'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def full_disk(folder: Path, size: str = "64k") -> AbstractContextManager[Path]:
    """A folder on a tmpfs of this size: writing more than that fails with ENOSPC, as a full disk does."""
    return mounted_tmpfs(folder, f"size={size}")


def read_only_disk(folder: Path) -> AbstractContextManager[Path]:
    """A folder on a read-only tmpfs (a permission bit would not stop root)."""
    return mounted_tmpfs(folder, "ro,size=64k")
