"""The concept API: what each latent means, on tensors and row indices.

Encode a paired dataset (one tensor per modality, rows aligned by pair) to
sparse codes and summarise, per latent: its top rows in every modality, how
often and how strongly it fires per modality, its modality score (how much it
fires on images vs text) and its image-text agreement; per pair: the overlap of
the concepts the image and the caption activate. Turning row indices back into
images and captions happens above this layer (``evals`` reports), which keeps
``vlsae`` free of datasets and models.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlsae.errors import VlsaeError


@dataclass
class ConceptSummary:
    """Per-latent and per-pair statistics of a multimodal SAE on a paired dataset.

    top_rows[m], top_values[m]: (n_latents, top_n) row indices and activations of
    the strongest rows of modality m (value 0 = fewer rows fired);
    fire_rate[m], mean_activation[m]: (n_latents,);
    modality_score: (n_latents,) E_first[z] / (E_first[z] + E_second[z]), NaN if silent;
    agreement: (n_latents,) Jaccard over pairs of "fires on the first modality" and "fires on the second";
    pair_overlap: (n_pairs,) Jaccard of the active-latent sets of each pair's two rows;
    fvu[m], l0[m]: reconstruction and sparsity per modality.
    """

    modalities: tuple[str, ...]
    top_rows: dict[str, torch.Tensor]
    top_values: dict[str, torch.Tensor]
    fire_rate: dict[str, torch.Tensor]
    mean_activation: dict[str, torch.Tensor]
    modality_score: torch.Tensor
    agreement: torch.Tensor
    pair_overlap: torch.Tensor
    fvu: dict[str, float] = field(default_factory=dict)
    l0: dict[str, float] = field(default_factory=dict)

    @property
    def n_latents(self) -> int:
        return int(self.modality_score.shape[0])

    def alive(self) -> torch.Tensor:
        """(n_latents,) bool: fires at least once in some modality."""
        return torch.stack([r > 0 for r in self.fire_rate.values()]).any(0)


@torch.no_grad()
def summarize_concepts(sae, data: dict[str, torch.Tensor], top_n: int = 8, batch_size: int = 1024) -> ConceptSummary:
    """Stream ``data`` (modality -> (n_pairs, d) with aligned rows) through ``sae``.

    Works for multimodal SAEs (``encode(x, modality)``) and single-stream ones.
    Memory is O(n_latents * (top_n + batch_size)), independent of the dataset size.
    """
    if not data:
        raise VlsaeError("no activations to summarise")
    modalities = tuple(data)
    n_pairs = {t.shape[0] for t in data.values()}
    if len(n_pairs) != 1:
        raise VlsaeError(f"paired data must have the same number of rows per modality, got { {m: t.shape[0] for m, t in data.items()} }")
    n = n_pairs.pop()
    if n == 0:
        raise VlsaeError("no activations to summarise: the dataset is empty")
    n_latents = int(sae.n_latents)
    top_values = {m: torch.zeros(n_latents, top_n) for m in modalities}
    top_rows = {m: torch.full((n_latents, top_n), -1, dtype=torch.long) for m in modalities}
    fired = {m: torch.zeros(n_latents) for m in modalities}
    total = {m: torch.zeros(n_latents) for m in modalities}
    both = torch.zeros(n_latents)
    either = torch.zeros(n_latents)
    overlap = torch.zeros(n)
    sq_err = {m: 0.0 for m in modalities}
    l0_sum = {m: 0.0 for m in modalities}
    sums = {m: torch.zeros(data[m].shape[1], dtype=torch.float64) for m in modalities}
    sq_sums = {m: 0.0 for m in modalities}
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        active = {}
        for m in modalities:
            x = data[m][start:stop].float()
            code = sae.encode(x, m)
            dense = code.to_dense().float()
            active[m] = dense != 0
            fired[m] += active[m].sum(0)
            total[m] += dense.sum(0)
            l0_sum[m] += float(active[m].sum())
            recon = sae.decode(code, m)
            sq_err[m] += float((x - recon).pow(2).sum())
            sums[m] += x.sum(0).double()
            sq_sums[m] += float(x.double().pow(2).sum())
            rows = torch.arange(start, stop).expand(n_latents, -1)
            merged_values = torch.cat([top_values[m], dense.t()], dim=1)
            merged_rows = torch.cat([top_rows[m], rows], dim=1)
            best = merged_values.topk(top_n, dim=1)
            top_values[m] = best.values
            top_rows[m] = merged_rows.gather(1, best.indices)
        if len(modalities) >= 2:
            a, b = active[modalities[0]], active[modalities[1]]
            both += (a & b).sum(0)
            either += (a | b).sum(0)
            inter = (a & b).sum(1).float()
            union = (a | b).sum(1).float().clamp_min(1)
            overlap[start:stop] = inter / union
    for m in modalities:
        top_rows[m][top_values[m] <= 0] = -1
    mean_act = {m: total[m] / n for m in modalities}
    if len(modalities) >= 2:
        first, second = mean_act[modalities[0]], mean_act[modalities[1]]
        denom = first + second
        score = torch.where(denom > 0, first / denom.clamp_min(1e-12), torch.full_like(denom, float("nan")))
        agreement = torch.where(either > 0, both / either.clamp_min(1), torch.full_like(either, float("nan")))
    else:
        score = torch.full((n_latents,), float("nan"))
        agreement = torch.full((n_latents,), float("nan"))
        overlap = torch.full((n,), float("nan"))
    fvu = {}
    for m in modalities:
        variance = sq_sums[m] - float(sums[m].pow(2).sum()) / n
        fvu[m] = sq_err[m] / max(variance, 1e-12)
    return ConceptSummary(
        modalities=modalities, top_rows=top_rows, top_values=top_values,
        fire_rate={m: fired[m] / n for m in modalities}, mean_activation=mean_act,
        modality_score=score, agreement=agreement, pair_overlap=overlap,
        fvu=fvu, l0={m: l0_sum[m] / n for m in modalities},
    )


@torch.no_grad()
def latent_activations(sae, x: torch.Tensor, modality: str | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Dense (rows, n_latents) activations; for analysis on datasets that fit in memory."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size].float()
        code = sae.encode(chunk, modality)
        out.append(code.to_dense())
    return torch.cat(out) if out else torch.zeros(0, int(sae.n_latents))
