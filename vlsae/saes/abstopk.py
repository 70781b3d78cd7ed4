"""AbsTopK SAE (Zhu, Khalili, Zhu; arXiv 2510.00404, ICLR 2026).

z = AbsTopK_k(W_enc (x - b_dec) + b_enc): keep the k pre-activations of
largest magnitude *with their sign*, no ReLU, so one latent covers a whole
axis (+z one pole, -z the other). Everything else is TopK: unit-norm decoder,
W_enc initialised as W_dec, loss = normalised MSE + AuxK, where AuxK picks the
dead latents by |pre-activation| and keeps their signs. Same sparse hot path
as TopK (one dense matmul without autograd, sparse recompute and backward).

Checkpoint tensors: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsae.kernels import fused_topk, scratch_of, sparse_decode
from vlsae.saes import register_sae
from vlsae.saes.base import TrainContext, TrainOutput, normalized_mse
from vlsae.saes.topk import TopKConfig, TopKSAE
from vlsae.sparse import SparseCode


@dataclass
class AbsTopKConfig(TopKConfig):
    """TopK's fields; the k kept latents are the largest in magnitude and signed."""


@register_sae("abstopk")
class AbsTopKSAE(TopKSAE):
    config_class = AbsTopKConfig
    config: AbsTopKConfig

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        """(batch, n_latents) -> (batch, k) indices of the largest |pre-activation|."""
        return pre.abs().topk(self.config.k, dim=1, sorted=False).indices

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        self.check_input(x)
        pre = self.pre_activations(x)
        indices = self.select(pre)
        return SparseCode(pre.gather(1, indices), indices, self.n_latents)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        config = self.config
        width = self.aux_width(ctx, config.aux_width, config.aux_coef)
        with torch.no_grad():  # TopK's fused block selection, by magnitude (AuxK's dead candidates too)
            indices, dead_indices = fused_topk(x - self.b_dec, self.W_enc, self.b_enc, config.k, dead=ctx.dead_mask,
                                               k_dead=width, dtype=self.selection_dtype, scratch=scratch_of(self),
                                               magnitude=True)
        values = self.selected_pre_activations(x, indices)
        recon = sparse_decode(indices, values, self.W_dec) + self.b_dec
        losses = {"mse": normalized_mse(x, recon)}
        if width:
            losses.update(self.aux_loss_at(x, dead_indices, recon, ctx, config.aux_width, config.aux_coef, signed=True))
        return TrainOutput(recon=recon, losses=losses, code=SparseCode(values, indices, self.n_latents))
