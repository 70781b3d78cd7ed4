"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "April 2024 update").

z = ReLU(W_enc (x - b_dec) + b_enc), x_hat = z W_dec + b_dec,
L = mean_b ||x - x_hat||^2 + lambda * mean_b sum_i z_i ||d_i||.

Decoder norms are free (``unit_norm_decoder`` false): weighting the L1 by
||d_i|| stops the penalty from being gamed by shrinking z and growing d_i.
Decoder rows start in random directions with norm 0.1 and W_enc starts as
W_dec^T. ``l1_coef`` (lambda = 5) assumes inputs scaled to E||x|| = sqrt(d_in),
which the trainer does, and is paired with the *unnormalised* squared error
(sum over dimensions, mean over the batch), as in the recipe; lambda ramps up
linearly from 0 over the first ``l1_warmup`` fraction of training.

The activation is dense by nature, so training uses plain dense autograd;
codes are SparseCodes as wide as the busiest row.

Checkpoint tensors: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.saes import register_sae
from vlsae.saes.base import SAEConfig, TrainContext, TrainOutput
from vlsae.saes.selection import compact, threshold_code
from vlsae.saes.topk import LinearEncoderSAE
from vlsae.sparse import SparseCode


@dataclass
class ReLUConfig(SAEConfig):
    unit_norm_decoder: bool = option(False, help="keep decoder rows at unit norm; off, since the L1 is weighted by decoder norms")
    decoder_init_norm: float = option(0.1, help="initial decoder row norm")
    l1_coef: float = option(5.0, help="lambda of the norm-weighted L1 penalty (for inputs with E||x|| = sqrt(d_in))")
    l1_warmup: float = option(0.05, help="fraction of training over which lambda ramps up linearly from 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coef < 0:
            raise VlsaeError(f"l1_coef must be >= 0, got {self.l1_coef}")
        if not 0 <= self.l1_warmup <= 1:
            raise VlsaeError(f"l1_warmup is a fraction of training in [0, 1], got {self.l1_warmup}")


@register_sae("relu")
class ReLUSAE(LinearEncoderSAE):
    config_class = ReLUConfig
    config: ReLUConfig

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        self.check_input(x)
        pre = self.pre_activations(x)
        return threshold_code(pre, pre.new_zeros(()))

    def l1_weight(self, progress: float) -> float:
        """lambda at this point of training (linear warm-up)."""
        warmup = self.config.l1_warmup
        ramp = 1.0 if warmup <= 0 else min(progress / warmup, 1.0)
        return self.config.l1_coef * ramp

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        z = torch.relu(self.pre_activations(x))
        recon = torch.addmm(self.b_dec, z, self.W_dec)
        mse = (x - recon).pow(2).sum(dim=1).mean()
        l1 = (z * self.W_dec.norm(dim=1)).sum(dim=1).mean()
        losses = {"mse": mse, "l1": self.l1_weight(ctx.progress) * l1}
        indices, valid = compact(z.detach() > 0)
        code = SparseCode(torch.where(valid, z.detach().gather(1, indices), 0.0), indices, self.n_latents)
        return TrainOutput(recon=recon, losses=losses, code=code)
