"""Which Ray a command uses: the cluster it is asked to join, the one `ray start` registered, else a private one."""

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from equicsp.platform import ray_cluster
from equicsp.platform.ray_cluster import RayChoice, choose_ray, connect_ray


@pytest.fixture
def short_ray_tmpdir(monkeypatch):
    """Ray's address file in a folder of this test's own (short: Ray puts sockets under it)."""
    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    (folder / "ray").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return folder / "ray" / "ray_current_cluster"


def test_a_cluster_is_joined_only_when_asked_or_registered_by_ray_start(short_ray_tmpdir, monkeypatch):
    from ray._private import services

    assert choose_ray() == RayChoice(None, "")
    assert choose_ray("10.0.0.5:6379").address == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6379")
    assert choose_ray().address == "10.0.0.6:6379" and choose_ray("10.0.0.5:6379").address == "10.0.0.5:6379"
    assert choose_ray("local") == RayChoice(None, "")
    monkeypatch.delenv("RAY_ADDRESS")
    short_ray_tmpdir.write_text("127.0.0.1:6390")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())
    stale = choose_ray()
    assert stale.address is None and "not running any more" in stale.reason
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset({"127.0.0.1:6390"}))
    assert choose_ray() == RayChoice("127.0.0.1:6390", "registered by `ray start` on this machine", registered=True)


def test_a_ray_found_running_on_the_machine_is_not_joined(monkeypatch, capsys):
    """Another user's or a test suite's Ray (started by ray.init, not registered) is left alone."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster, "registered_cluster", lambda: (None, ""))
    foreign = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys, time; ray.init(num_cpus=1, include_dashboard=False, "
         "logging_level='ERROR'); print(ray.get_runtime_context().gcs_address, flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True)
    try:
        foreign_address = foreign.stdout.readline().strip()
        assert foreign_address, "the foreign Ray did not start"
        connect_ray()
        try:
            assert ray.get_runtime_context().gcs_address != foreign_address
        finally:
            ray.shutdown()
    finally:
        foreign.terminate()
        foreign.wait(timeout=60)
    assert "equicsp: started a private Ray on this machine" in capsys.readouterr().err
