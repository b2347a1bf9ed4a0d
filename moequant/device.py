"""Choosing the torch device from what the user asked for."""

from __future__ import annotations

import torch

from moequant.errors import MoequantError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; refuses CUDA where there is none."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MoequantError(f"unknown device {device!r}; use auto, cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoequantError(f"device {device} was asked for but no CUDA device is available; use cpu")
    return dev
