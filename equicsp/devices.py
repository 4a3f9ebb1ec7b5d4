"""Choosing the device at run time: CUDA when present and asked for, else the CPU."""

from __future__ import annotations

import torch


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the network's matmuls when precision is bf16; a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available here")
    return device
