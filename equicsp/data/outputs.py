"""A command's output folder, written as a whole: checked and locked before the work, filled in a hidden
sibling folder and renamed into place at the end.

So a folder never mixes two runs' files (an earlier generation's CIFs beside a new summary), an
interrupted command leaves the folder as it was, a non-empty folder is replaced only when asked
(`--force`), and two commands writing the same folder at once are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

PROBE_BYTES = 1 << 20  # a folder that cannot take this much is full for any report we write


def output_path(text: str) -> Path:
    """An argparse type for --out: an empty string would mean the working folder, which nobody asks for."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not an output folder")
    return Path(text).expanduser()


def check_writable(folder: Path, what: str = "output folder") -> Path:
    """Create folder (with its parents) and write a PROBE_BYTES file in it: a read-only, full or non-folder path
    fails here, before the work, with one sentence."""
    reason = unwritable_reason(Path(folder))
    if reason:
        raise OSError(f"cannot write to {what} {folder}: {reason}")
    return Path(folder)


def unwritable_reason(folder: Path) -> str | None:
    """Why folder (created with its parents) cannot take a PROBE_BYTES file, or None when it can."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    probe = folder / f".equicsp-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(bytes(PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        return _reason(error, folder)
    finally:
        with contextlib.suppress(OSError):  # a folder we could not write in holds no probe either
            probe.unlink(missing_ok=True)
    return None


def _reason(error: OSError, where: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on {where}"
    return error.strerror or str(error)


class OutputFolder:
    """`with OutputFolder(path, force) as out:` checks and locks path; `with out.writing() as folder:` yields a
    hidden sibling folder to fill, which replaces path once the block ends without an exception."""

    def __init__(self, path: Path, force: bool = False, what: str = "output folder"):
        self.path, self.force, self.what = Path(path), force, what
        self._lock = FileLock(str(self.path.parent / f".{self.path.name}.lock"), timeout=0)

    def __enter__(self) -> OutputFolder:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> OutputFolder:
        """Refuse a file, a non-empty folder without force, an unwritable or full place, or a folder that another
        command is writing; then hold the lock until close()."""
        if self.path.exists() and not self.path.is_dir():
            raise OSError(f"cannot write to {self.what} {self.path}: it is a file, not a folder")
        entries = sorted(self.path.iterdir()) if self.path.is_dir() else []
        if entries and not self.force:
            raise OSError(f"{self.what} {self.path} already holds {len(entries)} file(s) of an earlier run "
                          f"(e.g. {entries[0].name}); pass --force to replace them, or choose another folder")
        reason = unwritable_reason(self.path.parent)  # where the new folder is made and renamed into place
        if reason:
            raise OSError(f"cannot write to {self.what} {self.path}: {reason}")
        try:
            self._lock.acquire()
        except Timeout:
            raise OSError(f"another command is writing to {self.what} {self.path} (it holds {self._lock.lock_file}); "
                          "wait for it to finish or choose another folder") from None
        self._remove_leftovers()
        return self

    def close(self) -> None:
        self._lock.release()

    def _remove_leftovers(self) -> None:
        """Hidden siblings that a killed command left (we hold the lock: nobody else is writing them)."""
        for pattern in (f".{self.path.name}.partial-*", f".{self.path.name}.old-*"):
            for leftover in self.path.parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """A fresh hidden sibling folder; it replaces path at the end, and is removed when the block fails."""
        partial = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            yield partial
        except BaseException:  # a Ctrl-C too: the folder keeps its earlier contents, never half of the new ones
            shutil.rmtree(partial, ignore_errors=True)
            raise
        self._replace_with(partial)

    def _replace_with(self, partial: Path) -> None:
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        try:
            if self.path.is_dir() and any(self.path.iterdir()):
                os.replace(self.path, old)
            os.replace(partial, self.path)
        except OSError as error:
            kept = _keep_visible(partial, self.path)
            raise OSError(f"cannot write to {self.what} {self.path}: {_reason(error, self.path)}; "
                          f"the results are in {kept}") from None
        shutil.rmtree(old, ignore_errors=True)

    def moved(self, files: dict[str, Path], partial: Path) -> dict[str, Path]:
        """Where files written under partial are once writing() has put them in place."""
        return {name: self.path / path.relative_to(partial) for name, path in files.items()}


def _keep_visible(partial: Path, path: Path) -> Path:
    """The finished results, renamed beside path under a name a user sees (a hidden one is cleaned up later)."""
    visible = path.parent / f"{path.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        os.replace(partial, visible)
        return visible
    except OSError:
        return partial


def interrupted(what_happened: str) -> SystemExit:
    """A Ctrl-C as one sentence and the shell's usual status for it (128 + SIGINT), not a traceback."""
    print(f"interrupted: {what_happened}", file=sys.stderr)
    return SystemExit(130)
