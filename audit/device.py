"""Choosing the device: CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from audit.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but CUDA is not available here; use --device cpu or auto")
    return device
