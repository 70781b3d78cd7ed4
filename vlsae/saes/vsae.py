"""Variational TopK SAE (Baker, Li et al., "Analysis of Variational Sparse Autoencoders",
arXiv 2509.22994): the project's negative control.

    mu = ReLU(W_enc (x - b_dec) + b_enc)                         (batch, n)
    log sigma^2 = clamp(W_var (x - b_dec) + b_var, -6, 2)         (learned_variance; else sigma = 1)
    z_hat = mu + sigma * eps, eps ~ N(0, I)                        (training only; inference uses mu)
    z = the k entries of z_hat largest in magnitude, with their sign, x_hat = z W_dec + b_dec

as in the TopK trainer of the reference fork (selection by |z_hat|); at
inference the code is the TopK of mu, which is non-negative. The loss is the
paper's ``||x - x_hat||^2 + lambda KL(N(mu, sigma^2) || N(0, I))`` with
``KL = 1/2 sum_i (mu_i^2 + sigma_i^2 - 1 - log sigma_i^2)`` over every latent
(with sigma = 1 it is the L2 penalty ``1/2 ||mu||^2``), plus AuxK on dead
latents. Both terms are divided by the batch's total variance, so the
reconstruction term is the FVU every other SAE here uses and ``kl_coef``
(lambda, default 3e-4 as in the reference's examples, linearly warmed up over
``kl_warmup`` of training) keeps its meaning relative to a summed squared error.
``log sigma^2`` starts at -2 (``W_var`` = 0, ``b_var`` = -2), the reference's
initialisation. The noise comes from torch's global generator, which the
trainer seeds and checkpoints, so resumed runs stay exact.

The paper reports that this SAE is worse than TopK on reconstruction and that
the KL term kills latents; vlsae keeps it to check that its benchmarks see that.

Dense by nature (the KL term reads every latent's mean), so training is plain
dense autograd; inference is a TopK of the dense means.

Checkpoint tensors: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` and, with
``learned_variance``, ``W_var`` (n, d) and ``b_var`` (n).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode
from vlsae.saes import register_sae
from vlsae.saes.base import TrainContext, TrainOutput, normalized_mse, row_variance
from vlsae.saes.topk import TopKConfig, TopKSAE
from vlsae.sparse import SparseCode

LOG_VAR_RANGE = (-6.0, 2.0)
LOG_VAR_INIT = -2.0


@dataclass
class VSAEConfig(TopKConfig):
    kl_coef: float = option(3e-4, help="lambda of the KL term, relative to a summed squared error")
    kl_warmup: float = option(0.05, help="fraction of training over which lambda ramps up linearly from 0")
    learned_variance: bool = option(False, help="learn log sigma^2 with a second linear head (default false: sigma = 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_coef < 0:
            raise VlsaeError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not 0 <= self.kl_warmup <= 1:
            raise VlsaeError(f"kl_warmup is a fraction of training in [0, 1], got {self.kl_warmup}")


def gaussian_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """(batch,) KL(N(mu, sigma^2) || N(0, I)) summed over latents: 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2)."""
    return 0.5 * (mu.pow(2) + log_var.exp() - 1.0 - log_var).sum(dim=1)


@register_sae("vsae")
class VSAE(TopKSAE):
    config_class = VSAEConfig
    config: VSAEConfig

    def __init__(self, config: VSAEConfig):
        super().__init__(config)
        if config.learned_variance:
            self.W_var = nn.Parameter(torch.zeros(config.n_latents, config.d_in))
            self.b_var = nn.Parameter(torch.full((config.n_latents,), LOG_VAR_INIT))

    def log_variance(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n) log sigma^2, clamped to [-6, 2]; zeros (sigma = 1) without a learned variance."""
        if not self.config.learned_variance:
            return torch.zeros(x.shape[0], self.n_latents, dtype=x.dtype, device=x.device)
        return torch.addmm(self.b_var, x - self.b_dec, self.W_var.t()).clamp(*LOG_VAR_RANGE)

    def kl_weight(self, progress: float) -> float:
        """lambda at this point of training (linear warm-up)."""
        warmup = self.config.kl_warmup
        ramp = 1.0 if warmup <= 0 else min(progress / warmup, 1.0)
        return self.config.kl_coef * ramp

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        pre = self.pre_activations(x)
        mu = torch.relu(pre)
        log_var = self.log_variance(x)
        sample = mu + (0.5 * log_var).exp() * torch.randn_like(mu)
        with torch.no_grad():
            indices = sample.abs().topk(self.config.k, dim=1, sorted=False).indices
        values = sample.gather(1, indices)
        recon = sparse_decode(indices, values, self.W_dec) + self.b_dec
        variance = row_variance(x).clamp_min(1e-8)
        losses = {"mse": normalized_mse(x, recon),
                  "kl": self.kl_weight(ctx.progress) * gaussian_kl(mu, log_var).mean() / variance}
        losses.update(self.aux_loss(x, pre.detach(), recon, ctx, self.config.aux_width, self.config.aux_coef))
        return TrainOutput(recon=recon, losses=losses, code=SparseCode(values, indices, self.n_latents))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """The base rule plus the variance head's input weights (both heads read x - b_dec)."""
        super().fold_input_scale(scale)
        if self.config.learned_variance:
            self.W_var.mul_(scale)
