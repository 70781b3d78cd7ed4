"""g-SAE: gradient-aware TopK (Olmo, Wilson, Forsey, Hepner, Howe, Wingate; arXiv 2411.10397, NAACL 2025 Findings).

TopK keeps the k largest activations, so a feature with a small norm but a
large effect downstream loses its slot to large, inconsequential ones and is
never learned. g-SAE chooses by activation *and* downstream effect:

    z = ReLU(pre),   s = z + beta * z * |W_dec g|,   idx = TopK_k(s)

where g = dL/dx is the gradient of the downstream loss at the input row, so
(W_dec g)_i = <d_i, g> is the first-order change of the loss per unit of
latent i and z_i |<d_i, g>| that latent's attribution. The chosen latents
pass their *original* values on (z * 1[idx]); the loss is TopK's (normalised
MSE + AuxK), so only the choice differs. (Rows with fewer than k positive
pre-activations rank the negative ones as TopK does.)

g is normalised per row by default (``grad_norm: unit``), and the effect term
uses the cosine |<d_i, g>| / ||d_i||: the boost factor 1 + beta |cos(d_i, g)|
then lies in [1, 1 + beta] whatever the scale of the downstream loss, so beta
means the same for a linear probe and for CLIP's zero-shot logits, and the
choice does not change when the input scale is folded into the weights. The
paper's normalisation is not stated; ``grad_norm: none`` is the raw formula.

The gradient comes from the trainer's readout: ``train(sae, source,
readout=...)`` (or ``readout: {kind: ...}`` in a run config) computes g for
every batch and passes it in ``TrainContext.downstream_grad``; the trainer
refuses to start a g-SAE without one. A direct ``training_forward`` without a
gradient is plain TopK. Inference has no gradient: ``encode`` is TopK, and
``encode_guided(x, grad)`` makes the gradient-aware choice when one is at hand.

Checkpoint tensors: as topk (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode
from vlsae.saes import register_sae
from vlsae.saes.base import TrainContext, TrainOutput, normalized_mse
from vlsae.saes.topk import TopKConfig, TopKSAE
from vlsae.sparse import SparseCode

GRAD_NORMS = ("unit", "none")


@dataclass
class GSAEConfig(TopKConfig):
    beta: float = option(1.0, help="weight of the downstream-effect term: s = z + beta * z * |W_dec g| (paper sweeps 0.5, 1, 2)")
    grad_norm: str = option("unit", help="unit: g scaled to unit norm per row and the effect taken as a cosine (scale-free "
                                         "beta); none: the raw formula")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise VlsaeError(f"beta must be >= 0, got {self.beta}")
        if self.grad_norm not in GRAD_NORMS:
            raise VlsaeError(f"grad_norm must be one of {', '.join(GRAD_NORMS)}, got '{self.grad_norm}'")


@register_sae("gsae")
class GSAE(TopKSAE):
    config_class = GSAEConfig
    config: GSAEConfig
    uses_downstream_grad: ClassVar[bool] = True  # the trainer computes ctx.downstream_grad from its readout

    @torch.no_grad()
    def effect(self, grad: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) downstream gradient -> (batch, n_latents) |<d_i, g>| (a cosine with grad_norm unit)."""
        W = self.W_dec.detach()
        g = grad.to(W.dtype)
        if self.config.grad_norm == "unit":
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            return (g @ W.t()).abs() / W.norm(dim=1).clamp_min(1e-12)
        return (g @ W.t()).abs()

    @torch.no_grad()
    def guided_scores(self, pre: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        """s = pre + beta * ReLU(pre) * effect: equals z (1 + beta * effect) where pre > 0, and pre where it is not,
        so rows short of k positive latents fall back to TopK's order. ``grad`` None: s = pre (TopK)."""
        if grad is None or self.config.beta == 0:
            return pre
        return pre + self.config.beta * torch.relu(pre) * self.effect(grad).to(pre.dtype)

    def encode_guided(self, x: torch.Tensor, grad: torch.Tensor) -> SparseCode:
        """The gradient-aware choice at inference: x, grad (batch, d_in) in the same (raw) space."""
        self.check_input(x)
        if grad.shape != x.shape:
            raise VlsaeError(f"the downstream gradient must have the input's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
        pre = self.pre_activations(x)
        indices = self.guided_scores(pre.detach(), grad).topk(self.config.k, dim=1, sorted=False).indices
        return SparseCode(torch.relu(pre.gather(1, indices)), indices, self.n_latents)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        grad = ctx.downstream_grad
        if grad is not None and grad.shape != x.shape:
            raise VlsaeError(f"the downstream gradient has shape {tuple(grad.shape)} for a batch of shape {tuple(x.shape)}")
        with torch.no_grad():
            pre = self.selection_pre_activations(x)
            scores = self.guided_scores(pre, grad)
            indices = self.select(scores)
            metrics: dict = {}
            if grad is not None:  # how often the gradient changed the choice (0: TopK's latents exactly);
                # a 0-d tensor, read by the trainer only on logged steps (no host sync per step)
                plain = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, self.select(pre), True)
                metrics["guided_swaps"] = 1.0 - plain.gather(1, indices).float().mean()
        values = torch.relu(self.selected_pre_activations(x, indices))
        recon = sparse_decode(indices, values, self.W_dec) + self.b_dec
        losses = {"mse": normalized_mse(x, recon)}
        losses.update(self.aux_loss(x, pre, recon, ctx, self.config.aux_width, self.config.aux_coef))
        return TrainOutput(recon=recon, losses=losses, code=SparseCode(values, indices, self.n_latents), metrics=metrics)
