"""Cache files and output folders: a failed write leaves nothing behind and names the file; the cache is optional."""

import errno
import warnings
from pathlib import Path

import pytest
import torch
from filesystems import full_disk, read_only_disk

from equicsp.data.cache import remove_orphaned_temporaries, save_atomically
from equicsp.data.outputs import check_writable


def test_a_full_disk_leaves_no_temporary_file_and_says_so(tmp_path):
    with full_disk(tmp_path / "disk") as disk:
        target = disk / "tables.pt"
        with pytest.raises(OSError, match=f"^no space left on {disk} \\(writing tables.pt\\)$"):
            save_atomically({"x": torch.zeros(100_000)}, target)
        assert list(disk.iterdir()) == []


def test_a_full_disk_is_named_without_a_real_one(tmp_path, monkeypatch):
    def full(self, data):
        with open(self, "wb") as handle:
            handle.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match=f"no space left on {tmp_path / 'cache'} \\(writing model.pt\\)"):
        save_atomically({"x": 1}, tmp_path / "cache" / "model.pt")
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_temporary_files_of_a_killed_writer_are_found_and_nothing_else(tmp_path):
    for name in ("last.pt.123.tmp", "config.yaml.9.tmp", "notes.tmp", "last.pt"):
        (tmp_path / name).write_text("")
    removed = remove_orphaned_temporaries(tmp_path)
    assert sorted(path.name for path in removed) == ["config.yaml.9.tmp", "last.pt.123.tmp"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


def test_an_output_folder_that_cannot_be_made_is_a_sentence(tmp_path):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(OSError, match="cannot write to output folder .*file.txt/sub: Not a directory"):
        check_writable(tmp_path / "file.txt" / "sub")
    with pytest.raises(OSError, match="file.txt is a file, not a folder"):
        check_writable(tmp_path / "file.txt")
    made = check_writable(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []


def test_a_flipped_bit_in_a_cache_file_is_caught_by_its_checksum_and_the_file_rebuilt(tiny_csv, tmp_path, monkeypatch):
    from equicsp.data.crystals import load_crystals

    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path / "cache"))
    original = load_crystals(tiny_csv, show_progress=False)
    [cached] = (tmp_path / "cache" / "crystals").iterdir()
    content = bytearray(cached.read_bytes())
    content[-200] ^= 0x01  # inside the payload: torch would load it with one number changed
    cached.write_bytes(bytes(content))
    with pytest.warns(UserWarning, match=f"cache file {cached} is unreadable .*checksum mismatch.*rebuilding it"):
        again = load_crystals(tiny_csv, show_progress=False)
    assert again.content_key() == original.content_key()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_crystals(tiny_csv, show_progress=False).content_key() == original.content_key()  # rewritten


def test_a_full_or_read_only_cache_warns_once_and_the_work_goes_on(tiny_csv, tmp_path, monkeypatch):
    import equicsp.data.cache as cache
    from equicsp.data.crystals import load_crystals
    from equicsp.model.von_mises import load_or_build_tables

    expected = load_crystals(tiny_csv, use_cache=False, show_progress=False).content_key()
    for name, disk in (("full", full_disk(tmp_path / "full", "4k")), ("read-only", read_only_disk(tmp_path / "ro"))):
        with disk as folder:
            monkeypatch.setattr(cache, "_warned", set())
            monkeypatch.setenv("EQUICSP_CACHE_DIR", str(folder / "equicsp"))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cache.check_cache_writable()
                assert load_crystals(tiny_csv, show_progress=False).content_key() == expected, name
                tables = load_or_build_tables(4, torch.linspace(0.01, 1.0, 5), num_samples=100)
            assert tables.kappa.shape == (5, 6), name
            messages = [str(warning.message) for warning in caught]
            assert len(messages) == 1 and "carrying on without caching" in messages[0], (name, messages)
