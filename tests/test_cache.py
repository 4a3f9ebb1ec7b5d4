"""Cache files and output folders: a failed write leaves nothing behind and names the file."""

import errno

import pytest
import torch

from equicsp.data.cache import check_writable_folder, save_atomically


def test_a_full_disk_leaves_no_temporary_file_and_names_the_target(tmp_path, monkeypatch):
    def full_disk(obj, path):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "cache" / "tables.pt"
    with pytest.raises(OSError, match=f"cannot write {target}: No space left on device"):
        save_atomically({"x": 1}, target)
    assert list((tmp_path / "cache").iterdir()) == []


def test_torchs_writer_failing_is_reported_the_same_way(tmp_path, monkeypatch):
    def failing_writer(obj, path):
        open(path, "wb").close()
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing_writer)
    with pytest.raises(OSError, match="cannot write .*model.pt: PytorchStreamWriter failed"):
        save_atomically({"x": 1}, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_made_is_a_sentence(tmp_path):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(OSError, match="cannot write to output folder .*file.txt/sub: Not a directory"):
        check_writable_folder(tmp_path / "file.txt" / "sub")
    with pytest.raises(OSError, match="it is a file, not a folder"):
        check_writable_folder(tmp_path / "file.txt")
    made = check_writable_folder(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []
