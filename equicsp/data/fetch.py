"""Download the published benchmark CSVs (`python -m equicsp.data fetch NAME`), each pinned by its git blob id.

Perov-5, Carbon-24 and MP-20 come from CDVAE's `data/` folder, MPTS-52 from DiffCSP's `data/mpts_52`, at the
commits below. A file is pinned by the id git gives it in that commit's tree (sha1 of `blob <size>\\0` + content),
so anyone can check a pin with `git ls-tree` or `git hash-object`, and the files are exactly the benchmark's.

Why pooch plus our own check: pooch gives the cache folder (`pooch.os_cache`) and the HTTP download with its
progress bar, but its `known_hash` speaks sha256/sha1/md5 of the content, not git blob ids, and `pooch.retrieve`
downloads into a throwaway temporary file, so an interrupted transfer starts over. We therefore drive pooch's
`HTTPDownloader` ourselves: it appends to `<split>.csv.part` (an HTTP Range request picks up where the last try
stopped), the whole part is checked against the pinned blob id, and only then is it renamed to `<split>.csv`.
A file under its final name has always been verified; a mismatch deletes the part and is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

SPLITS = ("train", "val", "test")
RETRIES = 3  # connection drops survived within one fetch; each retry resumes from the partial file
TIMEOUT = 60  # seconds without data before a try is abandoned


@dataclass(frozen=True)
class Dataset:
    """Where a benchmark's CSVs live (`data/<name>/<split>.csv` at `commit`) and the git blob id of each split."""

    repo: str  # owner/name on GitHub
    commit: str
    blobs: dict[str, str]  # split -> git blob id


_CDVAE = ("txie-93/cdvae", "f857f598d6f6cca5dc1ea0582d228f12dcc2c2ea")
_DIFFCSP = ("jiaor17/DiffCSP", "7121d159826efa2ba9500bf299250d96da37f146")

# Read with `git ls-tree -r -l <commit> data/`. All are plain blobs (neither repository has a .gitattributes, so
# none is a Git LFS pointer) and raw.githubusercontent.com serves their bytes as they are.
DATASETS: dict[str, Dataset] = {
    "perov_5": Dataset(*_CDVAE, blobs={
        "train": "0769074b5d51d293b765c4371b8f55c468c9c9f2",
        "val": "4a2c8dde98347dd0e01fa83dcf3982c2abe98f9f",  # 3,673,814 bytes
        "test": "d3c5d5af4b27a2a139149f2bb73c8a3dba9d8ac1",  # 3,671,842 bytes
    }),
    "carbon_24": Dataset(*_CDVAE, blobs={
        "train": "5e7ae970fbad8ddc46b6963e8cd6e425f11783a6",
        "val": "b3e29b927883642426ca1d9632d00359b412742b",  # 2,321,923 bytes
        "test": "9beca843fde489de1fe288b32f9e3ff710d42803",  # 2,319,350 bytes
    }),
    "mp_20": Dataset(*_CDVAE, blobs={
        "train": "b1c9d498565ac2fd8d075a51ff2ef5e51ba6c21f",
        "val": "7efe4d7ebeb4f460ceaad35e5326c42111d9c9a1",
        "test": "5dc643041df53f5ce4970a79930ad262b4f07acd",
    }),
    "mpts_52": Dataset(*_DIFFCSP, blobs={
        "train": "28c53b0a0fd3f32fb8078aca8e5b484e372790c6",
        "val": "a377ba0ca7bee37ee69d9f50f8362eaa35d9f690",
        "test": "2e8af159618f63be346b6527f155514323964423",
    }),
}


class FetchError(RuntimeError):
    """A download that failed or a file that does not match its pinned blob id, with the reason."""


def data_root() -> Path:
    """The folder holding `<name>/<split>.csv`: `$EQUICSP_DATA_DIR`, else `data/` in the user's cache."""
    import pooch  # here, not above: the GPU machine, which trains from a given folder, has no pooch

    return Path(os.environ.get("EQUICSP_DATA_DIR") or pooch.os_cache("equicsp") / "data")


def default_data_dir(name: str) -> Path:
    """Where `fetch(name)` puts a benchmark's `{train,val,test}.csv` and where a preset looks for them."""
    return data_root() / name


def fetched_data(name: str) -> Path | None:
    """The folder of a benchmark `fetch(name)` has put in place, None when there is none (or no such benchmark)."""
    folder = default_data_dir(name)
    return folder if name in DATASETS and (folder / "train.csv").is_file() else None


def fetch_hint(name: str) -> str:
    """The sentence to print when a preset finds no data."""
    return (f"no data for {name}: run `python -m equicsp.data fetch {name}` "
            f"(it downloads into {default_data_dir(name)}; set $EQUICSP_DATA_DIR to put it elsewhere)")


def git_blob_id(path: Path) -> str:
    """The id `git hash-object` gives the file: sha1 of `blob <size>\\0` followed by the content."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def source_url(name: str, split: str, mirror: str | None = None) -> str:
    """GitHub's raw file at the pinned commit, or `<mirror>/<name>/<split>.csv`."""
    if mirror:
        return f"{mirror.rstrip('/')}/{name}/{split}.csv"
    dataset = DATASETS[name]
    return f"https://raw.githubusercontent.com/{dataset.repo}/{dataset.commit}/data/{name}/{split}.csv"


def _append(url: str, part: Path, progress: bool) -> None:
    """Append the bytes of `url` that `part` lacks to it (all of them when `part` is absent)."""
    start = part.stat().st_size if part.exists() else 0
    # A resumed request asks for the raw bytes: a Range over a gzip-encoded response would count compressed bytes.
    headers = {"Range": f"bytes={start}-", "Accept-Encoding": "identity"} if start else {}
    import pooch

    with open(part, "ab") as out:
        pooch.HTTPDownloader(progressbar=progress, headers=headers, timeout=TIMEOUT)(url, out, None)


def _fetch_file(url: str, target: Path, blob: str, progress: bool) -> None:
    """Download `url` to `target` through `target.part`, resuming a partial file, and rename it once verified."""
    part = target.with_name(target.name + ".part")
    for attempt in range(RETRIES + 1):
        resumed = part.exists() and part.stat().st_size > 0
        try:
            _append(url, part, progress)
        except OSError as err:  # requests' errors are OSErrors; an HTTP error carries its response
            if getattr(err, "response", None) is None:  # the connection dropped or stalled: resume from the part
                if attempt < RETRIES:
                    continue
                raise FetchError(f"could not download {url} ({err}); rerun the same command to resume") from err
            part.unlink(missing_ok=True)
            if not resumed:
                raise FetchError(f"could not download {url}: {err}") from err
            continue  # e.g. 416: the part was already whole or is not a prefix of the file; start over
        got = git_blob_id(part)
        if got == blob:
            os.replace(part, target)
            return
        part.unlink()
        if not resumed:  # a resumed part may have been stale, or the server ignored Range: try once from zero
            raise FetchError(f"refused {target.parent.name}/{target.name} from {url}: its git blob id is {got}, "
                             f"expected {blob} (the download was deleted)")
    raise FetchError(f"could not download {url} after {RETRIES + 1} tries; rerun the same command to resume")


def fetch(name: str, dest: Path | str | None = None, splits: Sequence[str] = SPLITS, mirror: str | None = None,
          progress: bool = True) -> Path:
    """Download and verify the given splits of benchmark `name` into `<dest>/<name>/`, and return that folder.

    `dest` defaults to `data_root()`. A split already present is verified and kept without a request; a present
    file that does not verify is refused rather than overwritten. A file lock serialises fetches into one folder.
    """
    if name not in DATASETS:
        raise FetchError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise FetchError(f"unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
    folder = Path(dest).expanduser() / name if dest is not None else default_data_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    blobs = DATASETS[name].blobs
    with FileLock(folder / ".fetch.lock"):
        for split in splits:
            target = folder / f"{split}.csv"
            if target.exists():
                got = git_blob_id(target)
                if got != blobs[split]:
                    raise FetchError(f"refused {name}/{target.name} in {folder}: its git blob id is {got}, expected "
                                     f"{blobs[split]}; delete it and fetch again")
                continue
            url = source_url(name, split, mirror)
            if progress:
                print(f"{name}/{split}.csv <- {url}", file=sys.stderr)
            _fetch_file(url, target, blobs[split], progress)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m equicsp.data fetch NAME [--dest DIR] [--splits train,val,test] [--mirror URL]`."""
    parser = argparse.ArgumentParser(
        prog="python -m equicsp.data fetch",
        description="Download a benchmark's published train/val/test CSVs, each checked against its pinned git blob id.",
        epilog="examples:\n  python -m equicsp.data fetch mp_20\n"
               "  python -m equicsp.data fetch perov_5 --splits test --dest /scratch/data\n"
               "  python -m equicsp.data fetch mpts_52 --mirror https://mirror.example.org/equicsp",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=list(DATASETS), help="the benchmark")
    parser.add_argument("--dest", type=Path, default=None,
                        help="folder that gets <name>/<split>.csv (default: $EQUICSP_DATA_DIR or the user's cache, "
                             f"now {data_root()})")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits (default: %(default)s)")
    parser.add_argument("--mirror", default=None,
                        help="base URL holding <name>/<split>.csv, instead of GitHub at the pinned commit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    splits = [split.strip() for split in args.splits.split(",") if split.strip()]
    try:
        folder = fetch(args.name, args.dest, splits, args.mirror, progress=not args.quiet)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.name}: {', '.join(splits)} verified in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
