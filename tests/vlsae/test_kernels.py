"""The sparse kernels equal dense autograd, forward and backward."""
import pytest
import torch

from vlsae.kernels import sampled_rows_dot, scatter_rows, sparse_decode, sparse_encode


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
