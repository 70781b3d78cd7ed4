"""Scorers that read an SAE's codes of the image and the caption of a pair.

``vl-overlap`` and ``vl-jaccard`` are the concept-level agreement a VL-SAE
(one concept set for both modalities) makes natural: a matched pair should
fire the same concepts on both sides, a mismatched caption other ones.
``l0`` and ``cooc-l0`` are SAE-V's two other sample rankers (its code computes
them beside the cosine-weighted score): the mean number of active latents per
token, and the number of latents active on both the image and the caption.

With a TopK SAE every row has exactly k active latents, so ``l0`` ties every
pair; it ranks only with an SAE whose L0 varies by row (BatchTopK at inference,
ReLU, JumpReLU), as SAE-V's ReLU SAE does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from multimodal.filtering.scorers import register_scorer
from multimodal.filtering.scorers.base import PairBatch, Scorer


@register_scorer("vl-overlap")
class VlOverlap(Scorer):
    summary = "cosine of the image's and the caption's pooled SAE codes (0 when either side fires nothing)"
    needs_sae = True

    def score(self, batch: PairBatch) -> Tensor:
        image, text = batch.pooled("image").double(), batch.pooled("text").double()
        # the codes are zero outside their active latents, so this is the cosine over the union of active latents
        return torch.nn.functional.cosine_similarity(image, text, dim=1, eps=1e-12)


@register_scorer("vl-jaccard")
class VlJaccard(Scorer):
    summary = "Jaccard index of the latents active on the image and on the caption"
    needs_sae = True

    def score(self, batch: PairBatch) -> Tensor:
        image, text = batch.active("image"), batch.active("text")
        union = (image | text).sum(dim=1).double()
        return (image & text).sum(dim=1).double() / union.clamp_min(1)


@register_scorer("l0")
class MeanL0(Scorer):
    summary = "mean number of active latents per row (token) of the pair, image and caption rows together"
    needs_sae = True

    def score(self, batch: PairBatch) -> Tensor:
        total = torch.zeros(len(batch), dtype=torch.float64)
        rows = torch.zeros(len(batch), dtype=torch.float64)
        for modality in ("image", "text"):
            active = (batch.code(modality).values > batch.theta).sum(dim=1).double()
            total.index_add_(0, batch.pair_index[modality], active)
            rows += batch.rows_per_pair(modality).double()
        return total / rows.clamp_min(1)


@register_scorer("cooc-l0")
class CooccurringL0(Scorer):
    summary = "number of latents active on both the image and the caption (SAE-V's co-occurring L0)"
    needs_sae = True

    def score(self, batch: PairBatch) -> Tensor:
        return batch.co_active().sum(dim=1).double()
