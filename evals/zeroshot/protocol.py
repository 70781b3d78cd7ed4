"""The validation/test protocol of the zero-shot enhancement: choose (variant, λ) on one split, report
on the other, with a paired bootstrap interval of the gain.

The choice is per attribute (each attribute is its own classification task, as
each dataset is in VL-SAE's table): the (variant, λ) with the best validation
accuracy, ties going to the smaller λ (the plainer model), so a term that
never helps on validation leaves the test predictions plain. Test accuracy at
that choice minus plain test accuracy is the gain; its interval is a paired
bootstrap over the test records (scipy.stats.bootstrap, percentile method),
since plain and enhanced predictions are made on the same images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import Tensor

DEFAULT_LAMBDAS = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


@dataclass
class AttributeResult:
    """One attribute's figures (accuracies are fractions)."""

    attribute: str
    classes: int
    n_val: int
    n_test: int
    plain_val: float
    plain_test: float
    variant: str            # the chosen variant ("plain" when λ = 0 won)
    lam: float              # the chosen λ
    enhanced_val: float
    enhanced_test: float
    gain: float             # enhanced_test - plain_test
    gain_low: float         # paired bootstrap interval of the gain
    gain_high: float
    curves: dict[str, dict[str, list[float]]]  # variant -> {"val": [...], "test": [...]} per λ

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accuracy(predicted: Tensor, truth: Tensor) -> float:
    return float((predicted == truth).float().mean()) if truth.numel() else float("nan")


def paired_gain_interval(plain_correct: np.ndarray, enhanced_correct: np.ndarray, resamples: int = 1000,
                         confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(enhanced_correct - plain_correct) over records (paired)."""
    difference = enhanced_correct.astype(float) - plain_correct.astype(float)
    if difference.size < 2 or not difference.any():
        value = float(difference.mean()) if difference.size else float("nan")
        return value, value  # no disagreement: every resample gives the same gain
    from scipy.stats import bootstrap

    result = bootstrap((difference,), np.mean, n_resamples=resamples, confidence_level=confidence,
                       method="percentile", random_state=np.random.default_rng(seed), vectorized=True)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def choose(curves_val: dict[str, Tensor], lambdas: list[float]) -> tuple[str, int]:
    """(variant, λ index) with the best validation accuracy; ties to the smaller λ, then the earlier variant."""
    best: tuple[float, float, int] | None = None
    chosen = (next(iter(curves_val)), 0)
    for order, (variant, accuracies) in enumerate(curves_val.items()):
        for j, value in enumerate(accuracies.tolist()):
            key = (value, -lambdas[j], -order)
            if best is None or key > best:
                best, chosen = key, (variant, j)
    return chosen


def evaluate_attribute(attribute: str, n_classes: int, truth: Tensor, plain: Tensor, swept: dict[str, Tensor],
                       lambdas: list[float], val: Tensor, test: Tensor, resamples: int = 1000,
                       seed: int = 0) -> tuple[AttributeResult, Tensor]:
    """The attribute's result and its enhanced predictions over all records.

    truth, plain: (n,); swept: variant -> (len(lambdas), n) predictions.
    """
    curves: dict[str, dict[str, list[float]]] = {}
    val_curves: dict[str, Tensor] = {}
    for variant, predictions in swept.items():
        correct = (predictions == truth.unsqueeze(0)).float()
        val_curves[variant] = correct[:, val].mean(dim=1)
        curves[variant] = {"val": val_curves[variant].tolist(), "test": correct[:, test].mean(dim=1).tolist()}
    variant, j = choose(val_curves, lambdas)
    enhanced = swept[variant][j]
    plain_correct = (plain[test] == truth[test]).numpy()
    enhanced_correct = (enhanced[test] == truth[test]).numpy()
    low, high = paired_gain_interval(plain_correct, enhanced_correct, resamples=resamples, seed=seed)
    result = AttributeResult(
        attribute=attribute, classes=n_classes, n_val=int(val.numel()), n_test=int(test.numel()),
        plain_val=accuracy(plain[val], truth[val]), plain_test=accuracy(plain[test], truth[test]),
        variant=variant if lambdas[j] > 0 else "plain", lam=float(lambdas[j]),
        enhanced_val=accuracy(enhanced[val], truth[val]), enhanced_test=accuracy(enhanced[test], truth[test]),
        gain=float(enhanced_correct.mean() - plain_correct.mean()), gain_low=low, gain_high=high, curves=curves)
    return result, enhanced


def mean_gain(results: list[AttributeResult]) -> float:
    """The mean test gain over attributes (the +0.6-point target is on this figure)."""
    return float(np.mean([r.gain for r in results])) if results else float("nan")

