"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024).

z = ReLU(TopK_k(W_enc (x - b_dec) + b_enc)), x_hat = z W_dec + b_dec.
Loss = ||x - x_hat||^2 / Var(x) + aux_coef * AuxK, where AuxK asks the
top-``k_aux`` *dead* latents to reconstruct the residual x - x_hat. The
decoder is unit norm; W_enc starts as W_dec (the transpose in the paper's
column layout). The dense pre-activation matmul runs without autograd; the
selected latents are recomputed through :func:`vlsae.kernels.sparse_encode`,
so backward is sparse (see kernels.py for why and the measured cost).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import fused_topk, scratch_of, sparse_decode, sparse_encode
from vlsae.saes import register_sae
from vlsae.saes.base import SAE, SAEConfig, TrainContext, TrainOutput, auxk_loss, dense_pre_activations, normalized_mse
from vlsae.sparse import SparseCode


@dataclass
class TopKConfig(SAEConfig):
    k: int = option(32, help="active latents per input")
    k_aux: int = option(0, help="dead latents used by AuxK; 0 means d_in // 2")
    aux_coef: float = option(1 / 32, help="weight of the AuxK loss (0 turns it off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.n_latents:
            raise VlsaeError(f"k must be in 1..n_latents ({self.n_latents}), got {self.k}")

    @property
    def aux_width(self) -> int:
        return self.k_aux or max(self.d_in // 2, 1)


class LinearEncoderSAE(SAE):
    """Shared parts of SAEs with a linear encoder ``W_enc``, ``b_enc``."""

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) -> (batch, n_latents) dense pre-activations."""
        return dense_pre_activations(x, self.W_enc, self.b_enc, self.b_dec)

    def selection_pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations used only to choose latents (no autograd), in ``selection_dtype``."""
        return dense_pre_activations(x, self.W_enc, self.b_enc, self.b_dec, self.selection_dtype)

    def selected_pre_activations(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Differentiable pre-activations of the latents in ``indices`` (batch, K) only."""
        return sparse_encode(x, self.W_enc, self.b_enc, indices, center=self.b_dec)

    def aux_loss(self, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor, ctx: TrainContext,
                 k_aux: int, coef: float, signed: bool = False) -> dict[str, torch.Tensor]:
        """AuxK over the trainer's dead latents; empty when none are dead or coef is 0."""
        width = self.aux_width(ctx, k_aux, coef)
        if not width:
            return {}
        with torch.no_grad():
            score = pre.abs() if signed else pre
            _, idx = score.masked_fill(~ctx.dead_mask, float("-inf")).topk(width, dim=1, sorted=False)
        return self.aux_loss_at(x, idx, recon, ctx, k_aux, coef, signed)

    @staticmethod
    def aux_width(ctx: TrainContext, k_aux: int, coef: float) -> int:
        """How many dead latents AuxK reads per row (0: no AuxK this step: coef 0 or none dead)."""
        dead = ctx.dead_mask
        if coef == 0 or dead is None or not bool(dead.any()):
            return 0
        return min(k_aux, int(dead.sum()))

    def aux_loss_at(self, x: torch.Tensor, idx: torch.Tensor, recon: torch.Tensor, ctx: TrainContext,
                    k_aux: int, coef: float, signed: bool = False) -> dict[str, torch.Tensor]:
        """AuxK from the chosen dead latents ``idx`` (batch, width): they reconstruct the residual."""
        vals = self.selected_pre_activations(x, idx)
        if not signed:
            vals = torch.relu(vals)
        aux_recon = sparse_decode(idx, vals, self.W_dec)
        n_dead = int(ctx.dead_mask.sum())
        return {"auxk": coef * auxk_loss((x - recon).detach(), aux_recon, n_dead, k_aux)}


@register_sae("topk")
class TopKSAE(LinearEncoderSAE):
    config_class = TopKConfig
    config: TopKConfig

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        """(batch, n_latents) -> (batch, k) indices of the active latents."""
        return pre.topk(self.config.k, dim=1, sorted=False).indices

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        self.check_input(x)
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.config.k, dim=1, sorted=False)
        return SparseCode(torch.relu(values), indices, self.n_latents)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        config = self.config
        width = self.aux_width(ctx, config.aux_width, config.aux_coef)
        # the encoder matmul and both top-ks (active latents, AuxK's dead ones) block by block, in
        # selection_dtype, without the (batch, n_latents) matrix (vlsae.kernels.fused_topk)
        with torch.no_grad():
            indices, dead_indices = fused_topk(x - self.b_dec, self.W_enc, self.b_enc, config.k, dead=ctx.dead_mask,
                                               k_dead=width, dtype=self.selection_dtype, scratch=scratch_of(self))
        values = torch.relu(self.selected_pre_activations(x, indices))
        recon = sparse_decode(indices, values, self.W_dec) + self.b_dec
        losses = {"mse": normalized_mse(x, recon)}
        if width:
            losses.update(self.aux_loss_at(x, dead_indices, recon, ctx, config.aux_width, config.aux_coef))
        return TrainOutput(recon=recon, losses=losses, code=SparseCode(values, indices, self.n_latents))
