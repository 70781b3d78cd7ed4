"""Loading the whole text-to-image pipeline a steering run generates with, from the same specs as the adapter.

``shapes-diffusion`` is the zoo model; ``diffusers-text:FOLDER`` (or a bare
folder) is any Stable Diffusion 1.x/2.x or SDXL pipeline saved with
``save_pretrained``: the adapter of that spec reads only the text encoders,
steering needs the UNet and the autoencoder too. safetensors only, local files
only; a folder that is not a pipeline, or has no text encoder, is one line.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlsae.devices import resolve_device
from vlsae.errors import VlsaeError

from multimodal.adapters.diffusers_text import ENCODERS, resolve_pipeline
from multimodal.zoo.shapes_diffusion import quiet_loading
from multimodal.zoo import load_model

PREFIX = "diffusers-text:"


def load_pipeline(spec: str, device: str | torch.device = "cpu") -> Any:
    """The diffusers pipeline of ``spec`` (``shapes-diffusion`` or ``diffusers-text:FOLDER|ORG/REPO``), in eval
    mode on ``device``, progress bars off."""
    device = resolve_device(device)
    spec = spec.strip()
    if spec == "shapes-diffusion":
        pipe = load_model("shapes-diffusion", device=device)
    else:
        rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
        if not rest:
            raise VlsaeError("--pipeline needs shapes-diffusion or diffusers-text:FOLDER")
        folder = resolve_pipeline(rest)
        pipe = _from_folder(folder, device)
    if getattr(pipe, "text_encoder", None) is None:
        raise VlsaeError(f"{spec}: the pipeline has no text encoder to steer")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_folder(folder: Path, device: torch.device) -> Any:
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise VlsaeError(f"could not read {folder / 'model_index.json'}: {exc}") from None
    present = [name for name in ENCODERS if isinstance(index.get(name), list) and index[name][1] is not None]
    if not present or not (folder / "text_encoder").is_dir():
        raise VlsaeError(f"{folder} has no text encoder (model_index.json lists none of {', '.join(ENCODERS)}, "
                         f"or text_encoder/ is missing); steering edits a pipeline's text encoder")
    for part in ("unet", "vae", "scheduler"):
        if not (folder / part).is_dir():
            raise VlsaeError(f"{folder / part} is missing; generating images needs the whole pipeline "
                             f"(the diffusers-text adapter alone reads only the text encoders)")
    from diffusers import DiffusionPipeline

    try:
        with quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise VlsaeError(f"could not load the pipeline {folder}: {first} (vlsae reads safetensors weights only)") from None
    return pipe.to(device)


__all__ = ["load_pipeline"]
