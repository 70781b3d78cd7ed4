"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410).

Training: ``Z = ReLU(W_enc (X - b_dec) + b_enc)`` for a batch of B rows, and
only the ``B * k`` largest entries of the whole (B, n_latents) matrix are
kept, so L0 varies per row and averages k. Inference needs no batch: a
JumpReLU with one global ``threshold``, an EMA (rate 0.01, as in the reference
code) of the smallest positive selected activation of each training batch.
The first batch sets the threshold directly instead of averaging with the
initial 0, so short runs get a usable threshold; a threshold of 0 (an
untrained SAE) makes inference a plain ReLU. Loss: normalised MSE + AuxK.

The variable-L0 training code is a SparseCode whose width is the largest row
L0 in the batch, built by :func:`vlsae.saes.selection.batch_topk` (row-wise
topk over a cap, then one global topk, exact); unselected slots are zeros.

Checkpoint tensors: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold`` (a
scalar, in the same units as the pre-activations).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode
from vlsae.saes import register_sae
from vlsae.saes.base import TrainContext, TrainOutput, normalized_mse
from vlsae.saes.selection import batch_topk, threshold_code
from vlsae.saes.topk import LinearEncoderSAE, TopKConfig
from vlsae.sparse import SparseCode


@dataclass
class BatchTopKConfig(TopKConfig):
    k: int = option(32, help="average active latents per input: a training batch of B rows keeps its B*k largest activations")
    threshold_rate: float = option(0.01, help="EMA rate of the global inference threshold (smallest selected activation per batch)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold_rate <= 1:
            raise VlsaeError(f"threshold_rate must be in (0, 1], got {self.threshold_rate}")


@register_sae("batchtopk")
class BatchTopKSAE(LinearEncoderSAE):
    config_class = BatchTopKConfig
    config: BatchTopKConfig
    # data-parallel: every rank moves the EMA towards its slice's smallest selected value;
    # the min over ranks is the move towards the global batch's smallest one
    buffer_reductions = {"threshold": "min"}

    def __init__(self, config: BatchTopKConfig):
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros(()))

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        """Inference: JumpReLU with the learned global threshold (no batch dependence)."""
        self.check_input(x)
        return threshold_code(self.pre_activations(x), self.threshold)

    def select_and_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        """Training selection: dense pre-activations (no autograd), the batch's
        top B*k, sparse differentiable values. Returns (pre, code)."""
        with torch.no_grad():
            pre = self.selection_pre_activations(x)
            indices, selected = batch_topk(pre, self.config.k)
        values = torch.relu(self.selected_pre_activations(x, indices))
        values = torch.where(selected, values, torch.zeros_like(values))
        if self.training:
            self.update_threshold(values.detach())
        return pre, SparseCode(values, indices, self.n_latents)

    @torch.no_grad()
    def update_threshold(self, values: torch.Tensor) -> None:
        """EMA of the batch's smallest positive selected activation (no host sync)."""
        low = torch.where(values > 0, values, torch.full_like(values, float("inf"))).min().to(self.threshold)
        rate = self.config.threshold_rate
        updated = torch.where(self.threshold > 0, self.threshold + rate * (low - self.threshold), low)
        self.threshold.copy_(torch.where(torch.isfinite(low), updated, self.threshold))

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        pre, code = self.select_and_decode(x)
        recon = sparse_decode(code.indices, code.values, self.W_dec) + self.b_dec
        losses = {"mse": normalized_mse(x, recon)}
        losses.update(self.aux_loss(x, pre, recon, ctx, self.config.aux_width, self.config.aux_coef))
        return TrainOutput(recon=recon, losses=losses, code=code)
