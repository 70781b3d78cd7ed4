"""Turning dense pre-activations into variable-width sparse codes.

TopK codes have a fixed width ``k``. Threshold activations (JumpReLU, the
inference side of BatchTopK and Matryoshka) and batch-level selection
(BatchTopK training) give every row its own number of active latents. These
helpers return a ``(batch, K)`` index matrix whose width ``K`` is the largest
count in the batch; shorter rows are filled with their next-best entries,
which the caller zeroes (zero values are padding, see :mod:`vlsae.sparse`).
They run without autograd on the dense ``(batch, n_latents)`` matrix the
encoder matmul produced anyway; the values are then recomputed sparsely.
"""
from __future__ import annotations

import torch

from vlsae.sparse import SparseCode


def indices_above(score: torch.Tensor, cut: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Per row, the indices of every entry with ``score > cut``.

    score: (batch, n) -> (batch, K) long, K = max(1, largest count in the batch).
    A row with fewer entries above ``cut`` is filled with its next-highest ones,
    whose score is <= cut, so the caller can tell them apart by their score.
    """
    width = max(int((score > cut).sum(dim=1).max()) if score.numel() else 0, 1)
    width = min(width, score.shape[1])
    return score.topk(width, dim=1, sorted=False).indices


def threshold_code(pre: torch.Tensor, threshold: torch.Tensor) -> SparseCode:
    """JumpReLU code: ``z = pre * (pre > threshold)`` with a scalar or (n,) threshold >= 0.

    pre: (batch, n_latents) -> SparseCode whose width is the largest row L0.
    Values stay differentiable with respect to ``pre`` (plain gathers).
    """
    indices = indices_above(pre - threshold, 0.0)
    values = pre.gather(1, indices)
    gathered = threshold[indices] if threshold.ndim else threshold
    keep = (values > gathered) & (values > 0)
    return SparseCode(torch.where(keep, values, torch.zeros_like(values)), indices, pre.shape[1])


@torch.no_grad()
def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``batch * k`` largest entries of the whole (batch, n) matrix (BatchTopK).

    Returns ``indices`` (batch, K) and ``selected`` (batch, K) bool, K = the
    largest number of entries any row got. Exact, computed in two stages:
    each row's top ``cap`` entries (sorted), then the global top ``batch * k``
    among those candidates. The result equals the global top over the full
    matrix unless some row had *all* its candidates selected (it might own more);
    then ``cap`` doubles and the selection is redone. With ``cap = 4k`` the
    first pass almost always suffices, and it costs one row-wise topk plus a
    small global one instead of a topk over all ``batch * n`` entries.
    """
    batch, n = pre.shape
    total = batch * k
    cap = min(n, 4 * k)
    while True:
        cand_values, cand_indices = pre.topk(cap, dim=1, sorted=True)
        chosen = cand_values.reshape(-1).topk(total, sorted=False).indices
        selected = torch.zeros(batch * cap, dtype=torch.bool, device=pre.device)
        selected[chosen] = True
        selected = selected.view(batch, cap)
        if cap == n or not bool(selected[:, -1].any()):
            break
        cap = min(n, 2 * cap)
    # Selected entries form (up to ties) a prefix of each sorted row: trim to the longest.
    positions = torch.arange(1, cap + 1, device=pre.device)
    width = max(int((selected * positions).max()), 1)
    return cand_indices[:, :width].contiguous(), selected[:, :width].contiguous()
