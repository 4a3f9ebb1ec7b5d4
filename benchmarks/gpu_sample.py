"""Sample a split with a checkpoint and save the crystals as packed tensors, for matching elsewhere (gpu_match.py).

    python3 benchmarks/gpu_sample.py CHECKPOINT --out samples.pt [--split test] [--num-samples 1] [--num-steps N]

On the GPU machine, which has no pymatgen: the split is read from the dataset cache
(EQUICSP_CACHE_DIR, filled by benchmarks/gpu_prepare.sh). Sampling is `evaluate`'s: the
checkpoint's sampler settings (the preset's step size and every timestep unless --num-steps),
noise keyed by (seed, crystal index, sample number), so the same command on any device samples
the same crystals up to rounding. The file holds one tensor per field, concatenated over
crystals (atoms in crystal order), and what the matching needs to check it has the same crystals.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from equicsp.data.splits import load_split
from equicsp.devices import resolve_device
from equicsp.engine.checkpoint import model_from_checkpoint, read_checkpoint
from equicsp.engine.sampler import SampledCrystal, Sampler, with_sampler_options
from equicsp.model.diffusion import Diffusion


def pack(crystals: list[SampledCrystal]) -> dict[str, torch.Tensor]:
    """One tensor per field: (M,) indices and counts, (N,) atom types, (N, 3) coordinates, (M, 3) cells."""
    return {"composition_index": torch.tensor([c.composition_index for c in crystals], dtype=torch.long),
            "sample_index": torch.tensor([c.sample_index for c in crystals], dtype=torch.long),
            "num_atoms": torch.tensor([len(c.atom_types) for c in crystals], dtype=torch.long),
            "atom_types": torch.cat([c.atom_types.cpu() for c in crystals]),
            "frac_coords": torch.cat([c.frac_coords.cpu() for c in crystals]),
            "lengths": torch.stack([c.lengths.cpu() for c in crystals]),
            "angles": torch.stack([c.angles.cpu() for c in crystals])}


def unpack(packed: dict[str, torch.Tensor]) -> list[SampledCrystal]:
    """pack's inverse."""
    counts = packed["num_atoms"].tolist()
    types, coords = packed["atom_types"].split(counts), packed["frac_coords"].split(counts)
    return [SampledCrystal(int(index), int(sample), t, x, lengths, angles)
            for index, sample, t, x, lengths, angles in zip(packed["composition_index"], packed["sample_index"],
                                                            types, coords, packed["lengths"], packed["angles"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="best.pt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test", help="the split of the model's data.path to sample (default test)")
    parser.add_argument("--data", help="the dataset folder (default: the checkpoint's data.path)")
    parser.add_argument("--num-samples", type=int, default=1, help="k samples per composition")
    parser.add_argument("--num-steps", type=int, help="sampling steps (default: the checkpoint's, every timestep)")
    parser.add_argument("--limit", type=int, help="the first M crystals only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", choices=("auto", "on", "off"), help="default: the checkpoint's run.compile")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    device = resolve_device(args.device)
    stored = read_checkpoint(args.checkpoint)
    config, model = model_from_checkpoint(stored, device, args.checkpoint)
    config = with_sampler_options(config, num_steps=args.num_steps, compile=args.compile)
    dataset = load_split(config, args.split, args.data, show_progress=False)
    indices = list(range(len(dataset) if args.limit is None else min(args.limit, len(dataset))))
    sampler = Sampler(model, Diffusion(config, device), config, device)
    loaded = time.perf_counter()
    crystals = sampler.sample([dataset[i].atom_types for i in indices], args.num_samples, args.seed, indices=indices,
                              show_progress=False)
    sampled = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**pack(crystals), "config": stored["config"], "checkpoint_epoch": int(stored.get("epoch", -1)),
                "split": args.split, "data_path": args.data or config.data.path, "crystals_key": dataset.content_key(),
                "num_crystals": len(indices), "num_samples": args.num_samples, "seed": args.seed,
                "num_steps": sampler.num_steps(), "step_lr": config.sampler.step_lr, "sampling_s": sampled - loaded,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}, args.out)
    print(f"sampled {len(crystals)} crystals ({len(indices)} x {args.num_samples}) of {args.split} in "
          f"{sampled - loaded:.1f} s ({sampler.num_steps()} steps, step_lr {config.sampler.step_lr:g}, "
          f"{loaded - began:.1f} s to load) -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
