"""Turning dense pre-activations into variable-width sparse codes.

TopK codes have a fixed width ``k``. Threshold activations (JumpReLU, the
inference side of BatchTopK and Matryoshka) and batch-level selection
(BatchTopK training) give every row its own number of active latents. These
helpers return a ``(batch, K)`` index matrix whose width ``K`` is the largest
count in the batch, plus which slots are real; the caller zeroes the values
of the others (zero values are padding, see :mod:`vlsae.sparse`).
They run without autograd on the dense ``(batch, n_latents)`` matrix the
encoder matmul produced anyway; the values are then recomputed sparsely.
"""
from __future__ import annotations

import torch

from vlsae.sparse import SparseCode


@torch.no_grad()
def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the column indices of the True entries of ``mask``, left-aligned.

    mask: (batch, n) bool -> indices (batch, K) long and valid (batch, K) bool,
    K = max(1, largest row count). Slots past a row's count hold index 0 and
    valid False; callers must zero those values (index 0 may then appear twice
    in a row, which is harmless for a zero value). Built from ``nonzero`` in
    one pass: on the CPU this is 2-3x faster than a row-wise ``topk`` of the
    same width (22 vs 49 ms at batch 1024, 4096 latents, ~40 active).
    """
    batch = mask.shape[0]
    counts = mask.sum(dim=1)
    width = max(int(counts.max()) if mask.numel() else 0, 1)
    rows, cols = mask.nonzero(as_tuple=True)
    position = torch.arange(rows.numel(), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    indices = torch.zeros(batch, width, dtype=torch.long, device=mask.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=mask.device)
    indices[rows, position] = cols
    valid[rows, position] = True
    return indices, valid


def threshold_code(pre: torch.Tensor, threshold: torch.Tensor) -> SparseCode:
    """JumpReLU code: ``z = pre * (pre > threshold)`` with a scalar or (n,) threshold >= 0.

    pre: (batch, n_latents) -> SparseCode whose width is the largest row L0.
    Values stay differentiable with respect to ``pre`` (plain gathers).
    """
    with torch.no_grad():
        indices, valid = compact((pre > threshold) & (pre > 0))
    values = pre.gather(1, indices)
    return SparseCode(torch.where(valid, values, torch.zeros_like(values)), indices, pre.shape[1])


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
