"""The dark-matter decomposition of an SAE's error (Engels, Smith, Tegmark; arXiv 2410.14670, TMLR 2025).

An SAE's error e(x) = x - x_hat is not all "features it has not learned yet":
part of it is a *linear* function of x, which a bigger dictionary of the same
kind will not remove. Fit e(x) ~ x A + b on one half of the rows and measure
on the other half (held out, so a large d cannot overfit its way to a high R^2):

- ``error_r2``: the fraction of the error's variance predicted linearly from x,
  1 - SS_res / SS_tot per output dimension, averaged over the d dimensions (the
  paper's figure; ``error_r2_pooled`` pools the dimensions instead);
- ``norm_r2``: how much of the per-row squared error norm ||e(x)||^2 is
  predicted linearly from x;
- ``nonlinear_fvu``: the FVU of x_hat + (x A + b), what is left once the
  linear part is added back (compare with ``fvu``, the SAE's own).

The fits are ridge regressions (scikit-learn ``RidgeCV``, intercept on, the
penalty chosen by efficient leave-one-out on the fitting half), which for
n >> d equals the paper's least squares; the paper fits without an intercept
on uncentred x, an intercept only removes the mean, which is not dark matter.

Across two SAE sizes, :func:`error_norm_agreement` asks whether the larger
SAE fails on the same rows as the smaller one (the paper: mostly, yes):
Pearson and Spearman correlation of the two per-row squared error norms, and
the R^2 of predicting the larger SAE's from the smaller's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ALPHAS = tuple(10.0 ** p for p in range(-4, 5))


@dataclass
class Split:
    """Row indices of the fitting half and the held-out half (seeded shuffle)."""

    fit: np.ndarray
    test: np.ndarray

    @classmethod
    def make(cls, n: int, held_out: float = 0.5, seed: int = 0) -> "Split":
        if not 0 < held_out < 1:
            raise ValueError(f"held_out must be in (0, 1), got {held_out}")
        order = np.random.default_rng(seed).permutation(n)
        cut = int(round(n * (1 - held_out)))
        if cut < 2 or n - cut < 2:
            raise ValueError(f"{n} rows are too few to fit on one part and test on the other")
        return cls(order[:cut], order[cut:])


def _ridge(x_fit: np.ndarray, y_fit: np.ndarray):
    from sklearn.linear_model import RidgeCV

    return RidgeCV(alphas=ALPHAS, fit_intercept=True).fit(x_fit, y_fit)


def r2_per_dim(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """1 - SS_res / SS_tot of each column (columns with no variance are left out as NaN)."""
    ss_res = ((y - pred) ** 2).sum(axis=0)
    ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss_tot > 0, 1 - ss_res / ss_tot, np.nan)


def fvu(x: np.ndarray, recon: np.ndarray) -> float:
    return float(((x - recon) ** 2).sum() / max(((x - x.mean(axis=0)) ** 2).sum(), 1e-30))


def dark_matter(x: torch.Tensor, recon: torch.Tensor, held_out: float = 0.5, seed: int = 0,
                keep_predictions: bool = False) -> dict[str, Any]:
    """Linear predictability of the error of ``recon`` (n, d) as a reconstruction of ``x`` (n, d).

    Returns error_r2, error_r2_pooled, norm_r2, fvu, nonlinear_fvu, normalized_mse (all on the held-out
    rows), rows_fit, rows_test, alpha_error, alpha_norm; with ``keep_predictions`` also ``norms``
    (held-out actual and predicted squared error norms) for the report's plot.
    """
    if x.shape != recon.shape or x.ndim != 2:
        raise ValueError(f"x and recon must be (n, d) of one shape, got {tuple(x.shape)} and {tuple(recon.shape)}")
    X = x.double().cpu().numpy()
    R = recon.double().cpu().numpy()
    E = X - R
    split = Split.make(X.shape[0], held_out, seed)
    fit, test = split.fit, split.test
    err_model = _ridge(X[fit], E[fit])
    E_hat = err_model.predict(X[test])
    r2 = r2_per_dim(E[test], E_hat)
    ss_tot = ((E[test] - E[test].mean(axis=0)) ** 2).sum()
    sq_norm = (E ** 2).sum(axis=1)
    norm_model = _ridge(X[fit], sq_norm[fit])
    norm_hat = norm_model.predict(X[test])
    norm_ss = ((sq_norm[test] - sq_norm[test].mean()) ** 2).sum()
    out: dict[str, Any] = {
        "error_r2": float(np.nanmean(r2)),
        "error_r2_pooled": float(1 - ((E[test] - E_hat) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan"),
        "norm_r2": float(1 - ((sq_norm[test] - norm_hat) ** 2).sum() / norm_ss) if norm_ss > 0 else float("nan"),
        "fvu": fvu(X[test], R[test]),
        "nonlinear_fvu": fvu(X[test], R[test] + E_hat),
        "normalized_mse": float((sq_norm[test] / np.maximum((X[test] ** 2).sum(axis=1), 1e-30)).mean()),
        "rows_fit": int(fit.size), "rows_test": int(test.size),
        "alpha_error": float(err_model.alpha_), "alpha_norm": float(norm_model.alpha_),
    }
    if keep_predictions:
        out["norms"] = {"actual": sq_norm[test], "predicted": norm_hat, "rows": test}
    return out


def error_norm_agreement(x: torch.Tensor, recon_small: torch.Tensor, recon_large: torch.Tensor,
                         held_out: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Do two SAEs fail on the same rows? Per-row squared error norms of both on the held-out rows:
    pearson, spearman, and r2 of the larger's predicted linearly from the smaller's (fit on the other half)."""
    from scipy.stats import pearsonr, spearmanr

    a = (x.double() - recon_small.double()).pow(2).sum(dim=1).cpu().numpy()
    b = (x.double() - recon_large.double()).pow(2).sum(dim=1).cpu().numpy()
    split = Split.make(a.shape[0], held_out, seed)
    model = _ridge(a[split.fit, None], b[split.fit])
    pred = model.predict(a[split.test, None])
    bt = b[split.test]
    ss = ((bt - bt.mean()) ** 2).sum()
    return {"pearson": float(pearsonr(a[split.test], bt).statistic),
            "spearman": float(spearmanr(a[split.test], bt).statistic),
            "r2": float(1 - ((bt - pred) ** 2).sum() / ss) if ss > 0 else float("nan")}
