"""Sparse kernels for the SAE hot path (PyTorch on every device).

A TopK-style SAE touches only ``k`` of its ``n_latents`` rows per input, yet
plain autograd through ``topk`` back-propagates a dense ``(batch, n_latents)``
gradient and spends a second full matmul on the encoder weight. These kernels
keep every step after the one unavoidable dense matmul (choosing the active
latents) sparse:

* :func:`fused_topk` is that dense step: the encoder matmul and the row-wise
  top-k, a block of rows at a time into one reused buffer;
* :func:`sparse_encode` recomputes the selected pre-activations with a sampled
  dense-dense product and back-propagates into ``W_enc`` with one
  ``embedding_bag`` over the code's entries sorted by latent
  (:class:`TransposePattern`, built once per code and shared with the decoder's
  gradient): ``batch * k`` rows of work, not ``batch * n_latents``;
* :func:`sparse_decode` decodes with ``embedding_bag`` and back-propagates the
  same way.

Measured on the 2-core CPU (batch 4096, d 512, 8192 latents, k 32, bf16
selection): the selection (matmul + top-k) is ~90 ms of a ~115 ms step; a
weight gradient is ~2 ms and the sampled product ~6 ms
(``benchmarks/train_step.py`` times the step against that floor).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import warnings

# The CSR helpers below build well-formed tensors; the beta warnings say nothing useful.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """CPU sparse kernels want fp32/fp64; half precision is upcast."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def sampled_rows_dot(indices: torch.Tensor, left: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """out[b, j] = <left[b], rows[indices[b, j]]>.

    indices: (batch, K) long; left: (batch, d); rows: (n, d) -> (batch, K).
    """
    batch, width = indices.shape
    if batch == 0 or width == 0:
        return left.new_zeros(batch, width)
    dtype = _compute_dtype(left)
    crow = torch.arange(0, batch * width + 1, width, device=left.device)
    pattern = torch.sparse_csr_tensor(
        crow, indices.reshape(-1), torch.zeros(batch * width, device=left.device, dtype=dtype),
        (batch, rows.shape[0]), check_invariants=False,
    )
    out = torch.sparse.sampled_addmm(pattern, left.to(dtype), rows.to(dtype).t(), beta=0.0)
    return out.values().view(batch, width).to(left.dtype)


class TransposePattern:
    """The layout of S^T for a sparse (batch, n_rows) matrix S with the non-zeros at ``indices`` (batch, K):
    the code's entries sorted by latent, as CSR row pointers and columns. Built once per code, it serves every
    product with S^T of that code (the encoder's and the decoder's weight gradients of one step)."""

    def __init__(self, indices: torch.Tensor, n_rows: int):
        width = indices.shape[1]
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat)
        self.columns = torch.div(self.order, width, rounding_mode="floor")
        self.crow = torch.zeros(n_rows + 1, dtype=torch.long, device=indices.device)
        self.crow[1:] = torch.bincount(flat, minlength=n_rows).cumsum(0)
        self.shape = (n_rows, indices.shape[0])
        self.indices, self.version = indices, indices._version

    def matches(self, indices: torch.Tensor, n_rows: int) -> bool:
        return indices is self.indices and indices._version == self.version and self.shape[0] == n_rows


_LAST_PATTERN: TransposePattern | None = None


def transpose_pattern(indices: torch.Tensor, n_rows: int) -> TransposePattern:
    """The :class:`TransposePattern` of ``indices``: the last one built if it is of this very tensor (unchanged
    since), else a new one, kept for the next product (a TopK step's two weight gradients share its code)."""
    global _LAST_PATTERN
    pattern = _LAST_PATTERN
    if pattern is None or not pattern.matches(indices, n_rows):
        pattern = _LAST_PATTERN = TransposePattern(indices, n_rows)
    return pattern


def scatter_rows(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, n_rows: int) -> torch.Tensor:
    """S^T @ dense for the sparse (batch, n_rows) matrix S = (indices, values).

    indices, values: (batch, K); dense: (batch, d) -> (n_rows, d). The layout of S^T is
    :func:`transpose_pattern`'s: built once for a code and reused by the next product with it.
    """
    dtype = _compute_dtype(dense)
    pattern = transpose_pattern(indices, n_rows)
    # row l of S^T @ dense is the sum of the dense rows that use latent l, weighted: one bag per latent.
    # embedding_bag does exactly that over the sorted entries; a CSR matmul does it 5-7x slower on a CPU
    # (14 vs 2 ms at batch 4096, k 32, d 512: it zero-fills and copies its (n_rows, d) output)
    return F.embedding_bag(pattern.columns, dense.to(dtype), pattern.crow, mode="sum", include_last_offset=True,
                           per_sample_weights=values.reshape(-1)[pattern.order].to(dtype)).to(dense.dtype)


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, center, weight, bias, indices):  # type: ignore[override]
        centred = x if center is None else x - center
        ctx.save_for_backward(centred, weight, indices)
        ctx.has_bias, ctx.has_center = bias is not None, center is not None
        out = sampled_rows_dot(indices, centred, weight)
        if bias is not None:
            out = out + bias[indices]
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        centred, weight, indices = ctx.saved_tensors
        grad_x = grad_center = grad_w = grad_b = None
        per_latent = None  # sum of the gradient over the rows, per latent: the bias's and the centre's
        if (ctx.has_bias and ctx.needs_input_grad[3]) or (ctx.has_center and ctx.needs_input_grad[1]):
            per_latent = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device)
            per_latent.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum")
            grad_x = grad_x.to(centred.dtype)
        if ctx.has_center and ctx.needs_input_grad[1]:
            # d/dc <x - c, w_j> = -w_j: the rows' gradients summed per latent, then one (n,) x (n, d) product
            grad_center = -(per_latent.to(weight.dtype) @ weight).to(centred.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = scatter_rows(indices, grad, centred, weight.shape[0]).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = per_latent
        return grad_x, grad_center, grad_w, grad_b, None


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, values, weight):  # type: ignore[override]
        ctx.save_for_backward(indices, values, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values.to(weight.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        indices, values, weight = ctx.saved_tensors
        grad_values = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_values = sampled_rows_dot(indices, grad, weight).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_weight = scatter_rows(indices, values, grad, weight.shape[0]).to(weight.dtype)
        return None, grad_values, grad_weight


def sparse_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor,
                  center: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-activations of the selected latents only.

    x: (batch, d); weight: (n_latents, d); bias: (n_latents,) or None; center: (d,) or None;
    indices: (batch, K) -> (batch, K), equal to ``((x - center) @ weight.T + bias).gather(1, indices)``.
    Passing ``center`` (an SAE's ``b_dec``) rather than ``x - center`` spares backward a (batch, d) gradient
    of ``x`` when ``x`` itself needs none: the centre's gradient is a sum per latent and one product.
    """
    return _SparseEncode.apply(x, center, weight, bias, indices)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * weight[indices[b, j]]; (batch, K) x (n, d) -> (batch, d)."""
    if indices.shape[1] == 0:
        return weight.new_zeros(indices.shape[0], weight.shape[1])
    return _SparseDecode.apply(indices, values, weight)


# ------------------------------------------------------------------ selection: encoder matmul + top-k, fused
# Choosing a TopK SAE's active latents is the one dense step: (batch, n_latents) pre-activations, then a row-wise
# top-k. Materialising that matrix whole costs more than the matmul's arithmetic suggests on a CPU: at batch
# 4096 x 8192 latents it is 64 MB in bf16, above glibc's largest mmap threshold (32 MB), so every step maps fresh
# pages and faults on each 4 KB of them (about 25 ms of a 70 ms matmul on 2 cores), and the top-k then reads it
# back from memory. :func:`fused_topk` computes it a block of rows at a time into one reused buffer (16 MB by
# default) and takes each block's top-k while the block is in cache; nothing of size (batch, n_latents) remains.
SELECTION_BLOCK_BYTES = 16 << 20


class SelectionScratch:
    """The reused (rows, n_latents) buffer of :func:`fused_topk` (one per SAE; never saved with it)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self.buffer
        if (buffer is None or buffer.shape[0] < rows or buffer.shape[1] != n or buffer.dtype != dtype
                or buffer.device != device):
            buffer = self.buffer = torch.empty(rows, n, dtype=dtype, device=device)
        return buffer[:rows]


def scratch_of(owner: object) -> SelectionScratch:
    """``owner``'s selection buffer (an SAE's): kept as a plain attribute, so it is never saved in a state dict
    and never moved by ``.to``."""
    scratch = owner.__dict__.get("_selection_scratch")
    if scratch is None:
        scratch = owner.__dict__["_selection_scratch"] = SelectionScratch()
    return scratch


def selection_block_rows(batch: int, n: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per block of :func:`fused_topk`: the whole batch on an accelerator (its caching allocator reuses the
    memory), else as many as fit :data:`SELECTION_BLOCK_BYTES` (at least 64)."""
    if device.type != "cpu":
        return max(batch, 1)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(64, min(batch, SELECTION_BLOCK_BYTES // max(n * itemsize, 1)))


@torch.no_grad()
def fused_topk(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
               dead: torch.Tensor | None = None, k_dead: int = 0, dtype: torch.dtype | None = None,
               scratch: SelectionScratch | None = None, magnitude: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of the ``k`` largest entries per row of ``x @ weight.T + bias``, block by block (see above).

    x: (batch, d); weight: (n, d); bias: (n,) or None; ``dtype`` (e.g. bf16) computes the products in lower
    precision (selection only: the caller recomputes the chosen values exactly). With ``dead`` ((n,) bool) and
    ``k_dead`` > 0 it also returns, per row, the ``k_dead`` largest entries among the ``dead`` columns (AuxK's
    candidates) from the same block, else ``None``. Equal to ``pre.topk(k, sorted=False).indices`` of the dense
    ``pre`` up to ties and the order within a row. ``magnitude``: the largest ``|entries|`` instead (AbsTopK).
    """
    dtype = dtype or x.dtype
    batch, n = x.shape[0], weight.shape[0]
    left, right = x.to(dtype), weight.to(dtype).t()
    offset = None if bias is None else bias.to(dtype)
    indices = torch.empty(batch, k, dtype=torch.long, device=x.device)
    values = torch.empty(batch, k, dtype=dtype, device=x.device)
    with_dead = dead is not None and k_dead > 0
    dead_indices = torch.empty(batch, k_dead, dtype=torch.long, device=x.device) if with_dead else None
    dead_values = torch.empty(batch, k_dead, dtype=dtype, device=x.device) if with_dead else None
    rows = selection_block_rows(batch, n, dtype, x.device)
    scratch = scratch or SelectionScratch()
    alive = None if not with_dead else ~dead
    for start in range(0, batch, rows):
        stop = min(start + rows, batch)
        block = scratch.get(stop - start, n, dtype, x.device)
        torch.mm(left[start:stop], right, out=block)
        if offset is not None:
            block.add_(offset)
        if magnitude:
            block.abs_()
        torch.topk(block, k, dim=1, sorted=False, out=(values[start:stop], indices[start:stop]))
        if with_dead:
            block.masked_fill_(alive, float("-inf"))
            torch.topk(block, k_dead, dim=1, sorted=False, out=(dead_values[start:stop], dead_indices[start:stop]))
    return indices, dead_indices
