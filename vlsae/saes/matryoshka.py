"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen, Nanda, ICML 2025).

The dictionary is split into nested prefixes ``m_1 < m_2 < ... < m_G = n_latents``
and every prefix must reconstruct x on its own, so the first latents learn
general features and later ones refine them (less absorption):

    L = mean(FVU(x, b_dec), FVU(x, b_dec + sum_{i<m_1} z_i d_i), ..., FVU(x, x_hat)) + aux_coef * AuxK

(the reference code averages in the bias-only term too). The activation is
BatchTopK over the whole dictionary, with the same global threshold at
inference, so this class is :class:`BatchTopKSAE` with another loss. Each
prefix reconstruction is one sparse decode of the code with the later groups'
values zeroed: G decodes of a (batch, K) code, no dense latents.

``group_sizes`` are fractions of ``n_latents`` summing to 1 (default
[1/16, 1/16, 1/8, 1/4, 1/2], the reference's split) or integer sizes summing
to ``n_latents``.

Checkpoint tensors: as BatchTopK (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``,
``threshold``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode
from vlsae.saes import register_sae
from vlsae.saes.base import TrainContext, TrainOutput, normalized_mse
from vlsae.saes.batchtopk import BatchTopKConfig, BatchTopKSAE


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    group_sizes: tuple[int | float, ...] = option(
        (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2),
        help="nested group sizes: fractions of n_latents summing to 1, or integer sizes summing to n_latents",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.group_ends()  # validate now, so a bad config fails when it is built

    def group_ends(self) -> list[int]:
        """Exclusive end of each nested prefix; the last is n_latents."""
        sizes = list(self.group_sizes)
        n = self.n_latents
        if not sizes:
            raise VlsaeError("group_sizes must list at least one group")
        if any(s <= 0 for s in sizes):
            raise VlsaeError(f"group_sizes must be positive, got {sizes}")
        if all(isinstance(s, int) for s in sizes):
            if sum(sizes) != n:
                raise VlsaeError(f"integer group_sizes must sum to n_latents ({n}), got {sum(sizes)}; or give fractions summing to 1")
            ends, total = [], 0
            for s in sizes:
                total += s
                ends.append(total)
            return ends
        if abs(sum(sizes) - 1.0) > 1e-6:
            raise VlsaeError(f"fractional group_sizes must sum to 1, got {sum(sizes):g}; or give integer sizes summing to n_latents ({n})")
        ends, cumulative = [], 0.0
        for s in sizes:
            cumulative += s
            ends.append(round(cumulative * n))
        ends[-1] = n
        if ends[0] < 1 or any(b <= a for a, b in zip(ends, ends[1:])):
            raise VlsaeError(f"group_sizes {sizes} leave an empty group with n_latents={n}; use fewer or larger groups")
        return ends


@register_sae("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    config_class = MatryoshkaConfig
    config: MatryoshkaConfig

    def __init__(self, config: MatryoshkaConfig):
        super().__init__(config)
        self.register_buffer("group_ends", torch.tensor(config.group_ends()), persistent=False)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        pre, code = self.select_and_decode(x)
        group = torch.bucketize(code.indices, self.group_ends, right=True)  # (batch, K) group of each entry
        prefix = self.b_dec.expand_as(x)
        terms = [normalized_mse(x, prefix)]
        for g in range(len(self.group_ends)):
            part = torch.where(group == g, code.values, torch.zeros_like(code.values))
            prefix = prefix + sparse_decode(code.indices, part, self.W_dec)
            terms.append(normalized_mse(x, prefix))
        recon = prefix
        losses = {"mse": torch.stack(terms).mean()}
        losses.update(self.aux_loss(x, pre, recon, ctx, self.config.aux_width, self.config.aux_coef))
        return TrainOutput(recon=recon, losses=losses, code=code)
