"""SAE checkpoints: a folder with ``sae.safetensors`` and ``config.json``.

The folder is self-describing and loads without any trainer state:
``config.json`` holds ``{"arch": name, "config": {...}, "format": 1}`` plus any
metadata the caller adds; tensors keep their module names (``W_enc``, ``b_enc``,
``W_dec``, ``b_dec`` and architecture extras such as ``threshold``). Writes go to
a temporary sibling folder that is renamed into place, so a crash never leaves
a half-written checkpoint where a good one was.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlsae.alignment import PROJECTOR_WEIGHTS, AlignedSAE, ContrastiveProjector
from vlsae.config import to_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_save_tensors, atomic_write_text, read_safetensors
from vlsae.saes import SAE, create_sae, is_multimodal_arch

WEIGHTS = "sae.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def save_sae(sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` to the folder ``path`` atomically; returns the path.

    Other files already in ``path`` (logs, a training summary) are kept.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    atomic_save_tensors(tensors, path / WEIGHTS, metadata={"arch": sae.arch})
    record = {"format": FORMAT_VERSION, "arch": sae.arch, "config": to_dict(sae.config)}
    if metadata:
        record["metadata"] = metadata
    atomic_write_text(path / CONFIG, json.dumps(record, indent=2))
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise VlsaeError(f"checkpoint not found: {path}")
    if path.is_file():
        raise VlsaeError(f"{path} is a file; a checkpoint is a folder with {WEIGHTS} and {CONFIG}")
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise VlsaeError(f"{path} has no {CONFIG}; is it a vlsae checkpoint folder?")
    try:
        record = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise VlsaeError(f"{cfg_path} is not valid JSON ({exc.msg}); the checkpoint is damaged") from None
    if not isinstance(record, dict) or "arch" not in record or "config" not in record:
        raise VlsaeError(f"{cfg_path} lacks 'arch' or 'config'; not a vlsae SAE checkpoint")
    return record


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Rebuild an SAE from a checkpoint folder written by :func:`save_sae`.

    When the folder also holds an alignment stage (``projector.safetensors``),
    the SAE comes back wrapped in :class:`vlsae.alignment.AlignedSAE`, which
    projects raw activations in and maps reconstructions back out.
    """
    path = Path(path)
    record = read_config(path)
    config = dict(record["config"])
    if not is_multimodal_arch(record["arch"]) and not config.get("modalities", True):
        del config["modalities"]  # single-stream checkpoints of vlsae 0.1 recorded an empty modality list
    sae = create_sae(record["arch"], config)
    tensors = read_safetensors(path / WEIGHTS, what="SAE weights")
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise VlsaeError(f"{path / WEIGHTS} does not match its config (missing {missing}, unexpected {unexpected})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise VlsaeError(f"{path / WEIGHTS}: tensor '{name}' has shape {tuple(tensor.shape)}, config says {tuple(expected[name].shape)}")
    sae.load_state_dict(tensors)
    sae = sae.to(device)
    if (path / PROJECTOR_WEIGHTS).exists():
        return AlignedSAE(sae, ContrastiveProjector.load(path).to(device))  # type: ignore[return-value]
    return sae
