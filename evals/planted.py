"""Planted-attribute probes: which latent separates each known concept value.

ShapesWorld plants attribute values (shape=star, colour=red, ...) in every pair.
For each value we score every latent by the AUROC of its activation for
"pair has this value" vs not, separately on images and on captions. A unified
concept set (VL-SAE's goal) shows up as the *same* latent index winning on both
sides. Captions only mention some attributes, so caption labels use the
mentioned values and image labels the planted ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata


def auroc_matrix(scores: torch.Tensor | np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """AUROC of every column of ``scores`` (rows, n_latents) for each boolean label (rows,).

    Uses the rank-sum (Mann-Whitney) form with tied ranks averaged, so a latent
    that never fires scores exactly 0.5. Labels with no positives or no
    negatives are skipped.
    """
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    ranks = rankdata(s, axis=0)
    out = {}
    for name, label in labels.items():
        label = np.asarray(label, dtype=bool)
        n_pos = int(label.sum())
        n_neg = label.shape[0] - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        rank_sum = ranks[label].sum(axis=0)
        out[name] = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


@dataclass
class ValueMatch:
    value: str
    image_latent: int
    image_auroc: float
    text_latent: int
    text_auroc: float

    @property
    def same(self) -> bool:
        return self.image_latent == self.text_latent


def match_values(image_auroc: dict[str, np.ndarray], text_auroc: dict[str, np.ndarray]) -> list[ValueMatch]:
    """For every value scored on both sides, the best latent per modality."""
    matches = []
    for value in sorted(set(image_auroc) & set(text_auroc)):
        i = int(np.argmax(image_auroc[value]))
        t = int(np.argmax(text_auroc[value]))
        matches.append(ValueMatch(value, i, float(image_auroc[value][i]), t, float(text_auroc[value][t])))
    return matches


def summarize_matches(matches: list[ValueMatch]) -> dict[str, float]:
    """same_index_rate, mean AUROCs and the fraction of values with both AUROCs >= 0.9."""
    if not matches:
        return {"values": 0, "same_index_rate": float("nan"), "image_auroc": float("nan"), "text_auroc": float("nan")}
    return {
        "values": len(matches),
        "same_index_rate": float(np.mean([m.same for m in matches])),
        "image_auroc": float(np.mean([m.image_auroc for m in matches])),
        "text_auroc": float(np.mean([m.text_auroc for m in matches])),
        "both_auroc_ge_0.9": float(np.mean([min(m.image_auroc, m.text_auroc) >= 0.9 for m in matches])),
    }
