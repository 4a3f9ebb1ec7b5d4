"""Output folders written as a whole: never two runs' files side by side, never half a run's, one writer at a time."""

import argparse
import os
import subprocess
import sys

import pytest
from filesystems import full_disk, read_only_disk

from equicsp.data.outputs import OutputFolder, output_path


def test_a_folder_holds_one_run_whole_or_its_earlier_contents(tmp_path):
    out = tmp_path / "out"
    with OutputFolder(out) as folder, folder.writing() as partial:
        for name in ("a.cif", "b.cif", "c.cif"):
            (partial / name).write_text(name)
        assert not out.exists(), "nothing is visible before the end"
    assert sorted(p.name for p in out.iterdir()) == ["a.cif", "b.cif", "c.cif"]
    with pytest.raises(OSError, match=f"output folder {out} already holds 3 file.*pass --force"):
        OutputFolder(out).open()
    # Interrupted halfway: the earlier run is kept whole, the half-written one leaves nothing behind.
    with OutputFolder(out, force=True) as folder, pytest.raises(KeyboardInterrupt), folder.writing() as partial:
        (partial / "a.cif").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["a.cif", "b.cif", "c.cif"] and (out / "a.cif").read_text() == "a.cif"
    # Replaced with force: only the new run's files, no hidden leftovers beside it.
    with OutputFolder(out, force=True) as folder, folder.writing() as partial:
        (partial / "d.cif").write_text("d")
        files = folder.moved({"d": partial / "d.cif"}, partial)
    assert [p.name for p in out.iterdir()] == ["d.cif"] and files == {"d": out / "d.cif"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_a_killed_writers_leftovers_are_removed_and_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.partial-99999").mkdir()
    (tmp_path / ".out.partial-99999" / "x.cif").write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from equicsp.data.outputs import OutputFolder; "
                               f"held = OutputFolder({str(out)!r}).open(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not (tmp_path / ".out.partial-99999").exists()
        with pytest.raises(OSError, match=f"another command is writing to output folder {out}"):
            OutputFolder(out).open()
    finally:
        holder.kill()
        holder.wait()
    OutputFolder(out).open().close()  # free again once the writer is gone


def test_unusable_places_are_refused_before_any_work(tmp_path):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(OSError, match="cannot write to output folder .*file.txt: it is a file, not a folder"):
        OutputFolder(tmp_path / "file.txt").open()
    with pytest.raises(OSError, match="file.txt/sub: .*file.txt is a file, not a folder"):
        OutputFolder(tmp_path / "file.txt" / "sub").open()
    with pytest.raises(argparse.ArgumentTypeError, match="empty path"):
        output_path("")
    with read_only_disk(tmp_path / "ro") as ro, pytest.raises(OSError, match="ro/out: Read-only file system"):
        OutputFolder(ro / "out").open()
    with full_disk(tmp_path / "full", "512k") as full, pytest.raises(OSError, match="no space left on"):
        OutputFolder(full / "out").open()
