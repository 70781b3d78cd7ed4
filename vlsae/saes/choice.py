"""Mutual Choice and Feature Choice SAEs, and the aux_zipf loss (Ayonrinde, arXiv 2411.02124).

Both read the batch's affinity matrix ``Z' = ReLU(W_enc (X - b_dec) + b_enc)``
(B rows, n latents) and keep a set of (row, latent) matches under a total
budget of ``k * B``:

* ``mc`` (Mutual Choice): the ``k * B`` largest entries of the whole matrix,
  no per-row or per-latent constraint. This is BatchTopK's selection (the paper
  says so; the test suite checks the two codes are equal on the same batch), so
  the class is :class:`BatchTopKSAE` with the choice of auxiliary loss.
* ``fc`` (Feature Choice): every latent j picks its own top ``m_j`` rows of the
  batch (positive affinities only), with ``sum_j m_j = k * B``. Every latent
  gets ``m_j >= 1``, so none can die. ``capacity: uniform`` gives
  ``m_j = k B / n``; ``capacity: zipf`` (the default) gives ``m_j`` proportional
  to ``rank_j ** -zipf_alpha``, where ``rank_j`` orders latents by their demand
  (an EMA of each latent's mean affinity, ``demand``). Ranking by demand and not
  by firing density matters: under FC a latent's density *is* its capacity, so
  ranking by density would freeze the first ranking forever.

Inference needs no batch: ``mc`` keeps BatchTopK's global ``threshold``; ``fc``
keeps one threshold per latent, an EMA (rate ``threshold_rate``) of the
smallest affinity the latent chose in a training batch, so a latent fires on
about the same share of rows at inference as its capacity gave it in training.

aux_zipf (``aux: zipf``). The paper describes it only as AuxK generalised from
dead to "dead and under-utilised" latents; the exact form is not public, so
this is our reading, stated here in full. Each SAE keeps ``density`` (n,), an
EMA (rate ``density_rate``) of the fraction of rows each latent fires on. Sort
the densities, fit a Zipf law ``log d = log c - alpha log rank`` by least
squares on the most frequent ``zipf_fit`` fraction of latents (the paper: the
spectrum is Zipfian except at the low end), and call a latent under-utilised
when its density is below ``c * rank ** -alpha / zipf_slack``. The AuxK term
(:func:`vlsae.saes.base.auxk_loss`) is then applied to the trainer's dead
latents together with the under-utilised ones. ``aux: auxk`` is plain AuxK.

Checkpoint tensors: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``
(``mc``: a scalar; ``fc``: (n,)), ``density`` (n,) and, for ``fc``, ``demand``
(n,). The EMAs are buffers, so a resumed run continues them exactly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode
from vlsae.saes import register_sae
from vlsae.saes.base import TrainContext, TrainOutput, normalized_mse
from vlsae.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from vlsae.saes.selection import compact, threshold_code
from vlsae.saes.topk import LinearEncoderSAE
from vlsae.sparse import SparseCode

AUX_KINDS = ("auxk", "zipf")
CAPACITIES = ("zipf", "uniform")


@dataclass
class MutualChoiceConfig(BatchTopKConfig):
    k: int = option(32, help="average active latents per input: the batch's budget is k * batch matches")
    aux: str = option("auxk", help="auxiliary loss: auxk (AuxK on dead latents) or zipf (aux_zipf: dead and under-utilised latents)")
    density_rate: float = option(0.01, help="EMA rate of each latent's firing density (the aux_zipf statistics)")
    zipf_fit: float = option(0.5, help="aux_zipf fits the Zipf law on this fraction of latents, most frequent first")
    zipf_slack: float = option(2.0, help="aux_zipf: a latent is under-utilised below its Zipf-predicted density divided by this")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.aux not in AUX_KINDS:
            raise VlsaeError(f"aux must be one of {', '.join(AUX_KINDS)}, got '{self.aux}'")
        if not 0 < self.density_rate <= 1:
            raise VlsaeError(f"density_rate must be in (0, 1], got {self.density_rate}")
        if not 0 < self.zipf_fit <= 1:
            raise VlsaeError(f"zipf_fit is a fraction of latents in (0, 1], got {self.zipf_fit}")
        if self.zipf_slack < 1:
            raise VlsaeError(f"zipf_slack must be >= 1, got {self.zipf_slack}")


@dataclass
class FeatureChoiceConfig(MutualChoiceConfig):
    capacity: str = option("zipf", help="how the k * batch budget is split over latents: zipf (by demand rank) or uniform")
    zipf_alpha: float = option(1.0, help="exponent of the Zipf capacities: m_j proportional to rank_j ** -zipf_alpha")
    threshold_rate: float = option(0.01, help="EMA rate of each latent's inference threshold (smallest affinity it chose per batch)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity not in CAPACITIES:
            raise VlsaeError(f"capacity must be one of {', '.join(CAPACITIES)}, got '{self.capacity}'")
        if self.zipf_alpha < 0:
            raise VlsaeError(f"zipf_alpha must be >= 0, got {self.zipf_alpha}")


# ------------------------------------------------------------------ Zipf law
def zipf_fit(density: torch.Tensor, fit_fraction: float) -> tuple[float, float]:
    """(log c, alpha) of ``log d = log c - alpha log rank`` fitted on the head of the spectrum.

    density: (n,) -> least squares over the ``fit_fraction`` most frequent latents
    with a positive density (alpha clamped at >= 0; a flat spectrum gives alpha 0).
    """
    ordered = density.detach().double().sort(descending=True).values
    head = ordered[:max(2, math.ceil(fit_fraction * ordered.numel()))]
    head = head[head > 0]
    if head.numel() == 0:
        return -math.inf, 0.0
    if head.numel() == 1:
        return float(head.log()), 0.0
    log_rank = torch.arange(1, head.numel() + 1, dtype=torch.float64).log()
    log_d = head.log()
    lr_c, ld_c = log_rank - log_rank.mean(), log_d - log_d.mean()
    alpha = max(0.0, float(-(lr_c * ld_c).sum() / lr_c.pow(2).sum()))
    return float(log_d.mean() + alpha * log_rank.mean()), alpha


def zipf_under_used(density: torch.Tensor, fit_fraction: float, slack: float) -> torch.Tensor:
    """(n,) bool: latents whose density is below their Zipf-predicted density / ``slack``."""
    log_c, alpha = zipf_fit(density, fit_fraction)
    if not math.isfinite(log_c):
        return torch.zeros_like(density, dtype=torch.bool)
    ranks = torch.empty_like(density, dtype=torch.float64)
    ranks[density.argsort(descending=True)] = torch.arange(1, density.numel() + 1, dtype=torch.float64,
                                                            device=density.device)
    predicted = torch.exp(log_c - alpha * ranks.log())
    return density.double() < predicted / slack


def allocate(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Integer capacities (n,) proportional to ``weights``, each in [1, cap], summing to
    ``total`` (clamped to [n, n * cap]). Shares above ``cap`` are capped and their excess
    shared out among the rest (water filling); then largest-remainder rounding, with the
    floor of 1 paid for by the most over-served entries."""
    n = weights.numel()
    total = min(max(int(total), n), n * cap)
    w = weights.double().clamp_min(0) + 1e-300
    capped = torch.zeros(n, dtype=torch.bool, device=weights.device)
    share = w / w.sum() * total
    while True:
        over = ~capped & (share > cap)
        if not bool(over.any()):
            break
        capped |= over
        free = total - cap * int(capped.sum())
        share = torch.where(capped, torch.full_like(w, float(cap)), w / w[~capped].sum() * free)
    base = share.floor().clamp(1, cap)
    owed = share - base
    short = int(total - base.sum())
    if short > 0:
        order = torch.where(base < cap, owed, torch.full_like(owed, -math.inf)).argsort(descending=True)[:short]
        base[order] += 1
    elif short < 0:
        order = torch.where(base > 1, owed, torch.full_like(owed, math.inf)).argsort()[:-short]
        base[order] -= 1
    return base.long()


class _ChoiceAux:
    """What mc and fc share: the density EMA and the choice between AuxK and aux_zipf."""

    config: MutualChoiceConfig
    density: torch.Tensor

    @torch.no_grad()
    def update_density(self, code: SparseCode) -> None:
        fired = torch.zeros_like(self.density)
        fired.index_add_(0, code.indices.reshape(-1), (code.values.detach() != 0).reshape(-1).to(fired.dtype))
        self.density.add_(self.config.density_rate * (fired / code.values.shape[0] - self.density))

    def aux_mask(self, ctx: TrainContext) -> torch.Tensor | None:
        """The latents the auxiliary loss fits to the residual: dead ones, plus under-utilised ones for aux_zipf."""
        dead = ctx.dead_mask
        if self.config.aux != "zipf":
            return dead
        under = zipf_under_used(self.density, self.config.zipf_fit, self.config.zipf_slack).to(self.density.device)
        return under if dead is None else (under | dead)

    def choice_aux_loss(self, x: torch.Tensor, pre: torch.Tensor, recon: torch.Tensor,
                        ctx: TrainContext) -> dict[str, torch.Tensor]:
        mask = self.aux_mask(ctx)
        terms = self.aux_loss(x, pre, recon, dataclasses.replace(ctx, dead_mask=mask),  # type: ignore[attr-defined]
                              self.config.aux_width, self.config.aux_coef)
        if self.config.aux == "zipf" and "auxk" in terms:
            terms = {"aux_zipf": terms["auxk"]}
        return terms


@register_sae("mc")
class MutualChoiceSAE(_ChoiceAux, BatchTopKSAE):
    config_class = MutualChoiceConfig
    config: MutualChoiceConfig

    def __init__(self, config: MutualChoiceConfig):
        super().__init__(config)
        self.register_buffer("density", torch.full((config.n_latents,), config.k / config.n_latents))

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        pre, code = self.select_and_decode(x)
        recon = sparse_decode(code.indices, code.values, self.W_dec) + self.b_dec
        losses = {"mse": normalized_mse(x, recon)}
        losses.update(self.choice_aux_loss(x, pre, recon, ctx))
        if self.training:
            self.update_density(code)
        return TrainOutput(recon=recon, losses=losses, code=code)


@register_sae("fc")
class FeatureChoiceSAE(_ChoiceAux, LinearEncoderSAE):
    config_class = FeatureChoiceConfig
    config: FeatureChoiceConfig
    buffer_reductions = {"threshold": "min"}  # data-parallel: each latent's smallest chosen value over ranks

    def __init__(self, config: FeatureChoiceConfig):
        super().__init__(config)
        n = config.n_latents
        self.register_buffer("threshold", torch.zeros(n))
        self.register_buffer("density", torch.full((n,), config.k / n))
        self.register_buffer("demand", torch.zeros(n))

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        """Inference: JumpReLU with each latent's learned threshold (no batch dependence)."""
        self.check_input(x)
        return threshold_code(self.pre_activations(x), self.threshold)

    def capacities(self, batch: int) -> torch.Tensor:
        """(n,) rows each latent may choose in a batch of ``batch`` rows; they sum to k * batch."""
        n = self.n_latents
        if self.config.capacity == "uniform":
            weights = torch.ones(n, dtype=torch.float64, device=self.demand.device)
        else:
            ranks = torch.empty(n, dtype=torch.float64, device=self.demand.device)
            ranks[self.demand.argsort(descending=True, stable=True)] = torch.arange(
                1, n + 1, dtype=torch.float64, device=self.demand.device)
            weights = ranks.pow(-self.config.zipf_alpha)
        return allocate(weights, self.config.k * batch, batch)

    @torch.no_grad()
    def choose(self, pre: torch.Tensor) -> torch.Tensor:
        """Feature choice on a (batch, n) affinity matrix: latent j keeps its top m_j rows
        with a positive affinity. Returns the (batch, n) bool choice."""
        batch = pre.shape[0]
        capacity = self.capacities(batch).to(pre.device)
        top = int(capacity.max())
        values, rows = pre.topk(top, dim=0, sorted=True)  # (top, n): each latent's best rows
        keep = (torch.arange(top, device=pre.device)[:, None] < capacity[None, :]) & (values > 0)
        chosen = torch.zeros_like(pre, dtype=torch.bool)
        chosen.scatter_(0, rows, keep)
        return chosen

    @torch.no_grad()
    def update_statistics(self, pre: torch.Tensor, code: SparseCode) -> None:
        """EMAs of the per-latent thresholds (the smallest value each latent chose in this
        batch; a latent's first choice sets its threshold directly) and of the demand."""
        chose = code.values.detach() > 0
        smallest = torch.full_like(self.threshold, math.inf)
        smallest.scatter_reduce_(0, code.indices[chose], code.values.detach()[chose].to(smallest), reduce="amin")
        picked = torch.isfinite(smallest)
        rate = self.config.threshold_rate
        moved = torch.where(self.threshold > 0, self.threshold + rate * (smallest - self.threshold), smallest)
        self.threshold.copy_(torch.where(picked, moved, self.threshold))
        self.demand.add_(self.config.density_rate * (torch.relu(pre).mean(dim=0).to(self.demand) - self.demand))

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        with torch.no_grad():
            pre = self.selection_pre_activations(x).float()
            chosen = self.choose(pre)
            indices, valid = compact(chosen)
        values = torch.relu(self.selected_pre_activations(x, indices))
        values = torch.where(valid, values, torch.zeros_like(values))
        code = SparseCode(values, indices, self.n_latents)
        recon = sparse_decode(indices, values, self.W_dec) + self.b_dec
        losses = {"mse": normalized_mse(x, recon)}
        losses.update(self.choice_aux_loss(x, pre, recon, ctx))
        if self.training:
            self.update_statistics(pre, code)
            self.update_density(code)
        return TrainOutput(recon=recon, losses=losses, code=code)
