"""Which torch device a run uses: the one place that turns "auto", "cpu", "cuda:1" into a device."""
from __future__ import annotations

import torch

from vlsae.errors import VlsaeError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; a CUDA request without CUDA is a user error."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except (RuntimeError, ValueError):
        raise VlsaeError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise VlsaeError(f"device '{device}' asked for, but this machine has no CUDA device; use --device cpu or auto")
    return resolved
