"""The OOD report's figures, PNG files beside index.html: per OOD set, ROC curves and score histograms."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported here: slow to import, only the report draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(folder: Path, set_name: str, id_scores: dict[str, np.ndarray], ood_scores: dict[str, np.ndarray],
               kinds: dict[str, str], aurocs: dict[str, float]) -> str:
    """ROC curves of every score (ID positive): SAE scores solid, baselines dashed, best first in the legend."""
    from sklearn.metrics import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for name in sorted(id_scores, key=lambda n: -aurocs[n]):
        labels = np.concatenate([np.ones(id_scores[name].size), np.zeros(ood_scores[name].size)])
        fpr, tpr, _ = roc_curve(labels, np.concatenate([id_scores[name], ood_scores[name]]))
        ax.plot(fpr, tpr, linestyle="-" if kinds[name] == "sae" else "--", linewidth=1.3,
                label=f"{name} ({aurocs[name]:.3f})")
    ax.plot([0, 1], [0, 1], color="#999", linewidth=0.8)
    ax.set_xlabel("OOD accepted (false positive rate)")
    ax.set_ylabel("ID accepted (true positive rate)")
    ax.set_title(f"ROC: id vs {set_name} (solid: SAE, dashed: baseline)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    name = f"roc_{set_name}.png"
    fig.savefig(folder / name, dpi=100)
    plt.close(fig)
    return name


def histogram_figure(folder: Path, set_name: str, id_scores: dict[str, np.ndarray], ood_scores: dict[str, np.ndarray],
                     kinds: dict[str, str], aurocs: dict[str, float], per_kind: int = 2) -> str:
    """The ID and OOD score distributions on shared bins, one panel for each of the ``per_kind`` best
    SAE scores and best baselines (every score's curve is in the ROC figure; drawing is the slow part)."""
    plt = _pyplot()
    ranked = sorted(id_scores, key=lambda n: -aurocs[n])
    names = [n for kind in ("sae", "baseline") for n in [m for m in ranked if kinds[m] == kind][:per_kind]]
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.1 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        both = np.concatenate([id_scores[name], ood_scores[name]])
        low, high = np.percentile(both, [0.5, 99.5])
        if not high > low:
            low, high = float(both.min()) - 0.5, float(both.max()) + 0.5
        bins = np.linspace(low, high, 40)
        ax.hist(np.clip(id_scores[name], low, high), bins=bins, alpha=0.6, density=True, label="id", color="#4c72b0")
        ax.hist(np.clip(ood_scores[name], low, high), bins=bins, alpha=0.6, density=True, label=set_name, color="#dd8452")
        ax.set_title(f"{name} (AUROC {aurocs[name]:.3f})", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    name = f"hist_{set_name}.png"
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    return name
