import csv
import json

import pytest
import torch

from equicsp.cli.data import main as data_main
from equicsp.data.crystals import DatasetError, PreprocessOptions, load_crystals
from equicsp.data.splits import split_csv


def rows_of(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def write_rows(path, fieldnames, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def test_reads_a_cdvae_csv_into_niggli_reduced_tensors(tiny_dataset):
    assert len(tiny_dataset) == 8 and tiny_dataset.report.kept == 8
    item = tiny_dataset[0]
    assert item.atom_types.shape == (5,) and item.frac_coords.shape == (5, 3)
    assert ((item.frac_coords >= 0) & (item.frac_coords < 1)).all()
    assert item.lengths.shape == (1, 3) and item.angles.shape == (1, 3)
    assert "material_id" in tiny_dataset.metadata[0] and "cif" not in tiny_dataset.metadata[0]


def with_unknown_element(cif: str) -> str:
    """The CIF with its first site's element replaced by the symbol Xx."""
    lines = cif.splitlines()
    first_site = next(i for i, line in enumerate(lines) if line.strip().endswith(" 1") and len(line.split()) == 7)
    parts = lines[first_site].split()
    lines[first_site] = "  " + " ".join(["Xx", "Xx0"] + parts[2:])
    return "\n".join(lines) + "\n"


def test_bad_rows_are_skipped_and_reported_with_row_and_reason(tiny_csv, tmp_path):
    fieldnames, rows = rows_of(tiny_csv)
    malformed, unknown, empty = dict(rows[0]), dict(rows[1]), dict(rows[2])
    malformed["cif"] = "this is not a CIF"
    unknown["cif"] = with_unknown_element(rows[1]["cif"])
    empty["cif"] = ""
    path = tmp_path / "mixed.csv"
    write_rows(path, fieldnames, [rows[0], malformed, rows[1], unknown, empty, rows[2]])
    dataset = load_crystals(path, show_progress=False)
    assert len(dataset) == 3
    skipped = {s.row: s.reason for s in dataset.report.skipped}
    assert set(skipped) == {1, 3, 4}
    assert skipped[1].startswith("unparsable CIF") and skipped[4] == "empty cif cell"
    assert "Xx" in skipped[3]
    assert "3 of 6 crystals usable" in dataset.report.summary()
    # Sources are the file's own line numbers: where each row's (multi-line) record starts.
    lines = path.read_text().splitlines()
    for row in dataset.report.skipped:
        number = int(row.source.removeprefix("line "))
        assert lines[number - 1].startswith(rows_of(path)[1][row.row][fieldnames[0]] + ",")
    assert json.loads(dataset.report.to_json())["skipped"][0]["source"] == f"line {3 + rows[0]['cif'].count(chr(10))}"
    only_bad = tmp_path / "only_bad.csv"
    write_rows(only_bad, fieldnames, [malformed, unknown, empty])
    with pytest.raises(DatasetError, match="no usable crystal in 3 rows"):
        load_crystals(only_bad, show_progress=False)


def test_too_large_crystals_are_reported_not_failed(tiny_csv):
    with pytest.raises(DatasetError, match="too large"):
        load_crystals(tiny_csv, PreprocessOptions(max_atoms=4), show_progress=False)


def test_cache_is_keyed_by_content_and_options(tiny_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path / "cache"))
    first = load_crystals(tiny_csv, show_progress=False)
    assert len(list((tmp_path / "cache" / "crystals").glob("*.pt"))) == 1
    again = load_crystals(tiny_csv, show_progress=False)
    torch.testing.assert_close(again.frac_coords, first.frac_coords)
    load_crystals(tiny_csv, PreprocessOptions(niggli=False), show_progress=False)
    assert len(list((tmp_path / "cache" / "crystals").glob("*.pt"))) == 2


def test_reads_a_folder_of_cif_files(tiny_csv, tmp_path, tiny_dataset):
    _, rows = rows_of(tiny_csv)
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i, row in enumerate(rows):
        (folder / f"{i:02d}.cif").write_text(row["cif"])
    (folder / "broken.cif").write_text("data_x\n_cell_length_a 3\n")
    dataset = load_crystals(folder, show_progress=False)
    assert len(dataset) == 8
    assert [s.source for s in dataset.report.skipped] == ["broken.cif"]
    torch.testing.assert_close(dataset.lengths, tiny_dataset.lengths)


def test_missing_path_and_missing_column_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_crystals(tmp_path / "nope.csv")
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="no 'cif' column"):
        load_crystals(tmp_path / "x.csv")


def test_split_cli_shuffles_into_three_files(tiny_csv, tmp_path, capsys):
    data_main(["split", str(tiny_csv), "--out", str(tmp_path / "split"), "--fractions", "0.5", "0.25", "0.25"])
    assert "train: 4, val: 2, test: 2" in capsys.readouterr().out
    counts = {name: len(rows_of(tmp_path / "split" / f"{name}.csv")[1]) for name in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 2, "test": 2}
    assert split_csv(tiny_csv, tmp_path / "again", seed=0) == split_csv(tiny_csv, tmp_path / "again2", seed=0)


def test_a_binary_file_is_named_not_a_traceback(tmp_path):
    for name, content in (("nul.csv", b"cif,a\n\x00\x01\x02,3\n"), ("latin.csv", b"cif\n\xff\xfe\xfa\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DatasetError, match=f"{name}: not a readable CSV text file"):
            load_crystals(tmp_path / name, show_progress=False)
        with pytest.raises(SystemExit, match=f"error: .*{name}: not a readable CSV"):
            data_main(["split", str(tmp_path / name), "--out", str(tmp_path / "out")])


def test_check_report_into_a_missing_folder_is_a_sentence(tiny_csv, tmp_path):
    with pytest.raises(SystemExit, match="error: cannot write the report .* no folder"):
        data_main(["check", str(tiny_csv), "--report", str(tmp_path / "missing" / "report.json")])


def test_a_corrupted_cache_file_is_named_removed_and_rebuilt(tiny_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path / "cache"))
    first = load_crystals(tiny_csv, show_progress=False)
    [cached] = (tmp_path / "cache" / "crystals").glob("*.pt")
    cached.write_bytes(cached.read_bytes()[:100])  # a write cut short
    with pytest.warns(UserWarning, match=f"cache file {cached} is unreadable.*rebuilding"):
        again = load_crystals(tiny_csv, show_progress=False)
    torch.testing.assert_close(again.frac_coords, first.frac_coords)
    torch.save({"something": "else"}, cached)  # readable, but not a dataset
    with pytest.warns(UserWarning, match="unreadable"):
        load_crystals(tiny_csv, show_progress=False)
    from equicsp.data.cache import load_cached

    assert load_cached(cached, dict).keys() >= {"tensors", "metadata"}  # rewritten, checksum and all


def test_split_refuses_to_overwrite_without_force(tiny_csv, tmp_path, capsys):
    out = tmp_path / "split"
    data_main(["split", str(tiny_csv), "--out", str(out)])
    (out / "val.csv").write_text("precious")
    with pytest.raises(SystemExit, match=f"error: .*{out / 'val.csv'}.* exist already; pass --force"):
        data_main(["split", str(tiny_csv), "--out", str(out), "--seed", "1"])
    assert (out / "val.csv").read_text() == "precious"
    data_main(["split", str(tiny_csv), "--out", str(out), "--seed", "1", "--force"])
    assert rows_of(out / "val.csv")[1]


@pytest.mark.parametrize("fractions", [["0", "0", "0"], ["-0.5", "1", "0.5"], ["nan", "0.2", "0.2"],
                                       ["inf", "0.2", "0.2"], ["0", "0.5", "0.5"]])
def test_split_rejects_impossible_fractions(tiny_csv, tmp_path, fractions):
    with pytest.raises(SystemExit, match="error: .*fraction"):
        data_main(["split", str(tiny_csv), "--out", str(tmp_path / "split"), "--fractions", *fractions])
    assert not (tmp_path / "split").exists()


def test_impossible_cells_and_huge_crystals_are_refused_from_the_cif_text(tiny_csv, monkeypatch):
    """A negative cell length became a mirrored cell; a 10,000-atom crystal was parsed and Niggli-reduced (over a
    minute) before the atom-count check. Both are read from the CIF text, before pymatgen builds a structure."""
    from pymatgen.core import Structure

    from equicsp.data.crystals import parse_cif

    _, rows = rows_of(tiny_csv)
    cif = rows[0]["cif"]
    options = PreprocessOptions()

    def with_line(prefix: str, line: str) -> str:
        return "\n".join(line if old.startswith(prefix) else old for old in cif.splitlines()) + "\n"

    header, sites = cif.split("_atom_site_occupancy\n")
    huge = header + "_atom_site_occupancy\n" + "".join(
        f"  Ti  Ti{i}  1  {(i % 100) / 100:.4f}  {(i // 100) / 100:.4f}  0.5  1\n" for i in range(10_000))
    built = []
    real = Structure.from_str
    monkeypatch.setattr(Structure, "from_str", lambda *args, **kwargs: built.append(1) or real(*args, **kwargs))
    for text, reason in ((with_line("_cell_length_a", "_cell_length_a   -4"), "_cell_length_a is -4, a length must be > 0"),
                         (with_line("_cell_angle_beta", "_cell_angle_beta 180.0(2)"), "_cell_angle_beta is 180.0\\(2\\)"),
                         (huge, "too large: 10000 atom sites listed > max_atoms 20")):
        with pytest.raises(ValueError, match=reason):
            parse_cif(text, options)
    assert built == []
    assert parse_cif(cif, options).lengths == pytest.approx([3.81489437] * 3) and built == [1]


def test_split_by_composition_keeps_every_reduced_composition_on_one_side(tmp_path, capsys):
    from pymatgen.core import Structure

    from equicsp.data.crystals import SPLITS, resolve_path

    fieldnames, rows = None, []
    for split in SPLITS:  # the bundled Perov-5 sample, its three splits in one file
        fieldnames, part = rows_of(resolve_path(f"bundled:perov_5/{split}.csv"))
        rows += part
    write_rows(tmp_path / "all.csv", fieldnames, rows)

    def compositions(folder):
        return {split: {Structure.from_str(row["cif"], fmt="cif").composition.reduced_formula
                        for row in rows_of(folder / f"{split}.csv")[1]} for split in SPLITS}

    data_main(["split", str(tmp_path / "all.csv"), "--out", str(tmp_path / "plain")])
    plain = compositions(tmp_path / "plain")
    shared = len((plain["train"] | plain["val"]) & plain["test"] | plain["train"] & plain["val"])
    assert shared > 0, "the sample should hold polymorphs a random split puts on both sides"
    assert f"; {shared} in more than one split" in capsys.readouterr().out
    data_main(["split", str(tmp_path / "all.csv"), "--out", str(tmp_path / "grouped"), "--group-by", "composition"])
    grouped = compositions(tmp_path / "grouped")
    assert not grouped["train"] & grouped["val"] and not grouped["train"] & grouped["test"] \
        and not grouped["val"] & grouped["test"]
    counts = {split: len(rows_of(tmp_path / "grouped" / f"{split}.csv")[1]) for split in SPLITS}
    assert sum(counts.values()) == len(rows) and abs(counts["train"] - 0.6 * len(rows)) < 0.05 * len(rows)
    printed = capsys.readouterr().out
    assert f"train: {counts['train']}, val: {counts['val']}, test: {counts['test']}" in printed
    assert (f"reduced compositions: train {len(grouped['train'])}, val {len(grouped['val'])}, test "
            f"{len(grouped['test'])}; 0 in more than one split") in printed


def test_parsing_a_split_is_announced_with_its_size_and_a_cached_read_is_silent(tiny_csv, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path))
    load_crystals(tiny_csv, show_progress=True)
    assert f"reading {tiny_csv}: 8 crystals to parse (cached for the next run)..." in capsys.readouterr().err
    load_crystals(tiny_csv, show_progress=True)
    assert "reading" not in capsys.readouterr().err
