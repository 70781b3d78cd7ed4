"""``vlsae darkmatter``: the dark-matter analysis of one or more SAEs on activations, with its report.

Inputs: SAE run folders (``--sae``, one or several sizes) and activations
(``--data``: an activation cache, or a ``.safetensors``/``.npy`` tensor file).
Each SAE encodes and decodes the first ``max_rows`` rows; a multimodal SAE
(``vl``) is analysed per modality with its own decoder, a single-stream SAE on
the modality it was trained on (``--modality``, else the one its run recorded,
else the data's only one). Everything is checked (SAEs load, widths fit,
modalities exist, the output folder is writable) before any rows are encoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from multimodal.cache import MANIFEST, ActivationCache
from vlsae.checkpoint import load_sae
from vlsae.errors import VlsaeError
from vlsae.files import check_writable_dir
from vlsae.saes.base import SAE
from vlsae.training.data import open_tensor_file

from evals.darkmatter.analysis import dark_matter, error_norm_agreement
from evals.darkmatter.report import write_report

ENCODE_ROWS = 2048


@dataclass
class LoadedSAE:
    path: str
    sae: SAE
    modalities: list[str]  # the modalities this SAE is analysed on ("" for a single tensor)


def _trained_modality(path: Path) -> str | None:
    run_yaml = path / "run.yaml"
    if not run_yaml.is_file():
        return None
    try:
        record = yaml.safe_load(run_yaml.read_text()) or {}
    except yaml.YAMLError:
        return None
    return (record.get("data") or {}).get("modality")


def load_rows(data: str | Path, modalities: Sequence[str], max_rows: int) -> dict[str, torch.Tensor]:
    """modality -> (rows, d) float32: the first ``max_rows`` rows of each requested modality ("" for a tensor file)."""
    path = Path(data)
    if (path / MANIFEST).is_file():
        out = {}
        for m in modalities:
            rows = ActivationCache(path, modality=m).read_all()
            assert isinstance(rows, torch.Tensor)
            out[m] = rows[:max_rows].float()
        return out
    source = open_tensor_file(path)
    if isinstance(source.data, dict):
        return {m: source.data[m][:max_rows].float() for m in modalities}
    return {"": source.data[:max_rows].float()}


def data_modalities(data: str | Path) -> list[str]:
    """The modalities the data holds ([""] for a single tensor)."""
    path = Path(data)
    if not path.exists():
        raise VlsaeError(f"--data not found: {path}; give an activation cache or a .safetensors/.npy file")
    if (path / MANIFEST).is_file():
        return list(ActivationCache(path).modalities)
    source = open_tensor_file(path)
    return list(source.d_in) if isinstance(source.d_in, dict) else [""]


def open_saes(paths: Sequence[str], data_mods: list[str], modality: str | None, widths: dict[str, int]) -> list[LoadedSAE]:
    """Load every SAE and decide which modalities it is analysed on (one-line errors for a mismatch)."""
    loaded = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise VlsaeError(f"--sae not found: {path}")
        sae = load_sae(path)
        if sae.modalities:
            mods = [modality] if modality else [m for m in sae.modalities if m in data_mods]
            missing = [m for m in mods if m not in sae.modalities or m not in data_mods]
            if not mods or missing:
                raise VlsaeError(f"{path} is a {sae.arch} SAE over {', '.join(sae.modalities)}, but the data holds "
                                 f"{', '.join(m or 'one tensor' for m in data_mods)}")
        else:
            choice = modality or _trained_modality(path) or (data_mods[0] if len(data_mods) == 1 else None)
            if choice is None:
                raise VlsaeError(f"the data holds {', '.join(data_mods)}; say which modality {path} was trained on "
                                 "with --modality")
            if choice not in data_mods:
                raise VlsaeError(f"{path} was trained on modality '{choice}', which the data does not hold "
                                 f"(it has {', '.join(m or 'one tensor' for m in data_mods)})")
            mods = [choice]
        for m in mods:
            if widths[m] != sae.d_in:
                raise VlsaeError(f"{path} takes width {sae.d_in}, but the data's {m or 'tensor'} rows have width {widths[m]}")
        loaded.append(LoadedSAE(str(path), sae.eval(), mods))
    return loaded


@torch.no_grad()
def reconstruct(sae: SAE, x: torch.Tensor, modality: str) -> torch.Tensor:
    """decode(encode(x)) in batches (a single-stream SAE ignores the modality)."""
    m = modality or None
    return torch.cat([sae.decode(sae.encode(x[i:i + ENCODE_ROWS], m), m).float() for i in range(0, x.shape[0], ENCODE_ROWS)])


def run_darkmatter(saes: Sequence[str], data: str, out: str, modality: str | None = None, max_rows: int = 20_000,
                   held_out: float = 0.5, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """The analysis of every SAE (and, for two or more, the error-norm agreement of each consecutive pair by
    size) on ``data``; writes ``out``/results.json, index.html and the PNG figures. Returns the results."""
    if not saes:
        raise VlsaeError("give at least one --sae")
    if max_rows < 8:
        raise VlsaeError(f"--max-rows must be at least 8, got {max_rows}")
    if not 0 < held_out < 1:
        raise VlsaeError(f"--held-out is the fraction of rows the fits are tested on: give a value in (0, 1), not {held_out}")
    folder = check_writable_dir(out)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise VlsaeError(f"{folder} is not empty; choose another --out or pass --overwrite")
    mods = data_modalities(data)
    widths = _widths(data, mods)
    loaded = open_saes(saes, mods, modality, widths)
    needed = sorted({m for item in loaded for m in item.modalities})
    rows = load_rows(data, needed, max_rows)
    results: list[dict[str, Any]] = []
    recons: dict[tuple[str, str], torch.Tensor] = {}
    for item in loaded:
        for m in item.modalities:
            recon = reconstruct(item.sae, rows[m], m)
            recons[(item.path, m)] = recon
            scores = dark_matter(rows[m], recon, held_out=held_out, seed=seed, keep_predictions=True)
            results.append({"sae": item.path, "arch": item.sae.arch, "n_latents": item.sae.n_latents,
                            "modality": m or None, "l0": _l0(item.sae, rows[m], m), **scores})
    agreement = []
    for m in needed:
        ordered = sorted((i for i in loaded if m in i.modalities), key=lambda i: i.sae.n_latents)
        for small, large in zip(ordered, ordered[1:]):
            agreement.append({"modality": m or None, "small": small.path, "large": large.path,
                              "n_latents": [small.sae.n_latents, large.sae.n_latents],
                              **error_norm_agreement(rows[m], recons[(small.path, m)], recons[(large.path, m)],
                                                     held_out=held_out, seed=seed),
                              "_norms": _norm_pair(rows[m], recons[(small.path, m)], recons[(large.path, m)])})
    summary = {"data": str(data), "rows": {m or "rows": int(rows[m].shape[0]) for m in needed}, "held_out": held_out,
               "seed": seed, "results": results, "agreement": agreement}
    return write_report(folder, summary)


def _widths(data: str, mods: list[str]) -> dict[str, int]:
    path = Path(data)
    if (path / MANIFEST).is_file():
        width = ActivationCache(path).manifest["width"]
        return {m: int(width[m]) for m in mods}
    d_in = open_tensor_file(path).d_in
    return {m: int(d_in[m]) for m in mods} if isinstance(d_in, dict) else {"": int(d_in)}


@torch.no_grad()
def _l0(sae: SAE, x: torch.Tensor, modality: str) -> float:
    m = modality or None
    total = sum(float(sae.encode(x[i:i + ENCODE_ROWS], m).l0().sum()) for i in range(0, x.shape[0], ENCODE_ROWS))
    return total / max(x.shape[0], 1)


def _norm_pair(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    return {"small": (x - a).pow(2).sum(dim=1).numpy(), "large": (x - b).pow(2).sum(dim=1).numpy()}
