"""How well a filter separates clean pairs from corrupted ones, on data whose corruptions are known.

The scores are "higher = keep" and the positive class is **clean** (OpenOOD's
convention of "higher = in-distribution"), so AUROC is the probability that a
clean pair outscores a corrupted one. Precision of the kept set is the clean
fraction among the kept pairs; recall the fraction of all clean pairs kept.
scikit-learn computes the curve; ties are its concern (it averages them).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def detection(scores: np.ndarray, clean: np.ndarray, kept: np.ndarray | None = None) -> dict[str, Any]:
    """AUROC of ``scores`` against ``clean`` and, given ``kept`` flags, precision and recall of the kept set.

    scores: (n,) float, higher = keep; clean: (n,) bool ground truth; kept: (n,) bool.
    AUROC is None when only one class is present.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, clean = np.asarray(scores, dtype=np.float64), np.asarray(clean, dtype=bool)
    both = 0 < clean.sum() < clean.size
    out: dict[str, Any] = {"n": int(clean.size), "clean_fraction": float(clean.mean()) if clean.size else None,
                           "auroc": float(roc_auc_score(clean, scores)) if both else None,
                           "average_precision": float(average_precision_score(clean, scores)) if both else None}
    if kept is not None:
        kept = np.asarray(kept, dtype=bool)
        out.update(kept=int(kept.sum()), precision=float(clean[kept].mean()) if kept.any() else None,
                   recall=float(kept[clean].mean()) if clean.any() else None)
    return out


def keep_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """(n,) bool: the ``round(fraction * n)`` highest scores, ties broken by position (the filter's own rule)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = max(1, round(fraction * scores.size))
    order = np.lexsort((np.arange(scores.size), -scores))
    kept = np.zeros(scores.size, dtype=bool)
    kept[order[:k]] = True
    return kept
