"""benchmarks/gpu_bundle.py: wheels unpack as pip would, pruned; a packed bundle installs into one importable
folder without touching the machine's own packages. Fake wheels built here: no network."""

import json
import lzma
import os
import runpy
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = runpy.run_path(str(ROOT / "benchmarks" / "gpu_bundle.py"), run_name="imported")
HERE = f"{sys.version_info.major}.{sys.version_info.minor}"


def fake_wheel(folder: Path, name: str = "fakepkg", version: str = "1.0") -> Path:
    """A wheel with a module, a pruneable folder, an executable, a purelib extra and a script."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        archive.writestr(f"{name}/jars/big.jar", b"\0" * 1000)
        tool = zipfile.ZipInfo(f"{name}/bin/tool")
        tool.external_attr = 0o755 << 16
        archive.writestr(tool, "#!/bin/sh\necho hi\n")
        library = bytes(range(256)) * 400  # 100 KiB under two names, as spglib ships its library
        archive.writestr(f"{name}/libfake.so", library)
        archive.writestr(f"{name}/libfake.so.1", library)
        archive.writestr(f"{name}-{version}.data/purelib/{name}_extra.py", "EXTRA = 1\n")
        archive.writestr(f"{name}-{version}.data/scripts/{name}-cli", "#!python\n")
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return wheel


def test_a_wheel_unpacks_as_pip_would_less_the_pruned_paths(tmp_path):
    stage = tmp_path / "site"
    BUNDLE["unpack_wheel"](fake_wheel(tmp_path), stage, ("fakepkg/jars/*",))
    assert (stage / "fakepkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (stage / "fakepkg_extra.py").exists(), "a .data/purelib file lands in site-packages itself"
    assert not (stage / "fakepkg" / "jars").exists()
    assert os.access(stage / "fakepkg" / "bin" / "tool", os.X_OK), "Ray's raylet and GCS server must stay executable"
    assert sorted(path.name for path in stage.iterdir()) == ["fakepkg", "fakepkg-1.0.dist-info", "fakepkg_extra.py"]


def test_the_prune_rules_drop_rays_java_rllib_and_pyarrows_copies_but_keep_what_loads():
    ray, pyarrow = BUNDLE["PRUNE"]["ray"], BUNDLE["PRUNE"]["pyarrow"]
    pruned = BUNDLE["is_pruned"]
    assert all(pruned(path, ray) for path in ("ray/jars/ray_dist.jar", "ray/rllib/env/env.py", "ray/serve/api.py",
                                              "ray/dashboard/client/build/index.html"))
    assert not any(pruned(path, ray) for path in ("ray/train/__init__.py", "ray/data/block.py", "ray/_raylet.so",
                                                  "ray/core/src/ray/raylet/raylet", "ray/dashboard/modules/job/job_head.py"))
    assert all(pruned(path, pyarrow) for path in ("pyarrow/libarrow_flight.so.1700", "pyarrow/_flight.cpython-312-x86_64.so",
                                                  "pyarrow/_gcsfs.cpython-312-x86_64.so", "pyarrow/include/arrow/api.h",
                                                  "pyarrow/lib.pyx"))
    # pyarrow 17 links libarrow_python.so by its bare name, 26 by libarrow_python.so.2600: every name stays
    assert not any(pruned(path, pyarrow) for path in ("pyarrow/libarrow.so.1700", "pyarrow/libarrow_python.so",
                                                      "pyarrow/libarrow_python.so.1700", "pyarrow/_s3fs.cpython-312-x86_64.so",
                                                      "pyarrow/fs.py", "pyarrow-17.0.0.dist-info/METADATA"))


def test_the_machines_packages_are_recognised_whatever_their_spelling():
    on_machine = BUNDLE["on_machine"]
    assert all(map(on_machine, ("torch", "torch_geometric", "PyYAML", "nvidia-cublas-cu12", "NumPy")))
    assert not any(map(on_machine, ("ray", "mlflow-skinny", "pyarrow", "packaging", "typing-extensions")))
    assert BUNDLE["wheel_name"](Path("PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl")) == ("pyyaml", "6.0.4")


def test_the_dictionary_covers_the_package_and_native_code_gets_the_x86_filter():
    filters = BUNDLE["xz_filters"](100 * 2**20, True)
    assert [f["id"] for f in filters] == [lzma.FILTER_X86, lzma.FILTER_LZMA2] and filters[1]["dict_size"] == 128 * 2**20
    assert BUNDLE["xz_filters"](1000, False)[0]["dict_size"] == 8 * 2**20
    assert BUNDLE["xz_filters"](2**31, False)[0]["dict_size"] == 256 * 2**20


def test_a_built_bundle_installs_into_one_importable_folder_leaving_the_machines_packages_alone(tmp_path, capsys):
    wheels = [fake_wheel(tmp_path), fake_wheel(tmp_path, "numpy", "9.9"), fake_wheel(tmp_path, "plotly", "7.0")]
    out, work, target = tmp_path / "out", tmp_path / "work", tmp_path / "site"
    out.mkdir()
    manifest = BUNDLE["write_group"]("train", wheels, out, work, HERE)
    assert [package["name"] for package in manifest["packages"]] == ["fakepkg"]
    assert manifest["relies_on_machine"] == ["numpy"] and manifest["left_out"][0]["name"] == "plotly"

    assert BUNDLE["main"](["install", "--from", str(out), "--target", str(target)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"export PYTHONPATH={target}${{PYTHONPATH:+:$PYTHONPATH}}"
    assert sorted(path.name for path in target.iterdir()) == ["fakepkg", "fakepkg-1.0.dist-info", "fakepkg_extra.py"]
    assert os.access(target / "fakepkg" / "bin" / "tool", os.X_OK)
    copy, original = target / "fakepkg" / "libfake.so.1", target / "fakepkg" / "libfake.so"
    assert copy.is_symlink() and copy.read_bytes() == original.read_bytes(), "an identical large file is packed once"
    assert BUNDLE["main"](["install", "--from", str(out), "--target", str(target)]) == 0, "installing again works"
    imported = subprocess.run([sys.executable, "-c", "import fakepkg, fakepkg_extra; print(fakepkg.VALUE)"],
                              env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "42"
    with tarfile.open(out / "equicsp-gpu-train.tar") as bundle:
        assert json.load(bundle.extractfile("manifest.json"))["packages"][0]["member"] == "packages/fakepkg-1.0.tar.xz"


def test_install_refuses_a_bundle_built_for_another_python(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    BUNDLE["write_group"]("train", [fake_wheel(tmp_path)], out, tmp_path / "work", "3.1")
    with pytest.raises(SystemExit, match="Python 3.1, this is"):
        BUNDLE["install_bundles"](out, tmp_path / "site")
