"""Checkpoints: the model's weights with its config, and the optimiser state for resuming.

Saved as plain tensors and containers, so `torch.load(weights_only=True)` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from equicsp.cache import save_atomically
from equicsp.config import Config, config_from_dict
from equicsp.denoiser import FrameAveraged, build_denoiser


class CheckpointError(ValueError):
    pass


def unwrap(model: nn.Module) -> nn.Module:
    """The CSPNet inside DDP and Frame-Average wrappers: what the weights belong to."""
    while isinstance(model, (FrameAveraged, nn.parallel.DistributedDataParallel)):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model.network
    return model


def save_checkpoint(path: Path, config: Config, model: nn.Module, **state: Any) -> None:
    save_atomically({"config": config.to_dict(), "model": unwrap(model).state_dict(), **state}, Path(path))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        stored = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable equicsp checkpoint ({error})") from None
    if not isinstance(stored, dict) or "config" not in stored or "model" not in stored:
        raise CheckpointError(f"{path}: not an equicsp checkpoint (no config or model)")
    return stored


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Config, nn.Module]:
    """The config and the denoiser (Frame-Averaged when the config says so) of a checkpoint."""
    return model_from_checkpoint(read_checkpoint(path, device), device)


def model_from_checkpoint(stored: dict[str, Any], device: str | torch.device = "cpu") -> tuple[Config, nn.Module]:
    """(config, eval-mode denoiser) from a checkpoint already read into memory."""
    config = config_from_dict(stored["config"])
    model = build_denoiser(config)
    unwrap(model).load_state_dict(stored["model"])
    return config, model.to(device).eval()
