"""Sparse kernels for the SAE hot path (PyTorch on every device).

A TopK-style SAE touches only ``k`` of its ``n_latents`` rows per input, yet
plain autograd through ``topk`` back-propagates a dense ``(batch, n_latents)``
gradient and spends a second full matmul on the encoder weight. These kernels
keep every step after the one unavoidable dense matmul (choosing the active
latents) sparse:

* :func:`sparse_encode` recomputes the selected pre-activations with a sampled
  dense-dense product and back-propagates into ``W_enc`` with a CSR sparse
  matmul (``batch * k`` non-zeros, not ``batch * n_latents``);
* :func:`sparse_decode` decodes with ``embedding_bag`` and back-propagates the
  same way.

Measured on the 2-core CPU (batch 4096, d 512, 8192 latents, k 32): the dense
matmul is ~380 ms, the CSR transpose-matmul ~20 ms and the sampled product
~6 ms, so backward costs a few percent of forward instead of doubling it.
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


def scatter_rows(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, n_rows: int) -> torch.Tensor:
    """S^T @ dense for the sparse (batch, n_rows) matrix S = (indices, values).

    indices, values: (batch, K); dense: (batch, d) -> (n_rows, d).
    """
    batch, width = indices.shape
    dtype = _compute_dtype(dense)
    flat = indices.reshape(-1)
    order = torch.argsort(flat)
    columns = torch.div(order, width, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=dense.device)
    crow[1:] = counts.cumsum(0)
    matrix = torch.sparse_csr_tensor(crow, columns, values.reshape(-1)[order].to(dtype), (n_rows, batch),
                                     check_invariants=False)
    return (matrix @ dense.to(dtype)).to(dense.dtype)


class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, indices):  # type: ignore[override]
        ctx.save_for_backward(x, weight, indices)
        ctx.has_bias = bias is not None
        out = sampled_rows_dot(indices, x, weight)
        if bias is not None:
            out = out + bias[indices]
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, indices = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=grad.to(weight.dtype), mode="sum").to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = scatter_rows(indices, grad, x, weight.shape[0]).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_w, grad_b, None


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


def sparse_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices: torch.Tensor) -> torch.Tensor:
    """Pre-activations of the selected latents only.

    x: (batch, d); weight: (n_latents, d); bias: (n_latents,) or None;
    indices: (batch, K) -> (batch, K), equal to ``(x @ weight.T + bias).gather(1, indices)``.
    """
    return _SparseEncode.apply(x, weight, bias, indices)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * weight[indices[b, j]]; (batch, K) x (n, d) -> (batch, d)."""
    if indices.shape[1] == 0:
        return weight.new_zeros(indices.shape[0], weight.shape[1])
    return _SparseDecode.apply(indices, values, weight)
