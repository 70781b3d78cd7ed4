"""``vlsae concepts``: what a trained SAE's latents mean, as a static HTML report.

Pipeline: pair shards -> model adapter -> activation cache (the project's one
extraction path, :func:`multimodal.extract.extract_pairs`) -> the SAE's sparse
codes -> :func:`vlsae.concepts.summarize_concepts` (top rows, modality score,
agreement, pair overlap) -> concept cards with image thumbnails and captions
side by side, the modality-score histogram, per-modality reconstruction and
sparsity, and, when the records carry ShapesWorld metadata, the planted-value
<-> latent AUROC matrix with plain and exclusive same-latent rates.

The report is a folder (index.html, PNG figures and thumbnails, summary.json)
that opens offline. It is built in a hidden staging folder beside ``out`` (the
activation cache too, deleted once read) and moved into place at the end, so
``out`` is either the old report or the whole new one.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from evals.concepts.figures import write_figures
from evals.concepts.html import (
    build_cards,
    card_image_rows,
    choose_card_latents,
    render_page,
)
from evals.concepts.pairs import PairActivations, extract_pair_activations, read_images
from evals.concepts.probes import planted_probe
from evals.concepts.zf import zf_norms, zf_summary
from multimodal.adapters import create_adapter
from multimodal.pairs import DEFAULT_MAX_SKIPPED, PairReader, check_max_skipped
from vlsae.alignment import AlignedSAE
from vlsae.checkpoint import load_sae
from vlsae.concepts import ConceptSummary, summarize_concepts
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_text, check_writable_dir, replace_dir
from evals.zeroshot.fidelity import fidelity_from_pairs, spliced_modalities
from evals.zeroshot.report import fidelity_figure


def check_widths(sae: Any, pairs: PairActivations, model: str, hook: str) -> None:
    """One line, not a shape error deep in the encoder, when the model's rows do not fit the SAE."""
    expected = dict(sae.projector.config.widths) if isinstance(sae, AlignedSAE) else {m: int(sae.d_in) for m in pairs.acts}
    for m, rows in pairs.acts.items():
        if m in expected and rows.shape[1] != expected[m]:
            raise VlsaeError(f"the SAE takes width {expected[m]} but {model} at hook '{hook}' gives {m} rows of width "
                             f"{rows.shape[1]}; use the model and hook the SAE was trained on")


def report_summary(title: str, summary: ConceptSummary, pairs: PairActivations, probe: dict[str, Any]) -> dict[str, Any]:
    """What summary.json holds: the headline numbers, the planted headline and one entry per planted value."""
    ceiling = probe.get("ceiling", {})
    overlap = summary.pair_overlap.numpy()
    return {
        "title": title, "pairs": len(pairs.keys), "n_latents": summary.n_latents,
        "fvu": summary.fvu, "l0": summary.l0,
        "alive_fraction": float(summary.alive().float().mean()),
        "multimodal_fraction": float(((summary.modality_score >= 0.2) & (summary.modality_score <= 0.8)).float().mean()),
        "mean_pair_overlap": float(np.nanmean(overlap)) if overlap.size else float("nan"),
        "planted": probe.get("summary", {}),
        "planted_matches": [{**asdict(m), "exclusive_same": m.exclusive_same,
                             "ceiling_image": ceiling.get("image", {}).get(m.value),
                             "ceiling_text": ceiling.get("text", {}).get(m.value)}
                            for m in probe.get("matches", [])],
    }


def write_report(folder: Path, title: str, summary: ConceptSummary, pairs: PairActivations, probe: dict[str, Any],
                 data: str, n_cards: int = 24, fidelity: dict[str, Any] | None = None,
                 zf: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write index.html, summary.json, the figures and the card thumbnails into ``folder`` (the staging
    folder); the thumbnails' images are read back from the shards ``data``. ``fidelity``: the zero-shot
    accuracy with the reconstructions spliced in (:func:`evals.zeroshot.fidelity.fidelity_from_pairs`),
    shown beside FVU. ``zf``: :func:`evals.concepts.zf.zf_norms` of the rows, for the ZF plot and the
    epsilon_LBO columns. Returns the summary."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    figures = write_figures(folder, summary, probe, zf)
    if fidelity:
        figures.append(fidelity_figure(folder, fidelity))
    roles = probe.get("roles", {})
    latents = choose_card_latents(summary, roles, n_cards)
    images = read_images(data, [pairs.keys[row] for row in card_image_rows(summary, latents)])
    cards = build_cards(folder, summary, pairs, roles, latents, images)
    result = report_summary(title, summary, pairs, probe)
    result["zero_shot_fidelity"] = fidelity
    result["zf"] = zf_summary(zf) if zf else None
    atomic_write_text(folder / "summary.json", json.dumps(result, indent=2))
    atomic_write_text(folder / "index.html", render_page(result, figures, cards))
    return result


def concepts_report(sae_path: str | Path, data: str, model: str, out: str | Path, hook: str = "final", tokens: str = "cls",
                    limit: int = 2000, batch_size: int = 64, device: str = "auto", n_cards: int = 24,
                    overwrite: bool = False, progress: bool = True,
                    max_skipped: float = DEFAULT_MAX_SKIPPED, zero_shot: bool = True) -> dict[str, Any]:
    """The whole ``vlsae concepts`` job; returns the report's summary (as in summary.json) and ``index``.

    ``zero_shot``: for a CLIP at hook ``final``, also the downstream fidelity (zero-shot accuracy on the
    single-object pairs with the SAE's reconstructions spliced in), beside FVU.

    ``out`` is checked before the SAE or the model is loaded, so a bad folder
    costs one line, not a model load and an extraction.
    """
    out = check_writable_dir(out)
    check_max_skipped(max_skipped)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise VlsaeError(f"{out} is not empty; choose another --out or pass --overwrite")
    sae = load_sae(sae_path)
    adapter = create_adapter(model, device=device)
    staging = out.with_name(f".{out.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        reader = PairReader(data, max_skipped=max_skipped)
        pairs = extract_pair_activations(adapter, reader, staging / "acts", hook=hook, tokens=tokens,
                                         batch_size=batch_size, limit=limit, progress=progress, data=str(data),
                                         reads=reader.stats)
        shutil.rmtree(staging / "acts")  # read into memory; the report does not ship activations
        check_widths(sae, pairs, model, hook)
        summary = summarize_concepts(sae, pairs.acts)
        probe = planted_probe(sae, pairs, ceiling=True) if {"image", "text"} <= set(pairs.acts) else {}
        fidelity = (fidelity_from_pairs(adapter, sae, pairs.metas, pairs.acts["image"], spliced_modalities(sae, sae_path))
                    if zero_shot and hook == "final" and "image" in pairs.acts else None)
        title = f"Concepts of {Path(sae_path).name} ({sae.arch}) on {model}"
        write_report(staging, title, summary, pairs, probe, data, n_cards=n_cards, fidelity=fidelity,
                     zf=zf_norms(sae, pairs.acts))
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = json.loads((out / "summary.json").read_text())
    result["index"] = str(out / "index.html")
    return result
