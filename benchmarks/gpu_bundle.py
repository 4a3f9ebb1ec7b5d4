"""The packages the GPU machine lacks (Ray, MLflow, Optuna, pymatgen), packed small enough to take along.

The lent GPU machine has Python 3.12 with torch, torch-geometric, numpy, scipy, pandas, matplotlib,
PyYAML, tqdm and pytest, but no package registry, and a run takes along at most 64 MiB of files.
`build` downloads, here, the wheels it lacks for its Python from PyPI, drops what the project never
loads (Ray's Java jars, RLlib, Serve and dashboard web client, pyarrow's Flight and C++ headers,
symbol tables, distributions no import path reaches), and packs each group into one tar of
per-package .tar.xz members: `train` for `python -m equicsp.train` through Ray Train, sweeps and
MLflow on a local SQLite store, `evaluate` for pymatgen's matching. `install` unpacks them there
into one folder with nothing but the standard library, never over the machine's own packages.

    .venv/bin/python benchmarks/gpu_bundle.py build --out .gpu/bundle           # here, with PyPI
    python3 benchmarks/gpu_bundle.py install --from .gpu/bundle --target .gpu/site --check   # there

`install` prints the line to export (PYTHONPATH=...). Ray runs there without its dashboard (a
`ray[default]` extra): training and evaluation do not need it; sweeps with early stopping do.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# What pip is asked for, per group; each root is pinned to the version this environment runs.
GROUPS = {
    "train": ("ray[train,tune]", "mlflow-skinny", "sqlalchemy", "alembic", "optuna"),
    "evaluate": ("pymatgen", "smact"),
}
# On the GPU machine already, with what those import to work (torch's, matplotlib's, pandas' and
# pytest's requirements): never packed, never shadowed. packaging and typing-extensions are packed
# all the same: Ray and pydantic need newer ones than torch does.
MACHINE_HAS = frozenset({
    "torch", "torch-geometric", "numpy", "scipy", "pandas", "matplotlib", "pyyaml", "tqdm", "pytest",
    "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec", "setuptools",
    "pillow", "fonttools", "contourpy", "kiwisolver", "cycler", "pyparsing", "python-dateutil", "six",
    "pytz", "tzdata", "iniconfig", "pluggy", "pygments",
})
MACHINE_PREFIXES = ("nvidia-",)  # torch's CUDA libraries
# Declared requirements that no import path of the project loads (training, sweeps, matching,
# CIF export), with what they are there for: left out for their size.
LEFT_OUT = {
    "plotly": "pymatgen's interactive plots",
    "narwhals": "plotly's dataframes",
    "ase": "SMACT's structure builders",
    "lxml": "pymatgen's XML readers (VASP, Gaussian)",
    "pathos": "SMACT's structure-prediction database", "multiprocess": "pathos", "ppft": "pathos",
    "pox": "pathos", "dill": "pathos",
    "pandarallel": "declared by SMACT, which never imports it",
}
# Parts of a distribution the project never loads: globs over paths inside site-packages.
PRUNE = {
    "ray": ("ray/jars/*", "ray/rllib/*", "ray/serve/*", "ray/llm/*", "ray/dashboard/client/build/*"),
    # Ray Train v2 reads pyarrow.fs.S3FileSystem on every checkpoint copy: S3 stays.
    "pyarrow": ("pyarrow/include/*", "pyarrow/src/*", "pyarrow/tests/*", "pyarrow/*flight*",
                "pyarrow/_pyarrow_cpp_tests*", "pyarrow/*.pyx", "pyarrow/*.pxd", "pyarrow/*.pxi",
                # components pyarrow imports only where its build has them (try/except ImportError)
                "pyarrow/_azurefs*", "pyarrow/_gcsfs*", "pyarrow/_hdfs*", "pyarrow/*_orc*", "pyarrow/*parquet_encryption*"),
    "smact": ("smact/data/species_rep/*", "smact/tests/*"),  # the dopant predictor's embeddings
}
# Older releases that the roots still accept and that pack smaller: Ray takes pyarrow>=17, and
# pyarrow 17.0 packs to 14.7 MiB against 26.0's 18.1.
SMALLER = ("pyarrow==17.0.0",)
# pure-Python requirements PyPI has no wheel of: built here, so that pip can resolve the rest
SDIST_ONLY = ("pandarallel",)
LINKED_SIZE = 64 << 10  # identical files from this size on are packed once
PACKING = 2  # bump when the packing below changes: packed packages are cached under this key
MiB = 1 << 20


def normalize(name: str) -> str:
    """PEP 503's form of a distribution name: `PyYAML`, `pyyaml` and `py_yaml` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(wheel: Path) -> tuple[str, str]:
    """(normalized name, version) from a wheel's file name."""
    name, version = wheel.name.split("-")[:2]
    return normalize(name), version


def on_machine(name: str) -> bool:
    return normalize(name) in MACHINE_HAS or normalize(name).startswith(MACHINE_PREFIXES)


def pinned(requirement: str) -> str:
    """`ray[train,tune]` -> `ray[train,tune]==2.60.0`: the version this environment runs, when it has one."""
    name = re.split(r"[\[<>=!~ ]", requirement)[0]
    try:
        return f"{requirement}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return requirement


def site_path(member: str) -> str | None:
    """Where a wheel member lands in site-packages: `x.data/purelib/a.py` -> `a.py`; scripts, headers
    and data files (Jupyter extensions, man pages) nowhere."""
    top, _, rest = member.partition("/")
    if not top.endswith(".data"):
        return member
    scheme, _, path = rest.partition("/")
    return path if scheme in ("purelib", "platlib") else None


def is_pruned(path: str, rules: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, rule) for rule in rules)


def unpack_wheel(wheel: Path, stage: Path, rules: tuple[str, ...] = ()) -> None:
    """The wheel's files as pip would install them (executable bits kept), less the pruned ones."""
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = site_path(info.filename)
            if info.is_dir() or path is None or is_pruned(path, rules):
                continue
            if path.startswith("/") or ".." in Path(path).parts:
                raise ValueError(f"{wheel.name}: {info.filename} points outside site-packages")
            out = stage / path
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(out, "wb") as target:
                shutil.copyfileobj(source, target)
            if (info.external_attr >> 16) & 0o111:
                out.chmod(0o755)


def elf_files(stage: Path) -> list[Path]:
    def is_elf(path: Path) -> bool:
        with open(path, "rb") as file:
            return file.read(4) == b"\x7fELF"

    return [path for path in sorted(stage.rglob("*")) if path.is_file() and is_elf(path)]


def strip_symbols(binaries: list[Path]) -> None:
    """Ray's and pyarrow's libraries ship their symbol tables (a quarter of Ray's size); the dynamic
    symbols that loading needs stay."""
    strip = shutil.which("strip")
    if binaries and strip is None:
        print(f"no `strip` here: {len(binaries)} native files keep their symbol tables")
    elif binaries:
        subprocess.run([strip, "--strip-unneeded", *map(str, binaries)], check=True)


def xz_filters(size: int, native: bool) -> list[dict[str, int]]:
    """LZMA2 with a dictionary as large as the package (up to 256 MiB, what unpacking needs in memory):
    Ray's raylet, GCS server and _raylet.so link the same libraries, so the second and third copies
    cost little. x86 branch conversion first where there is machine code."""
    dictionary = min(max(1 << max(size - 1, 1).bit_length(), 8 * MiB), 256 * MiB)
    lzma2 = {"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dictionary}
    return [{"id": lzma.FILTER_X86}, lzma2] if native else [lzma2]


def pack_tree(stage: Path, archive: Path) -> None:
    """One package's files as a .tar.xz, paths relative to site-packages. A large file identical to an
    earlier one goes in as a symbolic link to it: spglib (and pyarrow from 18 on) ship a library under
    three names, and the x86 filter makes copies at different offsets differ, so xz packs each again."""
    files = sorted(path for path in stage.rglob("*") if path.is_file())
    size = sum(path.stat().st_size for path in files)
    filters = xz_filters(size, native=bool(elf_files(stage)))
    partial = archive.with_name(archive.name + ".partial")
    first: dict[str, Path] = {}  # content digest of a large file -> where it was packed
    with (lzma.open(partial, "wb", format=lzma.FORMAT_XZ, filters=filters) as xz,
          tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as tar):
        for path in files:
            info = tar.gettarinfo(path, arcname=path.relative_to(stage).as_posix())
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if info.size >= LINKED_SIZE else ""
            if digest in first:
                info.type, info.size = tarfile.SYMTYPE, 0
                info.linkname = os.path.relpath(first[digest], path.parent)
                tar.addfile(info)
                continue
            if digest:
                first[digest] = path
            with open(path, "rb") as file:
                tar.addfile(info, file)
    partial.replace(archive)


def pack_wheel(wheel: Path, cache: Path) -> tuple[Path, int]:
    """The wheel unpacked, pruned, stripped and packed (cached by wheel and rules): (archive, unpacked bytes)."""
    name, _ = wheel_name(wheel)
    rules = PRUNE.get(name, ())
    key = hashlib.sha256(json.dumps([wheel.name, rules, PACKING]).encode()).hexdigest()[:12]
    archive, sizes = cache / f"{wheel.stem}.{key}.tar.xz", cache / f"{wheel.stem}.{key}.size"
    if archive.exists() and sizes.exists():
        return archive, int(sizes.read_text())
    stage = cache / "stage" / wheel.stem
    shutil.rmtree(stage, ignore_errors=True)
    unpack_wheel(wheel, stage, rules)
    strip_symbols(elf_files(stage))
    pack_tree(stage, archive)
    sizes.write_text(str(sum(path.stat().st_size for path in stage.rglob("*") if path.is_file())))
    shutil.rmtree(stage)
    return archive, int(sizes.read_text())


def pip_download(requirements: list[str], dest: Path, python_version: str, glibc_minor: int,
                 links: Path, constraints: Path) -> list[Path]:
    """Wheels of `requirements` and all they need, for CPython `python_version` on manylinux x86_64
    with glibc up to 2.`glibc_minor`, into a fresh `dest`."""
    shutil.rmtree(dest, ignore_errors=True)
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc_minor, 4, -1)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--progress-bar", "off", "--dest", str(dest),
               "--only-binary=:all:", "--python-version", python_version, "--find-links", str(links),
               "--constraint", str(constraints)]
    for platform in [*platforms, "manylinux2014_x86_64"]:
        command += ["--platform", platform]
    subprocess.run(command + requirements, check=True)
    return sorted(dest.glob("*.whl"))


def build_sdist_only(links: Path) -> None:
    """Pure-Python wheels of the SDIST_ONLY requirements: pip's --platform download accepts wheels only."""
    missing = [pinned(name) for name in SDIST_ONLY if not any(links.glob(f"{name}-*.whl"))]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(links),
                        *missing], check=True)


def download(groups: list[str], work: Path, python_version: str, glibc_minor: int) -> dict[str, list[Path]]:
    """Each group's wheels: a later group's are what its roots need beyond the earlier groups' (pinned to them)."""
    links = work / "local-wheels"
    links.mkdir(parents=True, exist_ok=True)
    if "evaluate" in groups:
        build_sdist_only(links)
    wheels: dict[str, list[Path]] = {}
    earlier: dict[str, Path] = {}
    for group in groups:
        constraints = work / f"{group}-constraints.txt"
        constraints.write_text("".join(f"{line}\n" for line in SMALLER)
                               + "".join(f"{name}=={wheel_name(wheel)[1]}\n" for name, wheel in earlier.items()))
        found = pip_download([pinned(root) for root in GROUPS[group]], work / "wheels" / group,
                             python_version, glibc_minor, links, constraints)
        wheels[group] = [wheel for wheel in found if wheel_name(wheel)[0] not in earlier or on_machine(wheel_name(wheel)[0])]
        earlier.update({wheel_name(wheel)[0]: wheel for wheel in found})
    return wheels


def write_group(group: str, wheels: list[Path], out: Path, work: Path, python_version: str) -> dict:
    """out/equicsp-gpu-<group>.tar: manifest.json and one .tar.xz per package; returns the manifest."""
    manifest: dict = {"group": group, "python": python_version, "packages": [], "left_out": [],
                      "relies_on_machine": []}
    packed = []
    for wheel in wheels:
        name, version = wheel_name(wheel)
        if on_machine(name):
            manifest["relies_on_machine"].append(name)
        elif name in LEFT_OUT:
            manifest["left_out"].append({"name": name, "version": version, "wheel_bytes": wheel.stat().st_size,
                                         "why": LEFT_OUT[name]})
        else:
            print(f"packing {wheel.name}", flush=True)
            archive, unpacked = pack_wheel(wheel, work / "packed")
            member = f"packages/{name}-{version}.tar.xz"
            manifest["packages"].append({"name": name, "version": version, "member": member,
                                         "wheel_bytes": wheel.stat().st_size, "unpacked_bytes": unpacked,
                                         "packed_bytes": archive.stat().st_size})
            packed.append((member, archive))
    bundle = out / f"equicsp-gpu-{group}.tar"
    with tarfile.open(bundle, "w") as tar:
        text = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(text)
        tar.addfile(info, fileobj=io.BytesIO(text))
        for member, archive in packed:
            tar.add(archive, arcname=member)
    return manifest


def report(manifests: list[dict], out: Path, budget_mib: float) -> bool:
    """Prints every package's sizes, each group's file and the total; False when over the budget."""
    print(f"\n{'package':34} {'version':16} {'group':9} {'wheel':>9} {'unpacked':>9} {'packed':>9}  (MiB)")
    for manifest in manifests:
        for package in sorted(manifest["packages"], key=lambda package: -package["packed_bytes"]):
            print(f"{package['name']:34} {package['version']:16} {manifest['group']:9} "
                  f"{package['wheel_bytes'] / MiB:9.2f} {package['unpacked_bytes'] / MiB:9.2f} "
                  f"{package['packed_bytes'] / MiB:9.2f}")
    sizes = {manifest["group"]: (out / f"equicsp-gpu-{manifest['group']}.tar").stat().st_size for manifest in manifests}
    for group, size in sizes.items():
        print(f"{group}: {size / MiB:.2f} MiB in {out / f'equicsp-gpu-{group}.tar'}")
    total = sum(sizes.values()) / MiB
    print(f"total: {total:.2f} MiB, budget {budget_mib:.0f} MiB")
    for manifest in manifests:
        for package in manifest["left_out"]:
            print(f"left out (the project never imports it): {package['name']} {package['version']}, "
                  f"{package['wheel_bytes'] / MiB:.2f} MiB wheel: {package['why']}")
    machine = sorted({name for manifest in manifests for name in manifest["relies_on_machine"]})
    print(f"taken from the GPU machine: {', '.join(machine)}")
    if total <= budget_mib:
        return True
    fitting, carried = [], 0
    for group, size in sizes.items():  # the groups in order: evaluate is the one to leave behind
        carried += size
        if carried / MiB <= budget_mib:
            fitting.append(group)
    print(f"DOES NOT FIT: {total:.2f} MiB > {budget_mib:.0f} MiB; per group: "
          + ", ".join(f"{group} {size / MiB:.2f} MiB" for group, size in sizes.items())
          + (f"; within the budget: {' + '.join(fitting)}" if fitting else ""))
    return False


def build(args: argparse.Namespace) -> int:
    out, work = args.out.resolve(), (args.work or args.out.with_name(args.out.name + "-work")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("equicsp-gpu-*.tar"):
        old.unlink()
    wheels = download(args.groups, work, args.python_version, args.glibc_minor)
    manifests = [write_group(group, wheels[group], out, work, args.python_version) for group in args.groups]
    return 0 if report(manifests, out, args.budget_mib) else 1


def extract(archive: tarfile.TarFile, target: Path) -> None:
    if hasattr(tarfile, "data_filter"):  # refuses absolute paths and links out of target
        archive.extractall(target, filter="data")
    else:
        archive.extractall(target)


def install_bundles(source: Path, target: Path) -> list[dict]:
    """Unpacks every equicsp-gpu-*.tar in `source` into `target`; returns their manifests."""
    bundles = sorted(source.glob("equicsp-gpu-*.tar"))
    if not bundles:
        raise SystemExit(f"no equicsp-gpu-*.tar in {source}: run `build` first")
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    manifests = []
    for bundle in bundles:
        with tarfile.open(bundle) as outer:
            manifest = json.load(outer.extractfile("manifest.json"))
            if manifest["python"] != here:
                raise SystemExit(f"{bundle.name} holds packages for Python {manifest['python']}, this is {here}")
            for package in manifest["packages"]:
                if on_machine(package["name"]):
                    raise SystemExit(f"{bundle.name} holds {package['name']}, which would shadow the machine's own")
                with tarfile.open(fileobj=outer.extractfile(package["member"]), mode="r|xz") as inner:
                    extract(inner, target)
        print(f"installed {bundle.name}: {len(manifest['packages'])} packages into {target}")
        manifests.append(manifest)
    return manifests


def missing_on_machine(manifests: list[dict]) -> list[str]:
    """What the bundle takes from the machine and the machine turns out not to have."""
    names = sorted({name for manifest in manifests for name in manifest["relies_on_machine"]})
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


CHECKS = {
    "train": "import ray, ray.train, ray.tune, mlflow, optuna, sqlalchemy, alembic, importlib.util\n"
             "if importlib.util.find_spec('torch'): import ray.train.torch\n"
             "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
             "ray.shutdown()\n",
    "evaluate": "import pymatgen.core, pymatgen.analysis.structure_matcher, pymatgen.io.cif, smact\n",
}


def check(groups: list[str], target: Path) -> bool:
    """Imports each installed group's modules in a fresh interpreter (Ray: one local start), as the project will."""
    path = os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "RAY_ADDRESS": "local"}
    code = "".join(CHECKS[group] for group in groups) + f"print('checked: {' '.join(groups)}')\n"
    return subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def install(args: argparse.Namespace) -> int:
    target = args.target.resolve()
    target.mkdir(parents=True, exist_ok=True)
    manifests = install_bundles(args.source.resolve(), target)
    for name in missing_on_machine(manifests):
        print(f"warning: the bundle relies on the machine's {name}, which this Python does not have")
    if args.check and not check([manifest["group"] for manifest in manifests], target):
        return 1
    print(f"export PYTHONPATH={target}${{PYTHONPATH:+:$PYTHONPATH}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="download, prune and pack (here, with PyPI)")
    build_parser.add_argument("--out", type=Path, required=True, help="folder for the equicsp-gpu-*.tar files to carry")
    build_parser.add_argument("--work", type=Path, help="downloads and the packing cache (default: OUT-work)")
    build_parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    build_parser.add_argument("--python-version", default="3.12", help="the GPU machine's CPython (3.11: a local smoke test)")
    build_parser.add_argument("--glibc-minor", type=int, default=28,
                              help="newest manylinux_2_N wheels the machine takes (its torch 2.11 is manylinux_2_28)")
    build_parser.add_argument("--budget-mib", type=float, default=50.0, help="what the bundle may take of the 64 MiB carry")
    build_parser.set_defaults(run=build)
    install_parser = commands.add_parser("install", help="unpack into one folder (there, no network)")
    install_parser.add_argument("--from", dest="source", type=Path, required=True, help="folder with equicsp-gpu-*.tar")
    install_parser.add_argument("--target", type=Path, default=Path(".gpu/site"), help="the folder to put on PYTHONPATH")
    install_parser.add_argument("--check", action="store_true", help="then import everything and start Ray once")
    install_parser.set_defaults(run=install)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
