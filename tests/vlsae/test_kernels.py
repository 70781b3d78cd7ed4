"""The sparse kernels equal dense autograd, forward and backward."""
import pytest
import torch

from vlsae import kernels
from vlsae.kernels import (SelectionScratch, TransposePattern, fused_topk, sampled_rows_dot, scatter_rows,
                          sparse_decode, sparse_encode)


@pytest.mark.parametrize("batch,width,n,d", [(7, 3, 20, 5), (64, 8, 128, 16), (1, 1, 4, 2)])
def test_sparse_encode_matches_dense(batch, width, n, d):
    x = torch.randn(batch, d, requires_grad=True)
    w = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    idx = torch.stack([torch.randperm(n)[:width] for _ in range(batch)])
    g = torch.randn(batch, width)
    out = sparse_encode(x, w, b, idx)
    (out * g).sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref = (x @ w.t() + b).gather(1, idx)
    (ref * g).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    for a, t in zip(got, (x, w, b)):
        assert torch.allclose(a, t.grad, atol=1e-5)


def test_sparse_decode_matches_dense_with_repeated_indices():
    batch, width, n, d = 32, 6, 10, 8
    idx = torch.randint(0, n, (batch, width))  # repeats allowed: contributions add up
    vals = torch.randn(batch, width, requires_grad=True)
    w = torch.randn(n, d, requires_grad=True)
    g = torch.randn(batch, d)
    out = sparse_decode(idx, vals, w)
    (out * g).sum().backward()
    gv, gw = vals.grad.clone(), w.grad.clone()
    vals.grad = w.grad = None
    dense = torch.zeros(batch, n).scatter_add(1, idx, vals)
    ref = dense @ w
    (ref * g).sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(gv, vals.grad, atol=1e-5)
    assert torch.allclose(gw, w.grad, atol=1e-5)


def test_helpers_on_empty_and_unused_rows():
    idx = torch.tensor([[0, 0], [3, 3]])
    vals = torch.ones(2, 2)
    dense = torch.eye(2)
    out = scatter_rows(idx, vals, dense, 5)
    assert out.shape == (5, 2)
    assert torch.equal(out[1], torch.zeros(2)) and torch.equal(out[0], torch.tensor([2.0, 0.0]))
    assert sampled_rows_dot(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 2), torch.zeros(4, 2)).shape == (0, 3)


def test_sparse_encode_with_a_centre_matches_dense():
    """``center`` (b_dec) gets the gradient of ``x - center`` without a (batch, d) gradient of x."""
    torch.manual_seed(1)
    x = torch.randn(40, 6, dtype=torch.float64)
    w = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 30, (40, 4))
    assert torch.autograd.gradcheck(lambda w, b, c: sparse_encode(x, w, b, idx, center=c), (w, b, c))
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c: sparse_encode(x, w, None, idx, center=c), (x, c))
    assert torch.allclose(sparse_encode(x, w, b, idx, center=c), ((x - c) @ w.t() + b).gather(1, idx))


def test_weight_gradients_share_one_transpose_pattern_per_code():
    torch.manual_seed(2)
    idx = torch.randint(0, 50, (64, 5))
    values, dense = torch.randn(64, 5), torch.randn(64, 7)
    reference = torch.zeros(64, 50).scatter_add(1, idx, values).t() @ dense
    first = kernels.transpose_pattern(idx, 50)
    assert kernels.transpose_pattern(idx, 50) is first  # the decoder's and encoder's products of one step
    assert torch.allclose(scatter_rows(idx, values, dense, 50), reference, atol=1e-5)
    idx[0, 0] = (idx[0, 0] + 1) % 50  # changed in place: the pattern is rebuilt, not reused
    assert kernels.transpose_pattern(idx, 50) is not first
    changed = torch.zeros(64, 50).scatter_add(1, idx, values).t() @ dense
    assert torch.allclose(scatter_rows(idx, values, dense, 50), changed, atol=1e-5)
    assert isinstance(first, TransposePattern)


@pytest.mark.parametrize("batch", [1, 100, 333])
def test_fused_topk_equals_the_dense_topk_block_by_block(batch, monkeypatch):
    """Several blocks (a tiny block budget), a last short block, AuxK's dead candidates from the same pass."""
    monkeypatch.setattr(kernels, "SELECTION_BLOCK_BYTES", 64 * 96 * 4)  # 64 rows of 96 fp32 latents per block
    torch.manual_seed(3)
    x, w, b = torch.randn(batch, 12, dtype=torch.float64), torch.randn(96, 12, dtype=torch.float64), torch.randn(96, dtype=torch.float64)
    dead = torch.rand(96) < 0.3
    scratch = SelectionScratch()
    indices, dead_indices = fused_topk(x, w, b, 7, dead=dead, k_dead=5, scratch=scratch)
    pre = x @ w.t() + b
    assert torch.equal(indices.sort(1).values, pre.topk(7, dim=1).indices.sort(1).values)
    masked = pre.masked_fill(~dead, float("-inf"))
    assert torch.equal(dead_indices.sort(1).values, masked.topk(5, dim=1).indices.sort(1).values)
    assert scratch.buffer.shape == (min(batch, 64), 96)  # one block's rows, reused by every block
    again, none = fused_topk(x, w, b, 7, scratch=scratch)
    assert none is None and torch.equal(again.sort(1).values, indices.sort(1).values)
    by_size, dead_by_size = fused_topk(x, w, b, 7, dead=dead, k_dead=5, scratch=scratch, magnitude=True)
    assert torch.equal(by_size.sort(1).values, pre.abs().topk(7, dim=1).indices.sort(1).values)  # AbsTopK
    masked_size = pre.abs().masked_fill(~dead, float("-inf"))
    assert torch.equal(dead_by_size.sort(1).values, masked_size.topk(5, dim=1).indices.sort(1).values)


def test_fused_topk_in_bf16_chooses_what_a_bf16_matmul_chooses():
    torch.manual_seed(4)
    x, w = torch.randn(256, 32), torch.randn(512, 32)
    got, _ = fused_topk(x, w, None, 8, dtype=torch.bfloat16)
    expected = (x.bfloat16() @ w.bfloat16().t()).float()
    kth = expected.topk(8, dim=1).values[:, -1:]
    assert bool((expected.gather(1, got) >= kth).all())  # every choice is among the bf16 top 8 (ties aside)


@pytest.mark.gpu
def test_fused_selection_and_a_topk_step_on_cuda_match_the_cpu():
    """On a GPU the same kernels run with one block per batch; the choice and the gradients match the CPU's."""
    from vlsae import create_sae
    from vlsae.saes.base import TrainContext

    torch.manual_seed(5)
    x = torch.randn(512, 64)
    w = torch.randn(1024, 64)
    cpu, _ = fused_topk(x, w, None, 16)
    gpu, _ = fused_topk(x.cuda(), w.cuda(), None, 16)
    assert torch.equal(gpu.cpu().sort(1).values, cpu.sort(1).values)
    grads = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(6)
        sae = create_sae("topk", d_in=64, n_latents=1024, k=16).to(device)
        out = sae.training_forward(x.to(device), TrainContext(step=1, progress=0.1))
        out.loss.backward()
        grads[device] = {n: p.grad.detach().cpu() for n, p in sae.named_parameters()}
    for name, grad in grads["cpu"].items():
        assert torch.allclose(grads["cuda"][name], grad, atol=1e-4, rtol=1e-3), name
