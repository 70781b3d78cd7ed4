"""Resumable training state, without pickle.

A run's ``checkpoint/`` folder holds

- ``sae.safetensors`` + ``config.json``: the SAE as :func:`vlsae.checkpoint.save_sae`
  writes it, in the trainer's *scaled* input space (the scale is folded in only
  at the end of the run);
- ``state.safetensors``: every tensor of the training state, by name:
  ``optimizer.<param index>.<name>`` (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``),
  ``last_fired`` (n_latents,) int64 (token count at each latent's last firing),
  ``rng_torch`` / ``rng_cuda`` (torch's uint8 generator states) and
  ``rng_numpy`` / ``rng_python`` (the Mersenne-Twister keys as uint8 bytes);
- ``state.json``: step, batches consumed (the data position), tokens seen,
  elapsed seconds, input scale(s), the scalar optimizer state and param groups,
  the RNG scalars and the train config the run started with.

Everything needed to continue a run bit-for-bit, and nothing executable.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlsae.files import atomic_save_tensors, atomic_write_text, read_safetensors
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
    """Inverse of :func:`optimizer_to_flat`."""
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
        raise VlsaeError(f"the checkpoint's optimizer state does not fit this SAE ({str(exc).splitlines()[0]}); "
                         "start a new run with another --out") from None


def _bytes(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(words, dtype=np.uint32).view(np.uint8).copy())


def _words(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.uint8).view(np.uint32)


def rng_to_flat(cuda: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The states of torch (CPU and, if used, CUDA), numpy and Python's ``random``."""
    tensors = {"rng_torch": torch.get_rng_state()}
    if cuda:
        tensors["rng_cuda"] = torch.cuda.get_rng_state()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng_numpy"] = _bytes(keys)
    version, internal, gauss_next = random.getstate()
    tensors["rng_python"] = _bytes(np.array(internal, dtype=np.uint64).astype(np.uint32))
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, gauss_next]}
    return tensors, meta


def rng_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng_torch"])
    if "rng_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng_cuda"])
    if "rng_numpy" in tensors and "numpy" in meta:
        kind, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((kind, _words(tensors["rng_numpy"]), pos, has_gauss, gauss))
    if "rng_python" in tensors and "python" in meta:
        version, gauss_next = meta["python"]
        random.setstate((version, tuple(int(w) for w in _words(tensors["rng_python"])), gauss_next))


def write_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    atomic_save_tensors(tensors, folder / STATE_TENSORS)
    atomic_write_text(folder / STATE_JSON, json.dumps(meta, indent=2))


def read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint folder; one-line errors for missing or damaged files."""
    tensors = read_safetensors(folder / STATE_TENSORS, what="training state")
    try:
        meta = json.loads((folder / STATE_JSON).read_text())
    except FileNotFoundError:
        raise VlsaeError(f"{folder} lacks {STATE_JSON}; the checkpoint is incomplete, start a new run with another --out") from None
    except json.JSONDecodeError as exc:
        raise VlsaeError(f"{folder / STATE_JSON} is damaged ({exc.msg}); start a new run with another --out") from None
    needed = [k for k in ("step", "tokens", "input_scale", "optimizer") if k not in meta]
    if needed or "last_fired" not in tensors or "rng_torch" not in tensors:
        raise VlsaeError(f"{folder} is not a complete vlsae training checkpoint (missing "
                         f"{(needed or ['last_fired/rng_torch'])[0]}); start a new run with another --out")
    return tensors, meta
