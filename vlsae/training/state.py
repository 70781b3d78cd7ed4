"""Resumable training state, without pickle.

A checkpoint folder holds the SAE as :func:`vlsae.checkpoint.save_sae` writes it
(in the trainer's scaled input space), plus ``state.safetensors`` (optimizer
moments, RNG state, per-latent last-fired counters) and ``state.json`` (step,
rows seen, input scales, optimizer hyperparameters). Everything needed to
continue a run bit-for-bit, and nothing executable.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlsae.checkpoint import atomic_save_tensors, atomic_write_text, read_safetensors
from vlsae.errors import VlsaeError

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into named tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optimizer."):
            continue
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise VlsaeError(f"the checkpoint's optimizer state does not fit this SAE ({exc}); start a new run with another --out") from None


def write_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    atomic_save_tensors(tensors, folder / STATE_TENSORS)
    atomic_write_text(folder / STATE_JSON, json.dumps(meta, indent=2))


def read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = read_safetensors(folder / STATE_TENSORS, what="training state")
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
    except FileNotFoundError:
        raise VlsaeError(f"{folder} lacks {STATE_JSON}; the checkpoint is incomplete, start a new run") from None
    except json.JSONDecodeError as exc:
        raise VlsaeError(f"{folder / STATE_JSON} is damaged ({exc.msg}); start a new run") from None
    return tensors, meta
