"""Checkpoints: the model's weights with its config, and the optimiser state for resuming.

Saved as plain tensors and containers, so `torch.load(weights_only=True)` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from equicsp.config import Config, config_from_dict
from equicsp.data.cache import save_atomically, weights_only_refusal
from equicsp.model.denoiser import FrameAveraged, build_denoiser


class CheckpointError(ValueError):
    pass


def unwrap(model: nn.Module) -> nn.Module:
    """The CSPNet inside DDP and Frame-Average wrappers: what the weights belong to."""
    while isinstance(model, (FrameAveraged, nn.parallel.DistributedDataParallel)):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model.network
    return model


def save_checkpoint(path: Path, config: Config, model: nn.Module, **state: Any) -> None:
    save_weights(path, config, unwrap(model).state_dict(), **state)


def save_weights(path: Path, config: Config, weights: dict[str, torch.Tensor], **state: Any) -> None:
    """A checkpoint of these weights (a state dict of the unwrapped model)."""
    save_atomically({"config": config.to_dict(), "model": weights, **state}, Path(path))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        stored = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        refusal = weights_only_refusal(error)
        if refusal:
            raise CheckpointError(f"{path}: refused: {refusal}") from None
        raise CheckpointError(f"{path}: not a readable equicsp checkpoint ({error})") from None
    if not isinstance(stored, dict) or "config" not in stored or "model" not in stored:
        raise CheckpointError(f"{path}: not an equicsp checkpoint (no config or model)")
    return stored


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """The checkpoint's weights into model; a CheckpointError naming what does not fit, not torch's traceback."""
    expected = unwrap(model).state_dict()
    problems = [f"{name} has shape {tuple(weights[name].shape)}, the config wants {tuple(value.shape)}"
                for name, value in expected.items() if name in weights and weights[name].shape != value.shape]
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    if missing:
        problems.append(f"{len(missing)} weights missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} weights the config has no place for "
                        f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointError(f"{source}: the weights do not fit its config: {shown}")
    unwrap(model).load_state_dict(weights)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Config, nn.Module]:
    """The config and the denoiser (Frame-Averaged when the config says so) of a checkpoint."""
    return model_from_checkpoint(read_checkpoint(path, device), device, source=path)


def model_from_checkpoint(stored: dict[str, Any], device: str | torch.device = "cpu",
                          source: str | Path = "checkpoint") -> tuple[Config, nn.Module]:
    """(config, eval-mode denoiser) from a checkpoint already read into memory."""
    config = config_from_dict(stored["config"])
    model = build_denoiser(config)
    load_weights(model, stored["model"], source)
    return config, model.to(device).eval()
