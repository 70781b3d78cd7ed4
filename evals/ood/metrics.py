"""The one OOD evaluator every score shares: AUROC, FPR@95 %TPR, AUPR, with bootstrap intervals.

OpenOOD's convention throughout: a score is a confidence, **higher = more
in-distribution**, so one evaluator serves every score and adding a score never
touches the metrics.

- ``auroc``: ROC AUC with ID as the positive class and the score as is (the same
  number as OOD-positive against the negated score).
- ``fpr95``: the classic FPR@95 %TPR (Hendrycks & Gimpel; OpenOOD v1.0): the
  fraction of OOD samples still accepted at the highest threshold that keeps
  at least 95 % of the ID samples.
- ``fpr95_ood``: OpenOOD v1.5's variant (``auc_and_fpr_recall``): OOD is the
  positive class, and it is the fraction of ID samples flagged at the first
  threshold that catches at least 95 % of the OOD samples. Papers mix the two,
  so both are reported and named.
- ``aupr_in`` (ID positive, score) and ``aupr_out`` (OOD positive, negated score):
  average precision as scikit-learn defines it (a step sum over the distinct
  thresholds, tied samples sharing one threshold).

The point estimates are scikit-learn's (``roc_auc_score``, ``roc_curve``,
``average_precision_score``). The bootstrap (``scipy.stats.bootstrap``,
percentile intervals, ID and OOD resampled separately, since they are two
independent samples) needs thousands of evaluations, so its statistic is the
vectorised :func:`grouped_metrics`: every resample draws its values from the
pooled sample, so each is a histogram over the pooled distinct values, and all
five metrics follow from cumulative sums of two histograms, with ties exactly as
scikit-learn treats them (the tests check it against scikit-learn on tied data).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from vlsae.errors import VlsaeError

METRICS: tuple[str, ...] = ("auroc", "fpr95", "fpr95_ood", "aupr_in", "aupr_out")
LOWER_IS_BETTER: frozenset[str] = frozenset({"fpr95", "fpr95_ood"})
TPR_LEVEL = 0.95


def _check(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if id_scores.size == 0 or ood_scores.size == 0:
        raise VlsaeError(f"OOD metrics need ID and OOD samples, got {id_scores.size} ID and {ood_scores.size} OOD scores")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise VlsaeError("an OOD score is NaN or infinite; scores must be finite numbers")
    return id_scores, ood_scores


def ood_metrics(id_scores: Any, ood_scores: Any) -> dict[str, float]:
    """The five metrics of one score on one ID/OOD split (scikit-learn point estimates).

    id_scores: (n_id,), ood_scores: (n_ood,) confidences, higher = more in-distribution.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    id_scores, ood_scores = _check(id_scores, ood_scores)
    scores = np.concatenate([id_scores, ood_scores])
    is_id = np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)])
    # drop_intermediate=False keeps every threshold, so the first one reaching 95 % is never skipped
    fpr, tpr, _ = roc_curve(is_id, scores, drop_intermediate=False)
    ood_fpr, ood_tpr, _ = roc_curve(1 - is_id, -scores, drop_intermediate=False)
    return {
        "auroc": float(roc_auc_score(is_id, scores)),
        "fpr95": float(fpr[np.argmax(tpr >= TPR_LEVEL)]),
        "fpr95_ood": float(ood_fpr[np.argmax(ood_tpr >= TPR_LEVEL)]),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(1 - is_id, -scores)),
    }


def _histograms(levels_of: np.ndarray, n_levels: int) -> np.ndarray:
    """(batch, n) level indices -> (batch, n_levels) float32 counts per level."""
    batch = levels_of.shape[0]
    where = levels_of + np.arange(batch)[:, None] * n_levels
    return np.bincount(where.ravel(), minlength=batch * n_levels).reshape(batch, n_levels).astype(np.float32)


def grouped_metrics(id_levels: np.ndarray, ood_levels: np.ndarray, n_levels: int) -> np.ndarray:
    """The :data:`METRICS` of many resamples at once: (len(METRICS), batch).

    id_levels: (batch, n_id), ood_levels: (batch, n_ood): each sample's score as
    its index among the ``n_levels`` sorted distinct values of the pooled
    original sample (:func:`score_levels`). With per-level counts h_id, h_ood and
    their cumulative sums (``ge``: at or above a level, ``le``: at or below it):

    - AUROC = sum_l h_id[l] (#OOD below l + h_ood[l] / 2) / (n_id n_ood);
    - FPR95 = ge_ood / n_ood at the highest level with ge_id / n_id >= 0.95;
    - FPR95 (OOD positive) = le_id / n_id at the lowest level with le_ood / n_ood >= 0.95;
    - AUPR-In = the mean over ID samples of the precision at their own level,
      ge_id / (ge_id + ge_ood), which is average precision with ties grouped;
      AUPR-Out the same from the other end.
    """
    id_levels, ood_levels = np.atleast_2d(id_levels), np.atleast_2d(ood_levels)
    n_id, n_ood = id_levels.shape[-1], ood_levels.shape[-1]
    h_id, h_ood = _histograms(id_levels, n_levels), _histograms(ood_levels, n_levels)
    le_id, le_ood = h_id.cumsum(1), h_ood.cumsum(1)
    ge_id, ge_ood = (n_id + h_id) - le_id, (n_ood + h_ood) - le_ood
    auroc = np.einsum("bl,bl->b", h_id, le_ood - 0.5 * h_ood, dtype=np.float64) / (n_id * n_ood)
    top = (ge_id >= TPR_LEVEL * n_id).sum(1) - 1  # ge_id falls with the level: the last level that keeps 95 %
    fpr95 = np.take_along_axis(ge_ood, top[:, None], 1)[:, 0] / n_ood
    bottom = n_levels - (le_ood >= TPR_LEVEL * n_ood).sum(1)  # le_ood rises: the first level catching 95 %
    fpr95_ood = np.take_along_axis(le_id, bottom[:, None], 1)[:, 0] / n_id
    # at a level no sample of the class holds, h is 0 and the precision does not count (its 0/0 is set to 0)
    aupr_in = np.einsum("bl,bl->b", h_id, ge_id / np.maximum(ge_id + ge_ood, 1), dtype=np.float64) / n_id
    aupr_out = np.einsum("bl,bl->b", h_ood, le_ood / np.maximum(le_ood + le_id, 1), dtype=np.float64) / n_ood
    return np.stack([auroc, fpr95.astype(np.float64), fpr95_ood.astype(np.float64), aupr_in, aupr_out])


def score_levels(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(ID level indices, OOD level indices, number of levels): each score's rank among the pooled distinct values."""
    levels = np.unique(np.concatenate([id_scores, ood_scores]))
    return np.searchsorted(levels, id_scores), np.searchsorted(levels, ood_scores), int(levels.size)


def evaluate(id_scores: Any, ood_scores: Any, n_resamples: int = 1000, confidence: float = 0.95,
             seed: int = 0) -> dict[str, Any]:
    """Point estimates of :data:`METRICS` plus, per metric, ``METRIC_ci``: the percentile bootstrap
    interval over ``n_resamples`` resamples (ID and OOD drawn separately; 0: no intervals).

    A perfect separation gives a zero-width interval; an interval scipy cannot form is ``None``.
    """
    id_scores, ood_scores = _check(id_scores, ood_scores)
    out: dict[str, Any] = ood_metrics(id_scores, ood_scores)
    out.update(n_id=int(id_scores.size), n_ood=int(ood_scores.size))
    if n_resamples <= 0:
        return out
    from scipy.stats import bootstrap

    # resampling the level indices instead of the scores spares a search per resampled value
    id_levels, ood_levels, n_levels = score_levels(id_scores, ood_scores)

    def statistic(id_sample: np.ndarray, ood_sample: np.ndarray, axis: int = -1) -> np.ndarray:
        return grouped_metrics(id_sample, ood_sample, n_levels)

    # about ten (batch, levels) float32 arrays per call: bound the batch so that stays near 100 MB
    batch = max(1, min(n_resamples, int(2.5e6 // max(n_levels, 1))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate (constant) bootstrap distribution gives NaN: reported as None
        result = bootstrap((id_levels, ood_levels), statistic, n_resamples=n_resamples, confidence_level=confidence,
                           method="percentile", paired=False, vectorized=True, batch=batch,
                           rng=np.random.default_rng(seed))
    low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
    for i, name in enumerate(METRICS):
        finite = np.isfinite(low[i]) and np.isfinite(high[i])
        out[f"{name}_ci"] = [float(low[i]), float(high[i])] if finite else None
    return out


def compare_auroc(first: tuple[Any, Any], second: tuple[Any, Any], n_resamples: int = 1000, confidence: float = 0.95,
                  seed: int = 0) -> dict[str, Any]:
    """AUROC(first) - AUROC(second) of two scores of the same samples, with a paired bootstrap interval.

    first, second: (id_scores, ood_scores) of each score over the same ID and OOD rows. The rows are
    resampled (ID and OOD separately) and both scores re-evaluated on the same resample, so the
    interval is that of the difference: one that holds 0 is a tie.
    """
    (id_a, ood_a), (id_b, ood_b) = _check(*first), _check(*second)
    if id_a.shape != id_b.shape or ood_a.shape != ood_b.shape:
        raise ValueError("the two scores must score the same ID and OOD rows")
    delta = ood_metrics(id_a, ood_a)["auroc"] - ood_metrics(id_b, ood_b)["auroc"]
    out: dict[str, Any] = {"delta": float(delta), "delta_ci": None}
    if n_resamples <= 0:
        return out
    from scipy.stats import bootstrap

    levels_a, levels_b = score_levels(id_a, ood_a), score_levels(id_b, ood_b)

    def statistic(id_rows: np.ndarray, ood_rows: np.ndarray, axis: int = -1) -> np.ndarray:
        a = grouped_metrics(levels_a[0][id_rows], levels_a[1][ood_rows], levels_a[2])[0]
        b = grouped_metrics(levels_b[0][id_rows], levels_b[1][ood_rows], levels_b[2])[0]
        return a - b

    batch = max(1, min(n_resamples, int(2.5e6 // max(levels_a[2], levels_b[2], 1))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bootstrap((np.arange(id_a.size), np.arange(ood_a.size)), statistic, n_resamples=n_resamples,
                           confidence_level=confidence, method="percentile", paired=False, vectorized=True,
                           batch=batch, rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isfinite(low) and np.isfinite(high):
        out["delta_ci"] = [low, high]
    return out


def better(metric: str, a: float, b: float) -> bool:
    """Whether value ``a`` of ``metric`` is better than ``b`` (FPRs are better low)."""
    return a < b if metric in LOWER_IS_BETTER else a > b
