"""Issue 24 on a GPU machine in prepared parts: the loop's rate, a paper-length Perov-5 training, Ray, precisions.

    benchmarks/gpu_prepare.sh                                       # here, once: data, caches, refbench in .gpu/
    .venv/bin/python benchmarks/gpu_bundle.py build --out .gpu/bundle   # here, for the ray part only
    python3 benchmarks/gpu_session.py train --out $OUT                # there; carry .gpu/data .gpu/cache
    .venv/bin/python benchmarks/gpu_match.py <files_at>/samples.pt    # here, afterwards: match rate and RMSE
    .venv/bin/python benchmarks/gpu_session.py loop,train,ray,precision --quick --out /tmp/gpu-dry-run   # a CPU dry run

Parts, comma-separated, run in the order given; each is meant to fit one call alone (the minutes are estimates
from benchmarks/results/gpu.md's step times and compile times, before any part ran on a GPU):
- train (about 6-7 min): `python -m equicsp.train --local --preset perov_5` on the 90 % split, compiled, for the
  preset's 3,500 epochs at batch 1024, timed from the command's start (compile included); then the 10 % split
  sampled on the GPU (k = 1, the preset's step size, every timestep) into samples.pt, and the loss curve from
  last.pt's history into loss_curve.json. Matching runs here afterwards (gpu_match.py): the machine has no pymatgen.
- loop (about 4-5 min): benchmarks/gpu.py's `TrainingLoop` sections at batch 256 and 1024: the epoch rate with
  validation and with checkpoints as `train` writes them against the compiled bare step, and the host syncs of
  an epoch counted with torch.cuda.set_sync_debug_mode.
- precision (about 4-5 min): benchmarks/gpu.py's `6x512 precisions` (TF32 and bf16 compiled, beside the public
  code) and `6x512 loss parity`.
- ray (installing the bundle, then about 7-8 min at 3,500 epochs; --ray-epochs shortens it): the same training
  through `python -m equicsp.train --gpu --num-workers 1` (Ray Train, NCCL, MLflow on a local SQLite store), then
  `python -m equicsp.evaluate --run-id` with its GPU sampling actor; carry .gpu/bundle too.
A device session has 15 minutes, start-up included: one call of the 600 s limit. Take the parts in this order,
one call each: train, loop (or loop,precision, which splits the call between them), ray, precision.
The device call: `python3 benchmarks/gpu_session.py train --out $OUT`, timeout_s 600, carry .gpu/data,
.gpu/cache, .gpu/refbench (and .gpu/bundle for ray).

Every command runs as its own process with a timeout (its process group is killed when it runs out), and the
parts share --budget-s: a part that has run out of time is written as not run. Results go to --out as they
finish: session.jsonl (one JSON object per result, flushed), session.log (every command's output), and the
parts' own files (loop.md, precision.md, precision_parity.json, samples.pt, loss_curve.json, best.pt): at most 8
files, as the device tool returns. Training runs write their checkpoints under /tmp (last.pt with Adam's state is
larger than a returned file may be).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ".gpu/data/perov_5_90_10"  # benchmarks/gpu_prepare.sh
CACHE = ".gpu/cache"
BUNDLE = ".gpu/bundle"  # benchmarks/gpu_bundle.py build
PARTS = ("loop", "precision", "train", "ray")
WORK = Path(tempfile.gettempdir()) / "equicsp-gpu-session"


class Session:
    """The output folder, the shared time budget, and the commands' environment."""

    def __init__(self, out: Path, budget_s: float, quick: bool):
        self.out, self.quick = out, quick
        self.deadline = time.monotonic() + budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.results = open(out / "session.jsonl", "a")  # noqa: SIM115  open for the whole session
        self.log_path = out / "session.log"
        self.log = open(self.log_path, "a")  # noqa: SIM115  open for the whole session
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "EQUICSP_CACHE_DIR": str(ROOT / CACHE), "PYTHONUNBUFFERED": "1"}

    def record(self, part: str, what: str, **fields) -> None:
        line = json.dumps({"part": part, "what": what, **fields, "at": time.strftime("%H:%M:%S")}, default=str)
        print(line, flush=True)
        self.results.write(line + "\n")
        self.results.flush()
        os.fsync(self.results.fileno())

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> tuple[int, float, str]:
        """(exit status, wall seconds, output) of a command in its own process group, killed at the timeout or at
        the budget's end, whichever comes first (status 124 then, as timeout(1) says it). The output goes straight
        into session.log, so a call stopped from outside still returns it."""
        timeout_s = max(1.0, min(timeout_s, self.left_s()))
        self.log.write(f"\n$ {' '.join(command)}   # timeout {timeout_s:.0f} s\n")
        self.log.flush()
        start = self.log_path.stat().st_size
        began = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=self.log.fileno(),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop(process)
            status = 124
        wall = time.perf_counter() - began
        with open(self.log_path, errors="replace") as log:
            log.seek(start)
            text = log.read()
        self.log.write(f"# exit {status} after {wall:.1f} s\n")
        self.log.flush()
        return status, wall, text


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (compile workers, Ray's processes), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(text: str, lines: int = 5) -> str:
    """The last lines of a command's output, progress bars (carriage returns) taken apart and blank ones dropped."""
    kept = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip() and "it/s]" not in line]
    return " | ".join(kept[-lines:])


def benchmark(session: Session, part: str, sections: str, timeout_s: float) -> None:
    """benchmarks/gpu.py's sections into out/<part>.md (rows written as they finish); gpu.py starts no section
    in the last 90 s of the timeout."""
    out = session.out / f"{part}.md"
    timeout_s = min(timeout_s, session.left_s())
    command = [sys.executable, "benchmarks/gpu.py", "--only", sections, "--out", str(out),
               "--refbench", str(ROOT / ".gpu" / "refbench"), "--budget-s", str(round(max(30, timeout_s - 90)))]
    if session.quick:
        command.append("--quick")
    status, wall, text = session.run(command, timeout_s)
    rows = [line for line in (out.read_text().splitlines() if out.exists() else [])
            if (line.startswith("| ") and not line.startswith("| what"))
            or line.startswith(("Loss parity", "Not run")) or " failed: " in line]
    session.record(part, f"benchmarks/gpu.py --only '{sections}'", status=status, wall_s=round(wall, 1), rows=rows,
                   output=tail(text) if status else "")


def training_command(session: Session, epochs: int | None, data: str = DATA) -> list[str]:
    """The config options every training of the session takes: the 90 % split, compiled, the preset's epochs.

    data: relative to the repository's root (the commands' working folder), so that samples.pt names a folder
    that gpu_match.py finds here too; Ray Train's workers run elsewhere and get it absolute."""
    preset = ["--preset", "smoke", "--run.compile", "off", "--optim.epochs", "2"] if session.quick else [
        "--preset", "perov_5", "--run.compile", "on"]
    if epochs and not session.quick:
        preset += ["--optim.epochs", str(epochs)]
    return preset + ["--data", data, "--run.log_every", "100"]


def history_of(checkpoint: Path) -> list[dict[str, float]]:
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=True).get("history", [])


def write_loss_curve(session: Session, part: str, checkpoint: Path) -> None:
    """The run's per-epoch losses (from last.pt) into out/loss_curve.json, and a summary line."""
    history = history_of(checkpoint)
    names = ("epoch", "train_total", "val_total", "lr", "epoch_time_s", "crystals_per_s")
    curve = {name: [row.get(name) for row in history] for name in names}
    (session.out / "loss_curve.json").write_text(json.dumps(curve) + "\n")
    if history:
        last = history[-1]
        late = history[len(history) // 2:]
        session.record(part, "loss curve", epochs=len(history), final_train=last["train_total"],
                       final_val=last["val_total"], best_val=min(row["val_total"] for row in history),
                       final_lr=last["lr"], device_s_training_passes=round(sum(row["epoch_time_s"] for row in history), 1),
                       crystals_per_s_second_half=round(sum(r["crystals_per_s"] for r in late) / len(late)),
                       file="loss_curve.json")


def train_part(session: Session, args: argparse.Namespace) -> None:
    run_dir = WORK / "train"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "equicsp.train", "--local", *training_command(session, args.epochs),
               "--out", str(run_dir), "--no-resume"]
    reserve = 60 if session.quick else args.sample_timeout  # sampling's time, kept back
    status, wall, text = session.run(command, min(args.train_timeout, session.left_s() - reserve))
    session.record("train", "python -m equicsp.train --local" + (" (quick: smoke preset, 2 epochs)" if session.quick
                   else ", perov_5, 90 % split, compiled"), status=status, wall_s=round(wall, 1),
                   finished=status == 0, output=tail(text, 3))
    if (run_dir / "last.pt").exists():
        write_loss_curve(session, "train", run_dir / "last.pt")
    if not (run_dir / "best.pt").exists():
        session.record("train", "sampling not run: no best.pt")
        return
    shutil.copy(run_dir / "best.pt", session.out / "best.pt")  # 10 MB at 4 x 256: to sample again here if need be
    command = [sys.executable, "benchmarks/gpu_sample.py", str(run_dir / "best.pt"), "--out",
               str(session.out / "samples.pt"), "--split", "test", "--num-samples", "1"]
    if session.quick:
        command += ["--limit", "4", "--num-steps", "10"]
    status, wall, text = session.run(command, args.sample_timeout)
    session.record("train", "sampling the 10 % split, k = 1 (benchmarks/gpu_sample.py)", status=status,
                   wall_s=round(wall, 1), output=tail(text, 2 if status == 0 else 5), file="samples.pt",
                   then="here: .venv/bin/python benchmarks/gpu_match.py <files_at>/samples.pt")


def logged_run(database: Path, name: str) -> str | None:
    """The MLflow run of that name in a SQLite store (a training stopped at its timeout prints no run id; its run
    holds the checkpoints logged so far)."""
    import sqlite3

    if not database.exists():
        return None
    with sqlite3.connect(database) as store:
        row = store.execute("SELECT run_uuid FROM runs WHERE name = ? ORDER BY start_time DESC", (name,)).fetchone()
    return row[0] if row else None


def ray_part(session: Session, args: argparse.Namespace) -> None:
    env = dict(session.env, RAY_ADDRESS="local")
    if session.quick:
        session.record("ray", "bundle not installed (quick: this machine's Ray and MLflow)")
    else:
        site = WORK / "site"
        status, wall, text = session.run([sys.executable, "benchmarks/gpu_bundle.py", "install", "--from", BUNDLE,
                                          "--target", str(site)], 240)
        session.record("ray", "gpu_bundle.py install", status=status, wall_s=round(wall, 1), output=tail(text, 3))
        if status:
            return
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(site)])
    shutil.rmtree(WORK / "ray", ignore_errors=True)
    uri = f"sqlite:///{WORK / 'ray' / 'mlflow.db'}"
    (WORK / "ray").mkdir(parents=True)
    command = [sys.executable, "-m", "equicsp.train", *training_command(session, args.ray_epochs, str(ROOT / DATA)),
               "--num-workers", "1", "--tracking-uri", uri, "--storage-path", str(WORK / "ray" / "storage"),
               "--run-name", "gpu-session", "--out", str(WORK / "ray" / "train")]
    if not session.quick:
        command.append("--gpu")
    reserve = 60 if session.quick else args.evaluate_timeout
    status, wall, text = session.run(command, min(args.train_timeout + 60, session.left_s() - reserve), env)
    found = re.search(r"MLflow run ([0-9a-f]{32})", text)
    run_id = found.group(1) if found else logged_run(WORK / "ray" / "mlflow.db", "gpu-session")
    session.record("ray", "python -m equicsp.train through Ray Train" + ("" if session.quick else " (--gpu, NCCL)"),
                   status=status, wall_s=round(wall, 1), run_id=run_id, output=tail(text, 3))
    if (WORK / "ray" / "train" / "last.pt").exists():
        history = history_of(WORK / "ray" / "train" / "last.pt")
        session.record("ray", "Ray run's history", epochs=len(history),
                       final_val=history[-1]["val_total"] if history else None)
    if not run_id:
        return
    command = [sys.executable, "-m", "equicsp.evaluate", "--run-id", run_id, "--tracking-uri", uri,
               "--num-samples", "1"]
    if session.quick:
        command += ["--limit", "4", "--num-steps", "10", "--workers", "1"]
    status, wall, text = session.run(command, args.evaluate_timeout, env)
    row = next((line for line in text.splitlines() if re.match(r"\| \d+ \| \d+ \|", line)), "")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    scores = dict(zip(("crystals", "k", "step_lr", "match_rate", "rmse", "valid", "workers", "startup_s",
                       "sampling_s", "matching_s"), cells)) if row else {}
    session.record("ray", "python -m equicsp.evaluate --run-id (Ray sampling actor, matching on Ray tasks)",
                   status=status, wall_s=round(wall, 1), **scores, output="" if row else tail(text, 5))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", help=f"comma-separated, in order: {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", WORK / "out")))
    parser.add_argument("--quick", action="store_true",
                        help="a dry run of every command on a CPU: smoke preset, 2 epochs, 4 crystals, 10 steps")
    parser.add_argument("--budget-s", type=float, default=540, help="no command runs past this (default 540)")
    parser.add_argument("--epochs", type=int, help="train: instead of the preset's 3,500")
    parser.add_argument("--ray-epochs", type=int, help="ray: instead of the preset's 3,500")
    parser.add_argument("--train-timeout", type=float, default=420)
    parser.add_argument("--sample-timeout", type=float, default=100)
    parser.add_argument("--evaluate-timeout", type=float, default=150)
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",")]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"no part {sorted(unknown)}; the parts: {', '.join(PARTS)}")
    session = Session(args.out, args.budget_s, args.quick)
    if not (ROOT / DATA / "train.csv").exists() and {"train", "ray"} & set(parts):
        session.record("session", f"no {DATA}: run benchmarks/gpu_prepare.sh here and carry .gpu/data .gpu/cache")
    import torch

    cuda = torch.cuda.is_available()
    session.record("session", "start", parts=parts, quick=args.quick, torch=torch.__version__,
                   device=torch.cuda.get_device_name() if cuda else "cpu", budget_s=args.budget_s)
    def share(part: str) -> float:
        """A benchmark part's time: at most 400 s, and no more than its share of what is left to the parts after."""
        return min(400, session.left_s() / (len(parts) - parts.index(part)))

    runs = {"loop": lambda: benchmark(session, "loop", "TrainingLoop,TrainingLoop preset batch", share("loop")),
            "precision": lambda: benchmark(session, "precision", "6x512 precisions,6x512 loss parity",
                                           share("precision")),
            "train": lambda: train_part(session, args), "ray": lambda: ray_part(session, args)}
    for part in parts:
        if session.left_s() < 30:
            session.record(part, "not run: the session's budget is spent")
            continue
        began = time.perf_counter()
        try:
            runs[part]()
        except Exception as error:  # the next part still runs
            session.record(part, "failed", error=f"{type(error).__name__}: {error}",
                           trace=traceback.format_exc().splitlines()[-3:])
        session.record(part, "done", wall_s=round(time.perf_counter() - began, 1))


if __name__ == "__main__":
    main()
