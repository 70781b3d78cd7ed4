"""Similarity measures between two models' (or layers') representations of the same inputs.

- ITDA Jaccard (Leask, Nanda, Al Moubayed 2025): two ITDA dictionaries built on
  the same stream of inputs in the same order are sets of stream positions (an
  atom is the input it was taken from); their similarity is the Jaccard index
  |A n B| / |A u B| of those label sets. It asks "do the two models find the
  same inputs new?", so it needs no alignment between the two activation spaces
  (it is invariant to any rotation or rescaling of either).
- Linear CKA (Kornblith, Norouzi, Lee, Hinton 2019): for row-aligned
  activations X (n, d1), Y (n, d2), centred,
  CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), the baseline ITDA's paper
  compares against.
- Layer matching (Kornblith et al.'s test): given a similarity matrix
  S[i, j] between layer i of one model and layer j of another (same
  architecture, different seeds), the fraction of layers whose most similar
  layer in the other model is the corresponding one, argmax_j S[i, j] = i,
  counted in both directions.
"""
from __future__ import annotations

import torch


def jaccard(a: torch.Tensor | set[int], b: torch.Tensor | set[int]) -> float:
    """|A n B| / |A u B| of two label sets (tensors of labels or sets); two empty sets give 1."""
    sa = set(a.tolist()) if isinstance(a, torch.Tensor) else set(a)
    sb = set(b.tolist()) if isinstance(b, torch.Tensor) else set(b)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


@torch.no_grad()
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of row-aligned activations x (n, d1), y (n, d2), in float64 (the Frobenius norms of
    d x d Gram matrices lose precision in float32 for large n)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs row-aligned activations, got {x.shape[0]} and {y.shape[0]} rows")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.t() @ x).pow(2).sum()
    norm = (x.t() @ x).norm() * (y.t() @ y).norm()
    return float(cross / norm) if float(norm) > 0 else 0.0


def layer_matching(similarity: torch.Tensor) -> dict[str, float]:
    """Fraction of layers whose best match is the corresponding layer, for a square matrix S[i, j]
    (rows: layers of model a, columns: of model b): ``a_to_b`` over rows, ``b_to_a`` over columns,
    ``accuracy`` over both (2L decisions). Ties count as misses unless the diagonal is the unique maximum."""
    s = torch.as_tensor(similarity, dtype=torch.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"layer matching needs a square similarity matrix, got shape {tuple(s.shape)}")
    n = s.shape[0]
    diag = s.diagonal()

    def hits(m: torch.Tensor) -> torch.Tensor:  # row i: the diagonal entry strictly above every other entry
        others = m.clone()
        others.fill_diagonal_(float("-inf"))
        return diag > others.max(dim=1).values if n > 1 else torch.ones(1, dtype=torch.bool)

    rows, cols = hits(s), hits(s.t())
    return {"a_to_b": float(rows.double().mean()), "b_to_a": float(cols.double().mean()),
            "accuracy": float(torch.cat([rows, cols]).double().mean())}
