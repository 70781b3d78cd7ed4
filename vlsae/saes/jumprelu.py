"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

pi = W_enc (x - b_dec) + b_enc, z = pi * H(pi - theta), x_hat = z W_dec + b_dec,
with one learned threshold per latent, theta = exp(log_threshold) > 0, and
L = FVU(x, x_hat) + lambda * mean_b ||z||_0.

The step H has no useful gradient, so both terms use straight-through
pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < 1/2] and
bandwidth eps (:class:`_JumpReLU`, :class:`_Step`):

* d z / d theta := -(theta / eps) K((pi - theta) / eps); d z / d pi = H(pi - theta);
* d H / d theta := -(1 / eps) K((pi - theta) / eps); nothing reaches pi from the
  L0 term, so the penalty trains the thresholds only.

Defaults: eps = 0.05 and theta_0 = 0.01 (SAELens's), not the paper's 0.001:
our trainer scales inputs to E||x|| = sqrt(d_in), so a pre-activation of a
unit-norm direction is O(1), while the paper normalises E||x||^2 = 1, making
pre-activations ~1/sqrt(d) smaller; 0.05 here is about the same fraction of the
activation scale as 0.001 there. The MSE term is the normalised FVU, so
``l0_coef`` is "FVU per active latent per input": 1e-3 keeps a latent that
removes at least 0.1% of an input's variance. lambda ramps up linearly over
the first ``l0_warmup`` fraction of training. Decoder rows are unit norm.
Adam moves log(theta) by at most about the learning rate per step, so with a
small learning rate the thresholds need thousands of steps to climb from
theta_0 to the O(1) activation scale; raise ``init_threshold`` for short runs.

Sparse hot path: the dense pre-activation matmul runs without autograd; the
code holds every latent with pi > theta - eps/2 (the active ones plus those
inside the kernel window below the threshold, which have value 0 but need the
gradient with respect to their threshold); values are recomputed with
:func:`vlsae.kernels.sparse_encode`. While more than n_latents/16 latents per
row are candidates (early training, theta ~ 0.01), plain dense autograd is
faster and is used instead; both paths compute the same gradients.

Checkpoint tensors: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``
(n_latents,), holding theta itself. The module learns ``log_threshold``; the
state dict converts between the two, so files and ``sae.threshold`` show theta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode
from vlsae.saes import register_sae
from vlsae.saes.base import SAEConfig, TrainContext, TrainOutput, normalized_mse
from vlsae.saes.selection import compact, threshold_code
from vlsae.saes.topk import LinearEncoderSAE
from vlsae.sparse import SparseCode


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta), elementwise, with the STE gradient for theta."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta).to(grad.dtype)
        grad_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * grad
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta), elementwise; gradient for theta only."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((pre - theta) / eps) * grad
        return None, grad_theta, None


DENSE_ABOVE = 16  # train through dense autograd while rows hold more than n_latents / 16 candidates


@dataclass
class JumpReLUConfig(SAEConfig):
    l0_coef: float = option(1e-3, help="lambda of the L0 penalty, in FVU per active latent per input")
    l0_warmup: float = option(0.05, help="fraction of training over which lambda ramps up linearly from 0")
    bandwidth: float = option(0.05, help="width eps of the rectangle kernel of the straight-through threshold gradient")
    init_threshold: float = option(0.01, help="initial threshold theta of every latent")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l0_coef < 0:
            raise VlsaeError(f"l0_coef must be >= 0, got {self.l0_coef}")
        if not 0 <= self.l0_warmup <= 1:
            raise VlsaeError(f"l0_warmup is a fraction of training in [0, 1], got {self.l0_warmup}")
        if self.bandwidth <= 0 or self.init_threshold <= 0:
            raise VlsaeError(f"bandwidth and init_threshold must be positive, got {self.bandwidth}, {self.init_threshold}")


@register_sae("jumprelu")
class JumpReLUSAE(LinearEncoderSAE):
    config_class = JumpReLUConfig
    config: JumpReLUConfig

    def __init__(self, config: JumpReLUConfig):
        super().__init__(config)
        self.log_threshold = torch.nn.Parameter(torch.full((config.n_latents,), math.log(config.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        """(n_latents,) theta = exp(log_threshold)."""
        return self.log_threshold.exp()

    # Files hold theta under the name "threshold"; the module learns its log.
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        super()._save_to_state_dict(destination, prefix, keep_vars)
        log = destination.pop(prefix + "log_threshold")
        destination[prefix + "threshold"] = log.exp() if keep_vars else log.detach().exp()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "threshold"
        if key in state_dict:
            theta = state_dict.pop(key)
            if bool((theta < 0).any()):
                raise VlsaeError("JumpReLU thresholds must be >= 0; the checkpoint's 'threshold' tensor is damaged")
            state_dict[prefix + "log_threshold"] = theta.log()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        self.check_input(x)
        return threshold_code(self.pre_activations(x), self.threshold)

    def l0_weight(self, progress: float) -> float:
        """lambda at this point of training (linear warm-up)."""
        warmup = self.config.l0_warmup
        ramp = 1.0 if warmup <= 0 else min(progress / warmup, 1.0)
        return self.config.l0_coef * ramp

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        eps = self.config.bandwidth
        theta = self.threshold
        with torch.no_grad():
            pre = self.pre_activations(x)
            candidates = pre - theta > -eps / 2  # active, or inside the kernel window below theta
            width = int(candidates.sum(dim=1).max())
        if width * DENSE_ABOVE > self.n_latents:
            # Early in training (theta ~ 0.01) about half the latents fire; then
            # dense autograd is faster than the sparse kernels (crossover measured
            # at ~n_latents/16 candidates per row on the CPU).
            dense_pre = self.pre_activations(x)
            dense_theta = theta.expand_as(dense_pre)
            z = _JumpReLU.apply(dense_pre, dense_theta, eps)
            recon = torch.addmm(self.b_dec, z, self.W_dec)
            l0 = _Step.apply(dense_pre.detach(), dense_theta, eps).sum(dim=1).mean()
            indices, valid = compact(z.detach() != 0)
            values = torch.where(valid, z.gather(1, indices), 0.0)
        else:
            indices, valid = compact(candidates)
            pre_selected = self.selected_pre_activations(x, indices)
            theta_selected = theta[indices]
            values = torch.where(valid, _JumpReLU.apply(pre_selected, theta_selected, eps), 0.0)
            recon = sparse_decode(indices, values, self.W_dec) + self.b_dec
            steps = _Step.apply(pre_selected.detach(), theta_selected, eps)
            l0 = torch.where(valid, steps, 0.0).sum(dim=1).mean()
        losses = {"mse": normalized_mse(x, recon), "l0": self.l0_weight(ctx.progress) * l0}
        return TrainOutput(recon=recon, losses=losses, code=SparseCode(values, indices, self.n_latents))
