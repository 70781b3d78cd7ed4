"""The concept report's figures, as PNG files beside its index.html (static, so the report opens offline)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.concepts.zf import zf_figure
from vlsae.concepts import ConceptSummary


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported here: it is slow to import and only
    the report draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def modality_score_figure(folder: Path, summary: ConceptSummary, name: str = "modality_score.png") -> str:
    """Histogram of the living latents' modality scores: a unified concept set piles up in the middle."""
    plt = _pyplot()
    scores = summary.modality_score.numpy()
    scores = scores[~np.isnan(scores)]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(scores, bins=20, range=(0, 1), color="#4c72b0")
    first, second = summary.modalities[:2] if len(summary.modalities) >= 2 else ("-", "-")
    ax.set_xlabel(f"modality score (0 = {second} only, 1 = {first} only)")
    ax.set_ylabel("latents")
    ax.set_title("modality score of the living latents")
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def planted_matrix_figure(folder: Path, probe: dict[str, Any], name: str = "planted_matrix.png") -> str:
    """AUROC of every value (rows) on every latent that is some value's best (columns), images beside
    captions: a catch-all latent shows as one bright column across many rows."""
    plt = _pyplot()
    matches = probe["matches"]
    latents = sorted({m.image_latent for m in matches} | {m.text_latent for m in matches})
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 0.28 * len(latents) * 2 + 3), 0.25 * len(matches) + 2), sharey=True)
    image = None
    for ax, key, label in ((axes[0], "image_auroc", "images"), (axes[1], "text_auroc", "captions")):
        matrix = np.array([probe[key][m.value][latents] for m in matches])
        image = ax.imshow(matrix, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(latents)), [str(i) for i in latents], rotation=90, fontsize=6)
        ax.set_title(f"AUROC on {label}")
    axes[0].set_yticks(range(len(matches)), [m.value for m in matches], fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6)
    fig.savefig(folder / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def write_figures(folder: Path, summary: ConceptSummary, probe: dict[str, Any],
                  zf: dict[str, dict[str, torch.Tensor]] | None = None) -> list[str]:
    """Every figure the report shows, written into ``folder``; returns their file names in page order.
    ``zf``: :func:`evals.concepts.zf.zf_norms` of the report's rows, for the ZF plot."""
    names = [modality_score_figure(folder, summary)]
    if probe.get("matches"):
        names.append(planted_matrix_figure(folder, probe))
    if zf:
        names.append(zf_figure(folder, zf, _pyplot()))
    return names
