"""`fetch` against an HTTP server on 127.0.0.1 serving the bundled Perov-5 sample, pinned by its real blob ids."""

from __future__ import annotations

import http.server
import re
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

import equicsp
from equicsp.data import fetch as fetching
from equicsp.data.fetch import SPLITS, Dataset, FetchError, fetch, fetch_hint, git_blob_id, main, source_url

SAMPLE = Path(equicsp.__file__).parent / "sample_data" / "perov_5"


class Server(http.server.ThreadingHTTPServer):
    """Serves `files` (URL path -> bytes) with Range support; can corrupt a file or drop a connection once."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.files = files
        self.log: list[tuple[str, str | None]] = []  # (path, Range header) of every GET
        self.corrupt: set[str] = set()
        self.drop_once: set[str] = set()  # send half the body, then close the connection
        self.ignore_range = False
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:
        self.server.log.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if self.path in self.server.corrupt:
            body = body[:100] + bytes([body[100] ^ 1]) + body[101:]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not self.server.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.server.drop_once:
            self.server.drop_once.discard(self.path)
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    """The sample's three splits under /perov_5/, and the pinned table pointed at their blob ids."""
    files = {f"/perov_5/{split}.csv": (SAMPLE / f"{split}.csv").read_bytes() for split in SPLITS}
    blobs = {split: git_blob_id(SAMPLE / f"{split}.csv") for split in SPLITS}
    monkeypatch.setitem(fetching.DATASETS, "perov_5", Dataset("txie-93/cdvae", "0" * 40, blobs))
    srv = Server(files)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def assert_fetched(folder: Path, splits=SPLITS) -> None:
    assert sorted(p.name for p in folder.glob("*.csv*")) == sorted(f"{split}.csv" for split in splits)
    for split in splits:
        assert (folder / f"{split}.csv").read_bytes() == (SAMPLE / f"{split}.csv").read_bytes()


def test_git_blob_id_is_gits(tmp_path):
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_blob_id(tmp_path / "hello") == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object


def test_clean_fetch_verifies_every_split(server, tmp_path):
    folder = fetch("perov_5", tmp_path, mirror=server.url, progress=False)
    assert folder == tmp_path / "perov_5"
    assert_fetched(folder)
    assert [path for path, _ in server.log] == [f"/perov_5/{split}.csv" for split in SPLITS]


def test_a_second_fetch_skips_verified_files_without_a_request(server, tmp_path):
    fetch("perov_5", tmp_path, mirror=server.url, progress=False)
    server.log.clear()
    fetch("perov_5", tmp_path, mirror=server.url, progress=False)
    assert server.log == []


def test_a_corrupted_file_is_refused_and_nothing_is_left(server, tmp_path):
    server.corrupt.add("/perov_5/val.csv")
    with pytest.raises(FetchError, match="refused perov_5/val.csv") as err:
        fetch("perov_5", tmp_path, mirror=server.url, progress=False)
    expected = fetching.DATASETS["perov_5"].blobs["val"]
    assert expected in str(err.value)
    assert re.search(r"its git blob id is [0-9a-f]{40}", str(err.value))
    assert not list((tmp_path / "perov_5").glob("val.csv*"))  # neither the file nor its partial download


def test_a_dropped_connection_is_resumed_with_a_range_request(server, tmp_path):
    server.drop_once.add("/perov_5/train.csv")
    fetch("perov_5", tmp_path, splits=["train"], mirror=server.url, progress=False)
    assert_fetched(tmp_path / "perov_5", ["train"])
    (first, _), (second, resumed_from) = server.log
    assert first == second == "/perov_5/train.csv"
    half = (SAMPLE / "train.csv").stat().st_size // 2
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", resumed_from).group(1)) <= half  # the part kept what arrived


def test_an_interrupted_fetch_resumes_on_the_next_run(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetching, "RETRIES", 0)
    server.drop_once.add("/perov_5/test.csv")
    with pytest.raises(FetchError, match="rerun the same command to resume"):
        fetch("perov_5", tmp_path, splits=["test"], mirror=server.url, progress=False)
    folder = tmp_path / "perov_5"
    assert not (folder / "test.csv").exists()
    size = (folder / "test.csv.part").stat().st_size
    assert 0 < size < (SAMPLE / "test.csv").stat().st_size
    fetch("perov_5", tmp_path, splits=["test"], mirror=server.url, progress=False)
    assert_fetched(folder, ["test"])
    assert server.log[-1] == ("/perov_5/test.csv", f"bytes={size}-")


def test_a_server_that_ignores_range_is_fetched_again_from_zero(server, tmp_path):
    server.drop_once.add("/perov_5/val.csv")
    server.ignore_range = True  # the resumed part gets the whole file appended, fails its check, and starts over
    fetch("perov_5", tmp_path, splits=["val"], mirror=server.url, progress=True)
    assert_fetched(tmp_path / "perov_5", ["val"])
    assert len(server.log) == 3


def test_a_present_file_that_does_not_verify_is_refused_not_overwritten(server, tmp_path):
    (tmp_path / "perov_5").mkdir()
    (tmp_path / "perov_5" / "val.csv").write_text("not the benchmark\n")
    with pytest.raises(FetchError, match="refused perov_5/val.csv .* delete it and fetch again"):
        fetch("perov_5", tmp_path, splits=["val"], mirror=server.url, progress=False)
    assert (tmp_path / "perov_5" / "val.csv").read_text() == "not the benchmark\n"
    assert server.log == []


def test_cli_splits_subset_and_mirror(server, tmp_path, capsys):
    assert main(["perov_5", "--dest", str(tmp_path), "--splits", "val,test", "--mirror", server.url + "/", "--quiet"]) == 0
    assert_fetched(tmp_path / "perov_5", ["val", "test"])
    assert "val, test verified" in capsys.readouterr().out


def test_cli_reports_a_missing_file_in_one_line(server, tmp_path, capsys):
    assert main(["perov_5", "--dest", str(tmp_path), "--mirror", server.url + "/nowhere", "--quiet"]) == 1
    assert "error: could not download" in capsys.readouterr().err
    assert not list((tmp_path / "perov_5").glob("*.csv*"))


def test_default_folder_and_urls(monkeypatch, tmp_path):
    monkeypatch.setenv("EQUICSP_DATA_DIR", str(tmp_path))
    assert fetching.default_data_dir("mp_20") == tmp_path / "mp_20"
    assert "python -m equicsp.data fetch mp_20" in fetch_hint("mp_20")
    commit = fetching.DATASETS["mpts_52"].commit
    assert source_url("mpts_52", "val") == f"https://raw.githubusercontent.com/jiaor17/DiffCSP/{commit}/data/mpts_52/val.csv"
    assert source_url("mp_20", "test", "https://m.example/x/") == "https://m.example/x/mp_20/test.csv"
    with pytest.raises(FetchError, match="unknown dataset"):
        fetch("mp20")
    with pytest.raises(FetchError, match="unknown split"):
        fetch("mp_20", splits=["training"])


def test_pins_are_complete():
    assert set(fetching.DATASETS) == {"perov_5", "carbon_24", "mp_20", "mpts_52"}
    for dataset in fetching.DATASETS.values():
        assert set(dataset.blobs) == set(SPLITS)
        assert all(re.fullmatch(r"[0-9a-f]{40}", blob) for blob in [dataset.commit, *dataset.blobs.values()])


def test_a_second_fetch_waits_for_the_lock(server, tmp_path):
    (tmp_path / "perov_5").mkdir()
    done = threading.Event()
    with FileLock(tmp_path / "perov_5" / ".fetch.lock"):
        thread = threading.Thread(target=lambda: (fetch("perov_5", tmp_path, mirror=server.url, progress=False),
                                                  done.set()))
        thread.start()
        time.sleep(0.3)
        assert not done.is_set() and server.log == []
    thread.join(10)
    assert done.is_set()
    assert_fetched(tmp_path / "perov_5")
