"""SAE-V's data-filtering score (Lou et al. 2025, arXiv 2502.17514), as its released code computes it.

SAE-V trains one SAE on a multimodal LM's hidden states over image tokens and
text tokens together, then weighs each latent by how cross-modal it is:

1. Over a probe set, collect for latent f every (token, a_f(token)) in which f is
   among that token's top-50 latents, and keep f's **top 30** by activation.
2. If those 30 hold at least **5 text** and **5 image** tokens, f's weight is the
   mean cosine between the residual vectors (the hooked activations) of its
   5 strongest text tokens and its 5 strongest image tokens:
   ``w_f = 1/25 Σ_{i ∈ top-5 text} Σ_{j ∈ top-5 image} cos(h_i, h_j)``;
   otherwise f gets no weight (pure text or pure image features, rare ones).
3. A pair's score is ``Σ w_f`` over the latents active (value > θ) on both its
   image tokens and its text tokens (SAE-V: θ = 1 on its normalised ReLU SAE).

Memory stays bounded by the dictionary, not the probe set: the top-30 is kept
as a running (latents, 30) buffer of values and modality flags, the top 5 of
each modality as (latents, 5) buffers of values and row ids (the 5 strongest
text tokens among a top-30 that holds at least 5 text tokens are the 5
strongest text tokens overall, so the two buffers agree). A second pass over
the probe gathers the residual vectors of just the rows those buffers name,
instead of keeping every probe row.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlsae.errors import VlsaeError
from vlsae.sparse import SparseCode

from multimodal.filtering.scorers import register_scorer
from multimodal.filtering.scorers.base import PairBatch, ProbeBatches, Scorer

TOP = 30            # activations per latent that decide whether it is cross-modal
PER_MODALITY = 5    # strongest text and image tokens whose vectors are compared
PER_TOKEN = 50      # a token contributes to the latents among its own top 50
DENSE_ELEMENTS = 1 << 24  # rows x latents of one dense chunk while merging


def _merge_top(values: Tensor, rows: Tensor, flags: Tensor, new_values: Tensor, new_rows: Tensor,
               new_flags: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the largest ``values.shape[1]`` entries per latent of a buffer and new candidates.

    values, rows, flags: (latents, t) buffer; new_*: (latents, c) candidates. A value of 0 is an empty slot.
    """
    t = values.shape[1]
    all_values = torch.cat([values, new_values], dim=1)
    best, order = all_values.topk(t, dim=1)
    return best, torch.cat([rows, new_rows], dim=1).gather(1, order), torch.cat([flags, new_flags], dim=1).gather(1, order)


class CrossModalWeights:
    """Streaming SAE-V feature weights (see the module docstring).

    ``update(code, row_ids, is_text)`` takes the SAE codes of probe rows of one
    modality; ``needed_rows()`` names the rows whose vectors ``finish`` needs;
    ``finish(vectors)`` (row id -> residual vector) returns the weights.
    """

    def __init__(self, n_latents: int, top: int = TOP, per_modality: int = PER_MODALITY, per_token: int = PER_TOKEN):
        if per_modality * 2 > top:
            raise ValueError("per_modality tokens of each modality must fit in the top")
        self.n_latents, self.top, self.per_modality, self.per_token = n_latents, top, per_modality, per_token
        self.values = torch.zeros(n_latents, top)
        self.rows = torch.full((n_latents, top), -1, dtype=torch.long)
        self.is_text = torch.zeros(n_latents, top, dtype=torch.bool)
        self.best = {m: (torch.zeros(n_latents, per_modality), torch.full((n_latents, per_modality), -1, dtype=torch.long))
                     for m in ("image", "text")}

    def update(self, code: SparseCode, row_ids: Tensor, is_text: bool) -> None:
        """Add the rows of one modality: code (rows, K), row_ids (rows,) their ids in the probe."""
        values, indices = code.values.float().clamp_min(0), code.indices
        if values.shape[1] > self.per_token:  # a token counts for its own top-50 latents only
            values, order = values.topk(self.per_token, dim=1)
            indices = indices.gather(1, order)
        chunk = max(1, DENSE_ELEMENTS // self.n_latents)
        modality = "text" if is_text else "image"
        for lo in range(0, values.shape[0], chunk):
            v, i, ids = values[lo: lo + chunk], indices[lo: lo + chunk], row_ids[lo: lo + chunk]
            dense = torch.zeros(v.shape[0], self.n_latents).scatter_reduce_(1, i, v, reduce="amax", include_self=True)
            for buffer_top, target in ((self.top, None), (self.per_modality, modality)):
                t = min(buffer_top, v.shape[0])
                cand_values, cand_pos = dense.topk(t, dim=0)                   # (t, latents)
                cand_values, cand_rows = cand_values.T, ids[cand_pos].T      # (latents, t)
                if target is None:
                    flags = torch.full_like(cand_rows, is_text, dtype=torch.bool)
                    self.values, self.rows, self.is_text = _merge_top(self.values, self.rows, self.is_text,
                                                                      cand_values, cand_rows, flags)
                else:
                    best_values, best_rows = self.best[target]
                    merged = _merge_top(best_values, best_rows, best_rows >= 0, cand_values, cand_rows, cand_rows >= 0)
                    self.best[target] = merged[0], merged[1]

    def composition(self) -> tuple[Tensor, Tensor]:
        """(text, image) counts of each latent's top entries, (latents,) each."""
        filled = self.values > 0
        return (filled & self.is_text).sum(dim=1), (filled & ~self.is_text).sum(dim=1)

    def weighted_mask(self) -> Tensor:
        """(latents,) bool: latents whose top entries hold at least ``per_modality`` tokens of each modality."""
        text, image = self.composition()
        return (text >= self.per_modality) & (image >= self.per_modality)

    def needed_rows(self) -> Tensor:
        """Sorted ids of the probe rows whose residual vectors the weights need."""
        mask = self.weighted_mask()
        ids = torch.cat([self.best["text"][1][mask].reshape(-1), self.best["image"][1][mask].reshape(-1)])
        return torch.unique(ids[ids >= 0])

    def finish(self, vectors: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
        """(weights (latents,) float64, weighted (latents,) bool); unweighted latents weigh 0."""
        mask = self.weighted_mask()
        weights = torch.zeros(self.n_latents, dtype=torch.float64)
        for latent in torch.nonzero(mask).flatten().tolist():
            text = torch.stack([vectors[int(r)] for r in self.best["text"][1][latent]]).double()
            image = torch.stack([vectors[int(r)] for r in self.best["image"][1][latent]]).double()
            text = text / text.norm(dim=1, keepdim=True).clamp_min(1e-12)
            image = image / image.norm(dim=1, keepdim=True).clamp_min(1e-12)
            weights[latent] = (text @ image.T).mean()
        return weights, mask

    def summary(self, weights: Tensor, mask: Tensor) -> dict[str, Any]:
        text, image = self.composition()
        fired = (text + image) > 0
        return {"latents": self.n_latents, "weighted": int(mask.sum()), "fired": int(fired.sum()),
                "text_only": int((fired & (image == 0)).sum()), "image_only": int((fired & (text == 0)).sum()),
                "mean_weight": float(weights[mask].mean()) if mask.any() else None}


def _row_ids(batch: PairBatch, offset: int) -> tuple[dict[str, Tensor], int]:
    """Probe row ids of a batch's modalities (image rows first, then text), and the next offset."""
    ids = {}
    for modality in ("image", "text"):
        n = batch.acts[modality].shape[0]
        ids[modality] = torch.arange(offset, offset + n)
        offset += n
    return ids, offset


def cross_modal_weights(probe: ProbeBatches, n_latents: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """SAE-V weights from probe batches (run twice: top entries first, then the vectors they name)."""
    weights = CrossModalWeights(n_latents)
    offset = 0
    for batch in probe():
        if "image" not in batch.acts or "text" not in batch.acts:
            raise VlsaeError("saev needs image and text rows at one hook; use a decoder hook of a LLaVA (layers.N)")
        ids, offset = _row_ids(batch, offset)
        for modality in ("image", "text"):
            weights.update(batch.code(modality), ids[modality], is_text=modality == "text")
    if offset == 0:
        raise VlsaeError("the probe pairs gave no rows; check --probe")
    needed = weights.needed_rows()
    vectors: dict[int, Tensor] = {}
    offset = 0
    for batch in probe():
        ids, offset = _row_ids(batch, offset)
        for modality in ("image", "text"):
            hit = torch.isin(ids[modality], needed)
            for row, vector in zip(ids[modality][hit].tolist(), batch.acts[modality][hit]):
                vectors[row] = vector.float().clone()
    if len(vectors) != needed.numel():
        raise VlsaeError("the probe pairs changed between the two passes of the SAE-V weights; the model must be "
                         "deterministic")
    w, mask = weights.finish(vectors)
    return w, mask, weights.summary(w, mask)


@register_scorer("saev")
class SaevScore(Scorer):
    summary = ("SAE-V: sum of cross-modal weights of the latents active on both the image's and the caption's "
               "tokens (token-level SAE on a multimodal LM)")
    needs_sae = True
    needs_probe = True

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.weights: Tensor | None = None
        self.info: dict[str, Any] = {}

    def fit(self, probe: ProbeBatches, sae: Any) -> dict[str, Any]:
        self.weights, mask, self.info = cross_modal_weights(probe, int(sae.n_latents))
        self._mask = mask
        return self.info

    def state(self) -> dict[str, Tensor]:
        return {"weights": self.weights, "weighted": self._mask.to(torch.uint8)} if self.weights is not None else {}

    def load_state(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        self.weights, self._mask = tensors["weights"].double(), tensors["weighted"].bool()
        self.info = {"latents": int(self.weights.numel()), "weighted": int(self._mask.sum()),
                     "mean_weight": float(self.weights[self._mask].mean()) if self._mask.any() else None}
        return self.info

    def score(self, batch: PairBatch) -> Tensor:
        if self.weights is None:
            raise RuntimeError("saev scorer used before fit")
        both = batch.co_active()
        if both.shape[1] != self.weights.numel():
            raise VlsaeError(f"the SAE has {both.shape[1]} latents but the SAE-V weights {self.weights.numel()}; "
                             f"use the SAE the weights were computed with")
        return both.double() @ self.weights
