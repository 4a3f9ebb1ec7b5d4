"""The MLflow UI in a real browser: a sweep's store served by `mlflow server`, opened in headless Chromium.

The store is what a sweep leaves (a parent run with the report's artifacts, its training runs
as children named and tagged by arm), logged with the sweep's own functions rather than by
training, to keep the test short. Screenshots go to the test's temporary folder.
"""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FAST

from equicsp.config import make_config
from equicsp.platform import tracking
from equicsp.sweep.final import CellResult
from equicsp.sweep.report import ablation_table, write_sweep_report
from equicsp.sweep.spec import SweepSpec
from equicsp.sweep.trials import trial_run_name

ARMS = ("equicsp", "diffcsp")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sweep_store(folder: Path) -> tuple[str, str, str, dict[str, str]]:
    """(uri, experiment id, parent run id, arm -> child run name) of a two-arm sweep's store."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    spec = SweepSpec(name="ablation-smoke", preset="smoke", arms=ARMS)
    tracker = tracking.Tracker(uri)
    experiment = tracker.ensure_experiment("equicsp-sweeps")
    parent = tracker.start_sweep_run(experiment, "sweep", spec.name, {"sweep.name": spec.name})
    cells, names = [], {}
    for number, arm in enumerate(ARMS):
        names[arm] = trial_run_name(spec, arm, 0, f"0000{number}")
        run = tracker.start_training_run(experiment, make_config("smoke", arm, FAST), f"key-{arm}", names[arm],
                                         parent_run_id=parent, extra_tags={"arm": arm, "seed": "0"})
        tracker.log_metrics(run, {"val_match_rate": 0.2 + number / 10, "tuned_step_lr": 1e-4})
        tracker.client.set_terminated(run, "FINISHED")
        cells.append(CellResult(arm, 0, run, "", 1e-4, 0.2, 0.1 * number, 0.2, model_of=arm))
    write_sweep_report(cells, ablation_table(cells, spec), spec, uri, parent)
    return uri, experiment, parent, names


@pytest.fixture
def served(tmp_path):
    """A sweep's store behind `mlflow server` on a free port; the server is stopped afterwards."""
    uri, experiment, parent, names = sweep_store(tmp_path)
    port = free_port()
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115  the server writes to it until the test ends
    server = subprocess.Popen([str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", uri, "--artifacts-destination", str(tmp_path / "artifacts")],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(address + "/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(1)
        yield address, experiment, parent, names
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("needs Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def rendered_text(url: str, profile: Path, screenshot: Path) -> str:
    """The page's DOM once its scripts ran (15 s of virtual time), and a screenshot of it."""
    common = [browser(), *BROWSER_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout


class DevTools:
    """Just enough of the Chrome DevTools protocol over a WebSocket (RFC 6455, client side) to drive one page."""

    def __init__(self, websocket_url: str):
        host, _, path = websocket_url[len("ws://"):].partition("/")
        name, _, port = host.partition(":")
        self.socket = socket.create_connection((name, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall((f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.socket.recv(1)
        assert b" 101 " in response.split(b"\r\n")[0], response
        self.next_id = 0

    def _send(self, text: str) -> None:
        payload, mask = text.encode(), os.urandom(4)
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
        self.socket.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.socket.recv(count - len(data))
            assert chunk, "DevTools closed the connection"
            data += chunk
        return data

    def _receive(self) -> str:
        message = b""
        while True:
            first, second = self._exactly(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(self._exactly(2), "big")
            elif length == 127:
                length = int.from_bytes(self._exactly(8), "big")
            message += self._exactly(length)
            if first & 0x80:  # the final fragment
                return message.decode()

    def call(self, method: str, **params):
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._receive())
            if reply.get("id") == self.next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while not self.evaluate(expression):
            assert time.time() < deadline, f"the page never satisfied {expression}"
            time.sleep(0.5)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


@pytest.fixture
def devtools(tmp_path):
    """A headless Chromium with its DevTools port open, and a connection to its page."""
    profile = tmp_path / "devtools-profile"
    process = subprocess.Popen([browser(), *BROWSER_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (profile / "DevToolsActivePort").exists() or not (profile / "DevToolsActivePort").read_text().strip():
            assert time.time() < deadline and process.poll() is None, "Chromium did not open its DevTools port"
            time.sleep(0.2)
        port = (profile / "DevToolsActivePort").read_text().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(target for target in pages if target["type"] == "page")
        yield DevTools(page["webSocketDebuggerUrl"])
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.slow
def test_the_parent_run_lists_its_report_and_the_runs_view_shows_the_children_by_arm(served, devtools, tmp_path):
    address, experiment, parent, names = served
    run_page = f"{address}/#/experiments/{experiment}/runs/{parent}"
    # The printed address (Tracker.run_url) opens the run on model training, its children listed by name.
    page = rendered_text(run_page + "?workflowType=machine_learning", tmp_path / "p1", tmp_path / "parent_run.png")
    assert "Child runs" in page and all(name in page for name in names.values()), page[-2000:]
    artifacts = rendered_text(f"{run_page}/artifacts?workflowType=machine_learning", tmp_path / "p2",
                              tmp_path / "parent_artifacts.png")
    assert "ablation_table.md" in artifacts and "ablation_bars.png" in artifacts
    # The runs view: the children sit under their parent; unfold it and read the rows.
    devtools.call("Page.enable")
    devtools.call("Page.navigate", url=f"{address}/#/experiments/{experiment}?workflowType=machine_learning")
    devtools.wait_for("document.body.innerText.includes('ablation-smoke')")
    assert "No data available" not in devtools.evaluate("document.body.innerText"), "opened on the GenAI overview"
    devtools.wait_for("!!document.querySelector('button[data-component-id*=runnamecellrenderer]')")
    devtools.evaluate("document.querySelector('button[data-component-id*=runnamecellrenderer]').click()")
    devtools.wait_for(" && ".join(f"document.body.innerText.includes('{name}')" for name in names.values()))
    devtools.screenshot(tmp_path / "runs_view.png")
    text = devtools.evaluate("document.body.innerText")
    for arm, name in names.items():
        assert name.startswith(f"{arm}-s0-") and name in text


@pytest.mark.slow
def test_serve_sh_prints_the_address_once_the_server_answers_and_takes_a_port(tmp_path):
    script = Path(__file__).resolve().parents[1] / "mlflow" / "serve.sh"
    bad = subprocess.run(["bash", str(script), "--port", "x"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--port needs a number" in bad.stderr
    port = free_port()
    environment = {**os.environ, "EQUICSP_MLFLOW_DIR": str(tmp_path / "store")}
    server = subprocess.Popen(["bash", str(script), "--port", str(port)], stdout=subprocess.PIPE, text=True,
                              env=environment, start_new_session=True)
    try:
        line = server.stdout.readline()  # blocks until the script says the UI is up
        assert line.startswith(f"MLflow UI: http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning"), line
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)  # it answers already
        assert (tmp_path / "store" / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
