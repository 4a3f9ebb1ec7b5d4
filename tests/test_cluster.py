"""The cluster launcher configs: valid for Ray's schema offline, and usable by `ray submit` on a real cluster."""

import copy
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent


def validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_launcher_configs_validate_against_rays_schema(name):
    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate(config)
    broken = dict(config, head_node_typo="head")
    with pytest.raises(Exception, match="head_node_typo"):
        validate(broken)


def test_the_gpu_cluster_gives_explicit_resources_and_installs_the_project():
    config = yaml.safe_load((ROOT / "cluster" / "gpu.yaml").read_text())
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"].get("GPU", 0) == 0, "a CPU head"
    workers = [node for name, node in nodes.items() if name != config["head_node_type"]]
    assert workers and all(node["resources"]["GPU"] >= 1 and node["max_workers"] > node.get("min_workers", 0)
                           for node in workers), "autoscaling GPU workers with explicit resources"
    assert "." in config["file_mounts"].values()
    assert any("pip install" in command and "equicsp[cluster]" in command for command in config["setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in head_start and "s3://" in head_start
    assert any("MLFLOW_TRACKING_URI" in command for command in config["worker_start_ray_commands"])


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_no_server_listens_on_every_address_and_no_password_is_written_down(name):
    import re

    text = (ROOT / "cluster" / name).read_text()
    commands = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for wildcard in ("0.0.0.0", "[::]", "--host ::", "--dashboard-host=::"):
        assert not any(wildcard in line for line in commands), f"{name} binds {wildcard}"
    assert not re.search(r"PASSWORD\s+'(?!%s')[^']*'", text, re.IGNORECASE), f"{name} holds a literal SQL password"
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), f"{name} puts a password in a URI"
    config = yaml.safe_load(text)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "Ray's dashboard (its job API runs any code) on loopback only"
    assert re.search(r"mlflow server\s+--host \$\(hostname -I", head_start), "MLflow on the head's private address"


def free_port_22() -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", 22)) != 0


@pytest.fixture
def ssh_to_this_machine(tmp_path):
    """Key login as this user on 127.0.0.1:22 (a private sshd), with this environment's python first on
    the login shell's PATH: what Ray's local provider needs of a host. Everything is undone afterwards."""
    import getpass
    import importlib.util
    import shutil
    import signal
    import subprocess
    import sys

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ValueError:  # imported already, by Ray, without a __spec__
            return name in sys.modules

    if not all(installed(name) for name in ("aiohttp_cors", "colorful")):
        message = "needs Ray's cluster launcher: pip install -e '.[cluster]' (ray[default])"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists() or not shutil.which("rsync"):
        message = "needs sshd and rsync (apt-get install openssh-server rsync)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if not free_port_22():
        pytest.skip("port 22 is taken: the local provider needs it for its own sshd")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host_key")], check=True)
    (tmp_path / "authorized_keys").write_text((tmp_path / "id_ed25519.pub").read_text())
    config = tmp_path / "sshd_config"
    config.write_text("\n".join([
        "Port 22", "ListenAddress 127.0.0.1", f"HostKey {tmp_path / 'host_key'}", f"PidFile {tmp_path / 'sshd.pid'}",
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}", "PasswordAuthentication no", "UsePAM no",
        "StrictModes no", "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)
    subprocess.run([sshd, "-f", str(config)], check=True)
    bashrc = Path.home() / ".bashrc"
    original = bashrc.read_text() if bashrc.exists() else None
    bashrc.write_text((original or "") + f"\nexport PATH={Path(sys.executable).parent}:$PATH\n")
    try:
        yield getpass.getuser(), key
    finally:
        if original is None:
            bashrc.unlink()
        else:
            bashrc.write_text(original)
        pid = (tmp_path / "sshd.pid").read_text().strip()
        subprocess.run(["pkill", "-TERM", "-P", pid], check=False)  # sessions Ray left open
        os.kill(int(pid), signal.SIGTERM)


@pytest.mark.slow
def test_ray_submit_runs_the_smoke_sweep_on_a_real_cluster(ssh_to_this_machine, tmp_path):
    """`ray up` + `ray submit cluster/local.yaml sweeps/ablation.py -- --profile smoke` on this machine as the head."""
    import subprocess
    import sys

    from test_sweep import TINY, runs_of_kind

    from equicsp.platform import tracking

    user, key = ssh_to_this_machine
    config = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    config.update(cluster_name=f"equicsp-test-{os.getpid()}", min_workers=0, max_workers=0,
                  provider={"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
                  auth={"ssh_user": user, "ssh_private_key": str(key)},
                  # This machine has the project installed already (its venv is first on the login PATH).
                  file_mounts={}, setup_commands=[], head_setup_commands=[],
                  head_start_ray_commands=["ray start --head --port=6390 --num-cpus=2 --disable-usage-stats "
                                           "--autoscaling-config=~/ray_bootstrap_config.yaml"],
                  worker_start_ray_commands=[])
    validate(config)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(config))
    ray_cli = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    up = subprocess.run([ray_cli, "up", "-y", "--no-config-cache", str(cluster)], capture_output=True, text=True,
                        timeout=300, env=env)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        args = ["--arms", "equicsp", "diffcsp", "--storage-path", str(tmp_path / "ray"), "--tracking-uri", uri,
                *[arg for pair in TINY for arg in ("--set", pair)]]
        submit = subprocess.run([ray_cli, "submit", "--no-config-cache", str(cluster),
                                 str(ROOT / "sweeps" / "ablation.py"), "--", "--profile", "smoke", *args],
                                capture_output=True, text=True, timeout=900, env=env)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "| EquiCSP |" in submit.stdout and "| DiffCSP |" in submit.stdout
        [parent] = runs_of_kind(uri, "sweep")
        assert parent.info.status == "FINISHED"
        assert sorted(run.data.tags["arm"] for run in runs_of_kind(uri, "evaluation")) == ["diffcsp", "equicsp"]
        assert tracking.Tracker(uri).get_run(parent.info.run_id).data.metrics.keys() >= {"equicsp/match_rate",
                                                                                         "diffcsp/match_rate"}
    finally:
        subprocess.run([ray_cli, "down", "-y", "--no-config-cache", str(cluster)], capture_output=True, timeout=300,
                       env=env)
        # The local provider's `ray down` leaves the head's processes running; the head is this machine.
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120, env=env)
        (Path.home() / "ablation.py").unlink(missing_ok=True)  # where `ray submit` put the script
