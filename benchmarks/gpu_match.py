"""Match crystals sampled on the GPU machine (gpu_sample.py's packed file) here: match rate and RMSE.

    .venv/bin/python benchmarks/gpu_match.py /work/.device/.../samples.pt [--data FOLDER] [--out scores.json]

The ground truth is the split the crystals were sampled from, read here (pymatgen) from the
folder the samples name (default) or --data; the crystals must be the same (their content keys
are compared). Scoring is `evaluate`'s: the benchmark protocol's validity, StructureMatcher and
best of k (evaluation.csp.score), in worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from gpu_sample import unpack

from equicsp.config import config_from_dict
from equicsp.data.splits import load_split
from equicsp.evaluation.csp import score

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("samples", type=Path, help="gpu_sample.py's file")
    parser.add_argument("--data", help="the dataset folder (default: the one the samples name, from the repository)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, help="also write the scores here (JSON)")
    args = parser.parse_args(argv)
    packed = torch.load(args.samples, weights_only=True)
    config = config_from_dict(packed["config"])
    folder = args.data or packed["data_path"]
    if not Path(folder).is_absolute() and not Path(folder).is_dir():
        folder = str(ROOT / folder)  # the GPU machine ran in the repository's root
    dataset = load_split(replace(config, data=replace(config.data, path=folder)), packed["split"], show_progress=False)
    if dataset.content_key() != packed["crystals_key"]:
        raise SystemExit(f"error: {folder}'s {packed['split']} split holds other crystals than those sampled")
    predictions = unpack(packed)
    indices = list(range(packed["num_crystals"]))
    summary, _ = score(dataset, indices, predictions, packed["num_samples"], args.processes, show_progress=False)
    scores = {"match_rate": summary.match_rate, "rmse": summary.rmse, "valid_rate": summary.valid_rate,
              "num_crystals": summary.num_crystals, "num_matched": summary.num_matched,
              "matcher_failures": summary.matcher_failures, "num_samples": packed["num_samples"],
              "num_steps": packed["num_steps"], "step_lr": packed["step_lr"], "checkpoint_epoch": packed["checkpoint_epoch"],
              "sampling_s": packed["sampling_s"], "device": packed["device"]}
    print(f"{summary.num_crystals} crystals of {packed['split']}, k = {packed['num_samples']}: match rate "
          f"{100 * summary.match_rate:.2f} %, RMSE {summary.rmse:.4f}, valid {100 * summary.valid_rate:.1f} % "
          f"(sampled on {packed['device']} in {packed['sampling_s']:.1f} s, {packed['num_steps']} steps, step_lr "
          f"{packed['step_lr']:g}, epoch {packed['checkpoint_epoch']}'s weights)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(scores, indent=1) + "\n")


if __name__ == "__main__":
    main()
