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

Everything needed to continue a run bit-for-bit, and nothing executable. The
functions that write a checkpoint, restore one and write the finished run live here too.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlsae.checkpoint import WEIGHTS, read_config, save_sae
from vlsae.config import to_dict
from vlsae.files import atomic_save_tensors, atomic_write_text, read_safetensors, replace_dir
from vlsae.errors import VlsaeError
from vlsae.saes.base import SAE
from vlsae.training.config import RESUME_KEYS, TrainConfig
from vlsae.training.preflight import CHECKPOINT_DIR, TRAINING_JSON

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


# -------------------------------------------------------------- checkpoints
def write_checkpoint(out: Path, sae: SAE, optimizer: torch.optim.Optimizer | None, last_fired: torch.Tensor, step: int,
                tokens: int, seconds: float, scales: float | dict[str, float], config: TrainConfig,
                device: torch.device, world_size: int = 1) -> None:
    """Write out/checkpoint atomically: build it in a temp folder, then swap it in.
    Everything in it is global (the same on every rank of a data-parallel run), so it
    resumes under any number of processes; ``world_size`` is recorded for information."""
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_sae(sae, tmp)
    tensors, opt_meta = optimizer_to_flat(optimizer) if optimizer is not None else ({}, {})
    rng_tensors, rng_meta = rng_to_flat(cuda=device.type == "cuda")
    tensors.update(rng_tensors)
    tensors["last_fired"] = last_fired.cpu()
    meta = {"step": step, "batches_consumed": step, "tokens": tokens, "seconds": seconds, "input_scale": scales,
            "optimizer": opt_meta, "rng": rng_meta, "train_config": to_dict(config), "world_size": world_size}
    write_state(tmp, tensors, meta)
    replace_dir(tmp, out / CHECKPOINT_DIR)


def restore_checkpoint(folder: Path, sae: SAE, optimizer: torch.optim.Optimizer | None, last_fired: torch.Tensor, config: TrainConfig,
             device: torch.device) -> tuple[int, int, float, float | dict[str, float]]:
    """Load a checkpoint into sae/optimizer/last_fired/RNGs; returns (step, tokens, seconds, scales)."""
    record = read_config(folder)
    if record["arch"] != sae.arch:
        raise VlsaeError(f"the checkpoint in {folder} is a '{record['arch']}' SAE, not '{sae.arch}'; resume with the same architecture")
    mine = to_dict(sae.config)
    for key, value in record["config"].items():
        if key != "hook" and key in mine and mine[key] != value:
            raise VlsaeError(f"the checkpoint in {folder} has sae.{key}={value}, but this run has {mine[key]}; "
                             "resume with the same settings or start a new run with another --out")
    tensors, meta = read_state(folder)
    saved = meta.get("train_config", {})
    now = to_dict(config)
    for key in RESUME_KEYS:
        if key in saved and saved[key] != now[key]:
            raise VlsaeError(f"the checkpoint in {folder} was trained with train.{key}={saved[key]}, not {now[key]}; "
                             "resume with the same settings or start a new run with another --out")
    weights = read_safetensors(folder / WEIGHTS, what="checkpoint weights")
    try:
        sae.load_state_dict(weights)
    except RuntimeError as exc:
        raise VlsaeError(f"the checkpoint in {folder} does not fit this SAE ({str(exc).splitlines()[0]}); "
                         "resume with the same settings") from None
    sae.to(device)
    if optimizer is not None:
        optimizer_from_flat(optimizer, tensors, meta["optimizer"])
    if tensors["last_fired"].shape != last_fired.shape:
        raise VlsaeError(f"the checkpoint in {folder} tracks {tensors['last_fired'].shape[0]} latents, not {last_fired.shape[0]}")
    last_fired.copy_(tensors["last_fired"].to(device))
    rng_from_flat(tensors, meta.get("rng", {}))
    return int(meta["step"]), int(meta["tokens"]), float(meta.get("seconds", 0.0)), meta["input_scale"]


def write_final(out: Path, sae: SAE, config: TrainConfig, summary: dict[str, Any], metadata: dict[str, Any] | None) -> None:
    """Final weights first, then training.json (which marks the run finished), then drop the checkpoint."""
    save_sae(sae, out, metadata={"input_scale_folded": True, **(metadata or {})})
    record = {"summary": summary, "input_scale": summary["input_scale"], "train_config": to_dict(config),
              "world_size": summary.get("world_size", 1), "metadata": metadata or {}}
    atomic_write_text(out / TRAINING_JSON, json.dumps(record, indent=2, default=str))
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
