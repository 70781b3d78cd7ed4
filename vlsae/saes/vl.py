"""VL-SAE: one concept set for images and text (Shen et al. 2025), and its ablations.

``vl``: a distance-based encoder shared by every modality feeding one linear
decoder per modality. Each concept is a direction ``w_i`` (a row of ``W_enc``,
no encoder bias); an input is compared by direction only,

    s_i(x) = 2 - sqrt(max(2 - 2 cos(x, w_i), eps)),

and the k largest ``s_i`` (the k nearest concept directions on the sphere) stay
active. ``s`` is computed from the cosine with a clamp, so its gradient stays
finite as cos -> 1 (the released code goes through a pairwise distance whose
gradient blows up there). Because the encoder sees only directions and is the
same for every modality, an image and a caption that CLIP (or the alignment
stage) puts close together land on the same latents; each modality's decoder
and bias absorb the modality gap and the norm differences. The loss is the sum
over modalities of the reconstruction error of the un-normalised input,
divided by each modality's variance by default (``normalize_by_variance``;
the raw element-mean MSE is reported either way).

Ablations in the same registry, which ``vl`` must beat on shared-index agreement:
``vl-split`` (one linear ReLU-TopK encoder per modality, "SAE_D") and
``vl-shared`` (one linear ReLU-TopK encoder and one decoder, "SAE_V").

Checkpoint tensors: ``W_enc`` (n_latents, d_in); ``W_dec.<modality>``
(n_latents, d_in) and ``b_dec.<modality>`` (d_in,) for ``vl``; ``vl-split``
adds ``W_enc.<modality>``/``b_enc.<modality>``; ``vl-shared`` uses the plain
``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import fused_topk, scratch_of, sparse_decode, sparse_encode
from vlsae.saes import register_sae
from vlsae.saes.base import (Batch, MultimodalConfig, MultimodalSAE, TrainContext, TrainOutput, auxk_loss)
from vlsae.sparse import SparseCode


@dataclass
class VLConfig(MultimodalConfig):
    k: int = option(32, help="active concepts per input (the k nearest concept directions)")
    unit_norm_decoder: bool = option(False, help="keep decoder rows at unit norm (VL-SAE uses free linear decoders)")
    eps: float = option(1e-6, help="clamp inside the square root, keeps gradients finite as cos -> 1")
    k_aux: int = option(0, help="dead concepts used by AuxK; 0 means d_in // 2")
    aux_coef: float = option(1 / 32, help="weight of AuxK over the nearest dead directions (0 turns it off)")
    reinit_dead_every: int = option(0, help="every N steps re-initialise dead concept rows to training inputs (0: never)")
    center_inputs: bool = option(True, help="compare x - b_dec[modality] with the concepts (removes the modality gap before "
                                            "the cosine); false reproduces the released code, which compares raw x")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.n_latents:
            raise VlsaeError(f"k must be in 1..n_latents ({self.n_latents}), got {self.k}")

    @property
    def aux_width(self) -> int:
        return self.k_aux or max(self.d_in // 2, 1)


class PerModalityDecoderSAE(MultimodalSAE):
    """A multimodal SAE with one linear decoder (``W_dec.<m>``, ``b_dec.<m>``) per modality."""

    config: VLConfig

    def build_decoder(self) -> None:
        d, n = self.config.d_in, self.config.n_latents
        self.W_dec = nn.ParameterDict({m: nn.Parameter(torch.empty(n, d)) for m in self.config.modalities})
        self.b_dec = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m in self.config.modalities})
        self.reset_decoder()

    @torch.no_grad()
    def reset_decoder(self) -> None:
        for weight in self.W_dec.values():
            weight.normal_()
            weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(1e-12))
            if not self.config.unit_norm_decoder:
                weight.mul_(self.config.decoder_init_norm)

    @torch.no_grad()
    def init_decoder_bias(self, center: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """Start each modality's bias at that modality's data centre."""
        if not isinstance(center, dict):
            center = {m: center for m in self.modalities}
        for m, c in center.items():
            self.b_dec[self.resolve_modality(m)].copy_(c.to(self.b_dec[m]))

    def decode(self, code: SparseCode, modality: str | None = None) -> torch.Tensor:
        m = self.resolve_modality(modality)
        return sparse_decode(code.indices, code.values, self.W_dec[m]) + self.b_dec[m]

    # decoder-norm handling and scale folding, per modality
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if self.config.unit_norm_decoder:
            for w in self.W_dec.values():
                if w.grad is not None:
                    w.grad.sub_((w.grad * w).sum(dim=1, keepdim=True) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.config.unit_norm_decoder:
            for w in self.W_dec.values():
                w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def fold_input_scales(self, scales: dict[str, float]) -> None:
        for m, c in scales.items():
            m = self.resolve_modality(m)
            self.W_dec[m].div_(c)
            self.b_dec[m].div_(c)
            self._fold_encoder_scale(m, c)

    def _fold_encoder_scale(self, modality: str, scale: float) -> None:
        """Encoders that are not scale invariant fold the scale here."""


@register_sae("vl")
class VLSAE(PerModalityDecoderSAE):
    config_class = VLConfig

    def __init__(self, config: VLConfig):
        super().__init__(config)
        # Kaiming-uniform rows, as in the released code; only their directions matter.
        self.W_enc = nn.Parameter(torch.empty(config.n_latents, config.d_in))
        nn.init.kaiming_uniform_(self.W_enc, a=5 ** 0.5)

    def edits_parameters_in_forward(self, step: int) -> bool:
        """The dead-row re-initialisation sets W_enc rows to this batch's inputs."""
        every = self.config.reinit_dead_every
        return bool(every) and step > 0 and step % every == 0

    def concept_directions(self) -> torch.Tensor:
        """(n_latents, d_in) unit concept vectors."""
        return F.normalize(self.W_enc, dim=1)

    def unit_inputs(self, x: torch.Tensor, modality: str | None) -> torch.Tensor:
        """The directions the encoder compares: x (or x - b_dec[modality]) normalised."""
        if self.config.center_inputs:
            x = x - self.b_dec[self.resolve_modality(modality)]
        elif modality is not None:
            self.resolve_modality(modality)
        return F.normalize(x, dim=1)

    def scores(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        """Dense s(x): (batch, d_in) -> (batch, n_latents), in [0, 2]; for analysis."""
        cos = self.unit_inputs(x, modality) @ self.concept_directions().t()
        return self._distance_score(cos)

    def _distance_score(self, cos: torch.Tensor) -> torch.Tensor:
        return 2 - torch.sqrt(torch.clamp(2 - 2 * cos, min=self.config.eps))

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        """The k nearest concept directions of each row. The encoder is shared; ``modality``
        only selects which decoder bias centres the input (``center_inputs``)."""
        self.check_input(x)
        cos = self.unit_inputs(x, modality) @ self.concept_directions().t()
        values, indices = cos.topk(self.config.k, dim=1, sorted=False)
        return SparseCode(self._distance_score(values), indices, self.n_latents)

    @torch.no_grad()
    def _reinit_dead(self, batch: dict[str, torch.Tensor], dead: torch.Tensor) -> None:
        rows = torch.cat(list(batch.values()))
        dead_idx = dead.nonzero().squeeze(1)
        pick = torch.randint(0, rows.shape[0], (dead_idx.numel(),), device=rows.device)
        self.W_enc[dead_idx] = F.normalize(rows[pick], dim=1) * self.W_enc.norm(dim=1).mean()

    def training_forward(self, x: Batch, ctx: TrainContext) -> TrainOutput:
        batch = self.check_batch(x)
        cfg = self.config
        dead = ctx.dead_mask
        if cfg.reinit_dead_every and dead is not None and ctx.step > 0 and ctx.step % cfg.reinit_dead_every == 0 and bool(dead.any()):
            self._reinit_dead(batch, dead)
        directions = self.concept_directions()
        recon, losses, metrics, codes = {}, {}, {}, []
        for m, xm in batch.items():
            unit = self.unit_inputs(xm, m)
            n_dead = int(dead.sum()) if cfg.aux_coef and dead is not None else 0
            with torch.no_grad():  # the k nearest directions (and AuxK's nearest dead ones), block by block
                indices, aux_idx = fused_topk(unit, directions, None, cfg.k, dead=dead,
                                              k_dead=min(cfg.aux_width, n_dead), dtype=self.selection_dtype,
                                              scratch=scratch_of(self))
            values = self._distance_score(sparse_encode(unit, directions, None, indices))
            recon[m] = sparse_decode(indices, values, self.W_dec[m]) + self.b_dec[m]
            losses[f"recon_{m}"], metrics_m = self.modality_losses(xm, recon[m], m)
            metrics.update(metrics_m)
            if n_dead:
                aux_values = self._distance_score(sparse_encode(unit, directions, None, aux_idx))
                aux_recon = sparse_decode(aux_idx, aux_values, self.W_dec[m])
                losses[f"auxk_{m}"] = cfg.aux_coef * auxk_loss((xm - recon[m]).detach(), aux_recon, n_dead, cfg.aux_width)
            codes.append(SparseCode(values, indices, self.n_latents))
        code = SparseCode(torch.cat([c.values for c in codes]), torch.cat([c.indices for c in codes]), self.n_latents)
        return TrainOutput(recon=recon, losses=losses, code=code, metrics=metrics)


class _LinearTopKEncoder(nn.Module):
    """Linear + ReLU + TopK encoder used by the two ablations."""

    def __init__(self, d_in: int, n_latents: int, init_from: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init_from.detach().clone())
        self.bias = nn.Parameter(torch.zeros(n_latents))

    def select(self, centred: torch.Tensor, k: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (batch, k), differentiable values (batch, k)); ``dtype``: precision of the choice."""
        with torch.no_grad():
            indices, _ = fused_topk(centred, self.weight, self.bias, k, dtype=dtype, scratch=scratch_of(self))
        return indices, torch.relu(sparse_encode(centred, self.weight, self.bias, indices))


@register_sae("vl-split")
class VLSplitSAE(PerModalityDecoderSAE):
    """One linear ReLU-TopK encoder and one decoder per modality: no concept sharing."""

    config_class = VLConfig

    def __init__(self, config: VLConfig):
        super().__init__(config)
        self.enc = nn.ModuleDict({m: _LinearTopKEncoder(config.d_in, config.n_latents, self.W_dec[m] / self.W_dec[m].norm(dim=1, keepdim=True))
                                  for m in config.modalities})

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        self.check_input(x)
        m = self.resolve_modality(modality)
        with torch.no_grad():
            indices, values = self.enc[m].select(x - self.b_dec[m], self.config.k)
        return SparseCode(values, indices, self.n_latents)

    def training_forward(self, x: Batch, ctx: TrainContext) -> TrainOutput:
        batch = self.check_batch(x)
        recon, losses, metrics, codes = {}, {}, {}, []
        for m, xm in batch.items():
            indices, values = self.enc[m].select(xm - self.b_dec[m], self.config.k, self.selection_dtype)
            recon[m] = sparse_decode(indices, values, self.W_dec[m]) + self.b_dec[m]
            losses[f"recon_{m}"], metrics_m = self.modality_losses(xm, recon[m], m)
            metrics.update(metrics_m)
            codes.append(SparseCode(values, indices, self.n_latents))
        code = SparseCode(torch.cat([c.values for c in codes]), torch.cat([c.indices for c in codes]), self.n_latents)
        return TrainOutput(recon=recon, losses=losses, code=code, metrics=metrics)

    def _fold_encoder_scale(self, modality: str, scale: float) -> None:
        # encoder sees (x*c - b) = c (x - b/c): weight * c; the bias b_dec was already divided by c
        self.enc[modality].weight.mul_(scale)


@register_sae("vl-shared")
class VLSharedSAE(MultimodalSAE):
    """One linear ReLU-TopK encoder and one decoder for every modality (a plain SAE on the union).

    It keeps :class:`SAE`'s single decoder and its norm handling as they are; from
    :class:`MultimodalSAE` it takes only the paired-batch bookkeeping."""

    config_class = VLConfig
    config: VLConfig
    shared_input_scale = True  # one decoder for all modalities: the trainer scales them alike

    def __init__(self, config: VLConfig):
        super().__init__(config)
        self.W_enc = nn.Parameter((self.W_dec / self.W_dec.norm(dim=1, keepdim=True)).detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))

    @torch.no_grad()
    def init_decoder_bias(self, center: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """One bias for all modalities: the mean of their centres."""
        if isinstance(center, dict):
            center = torch.stack(list(center.values())).mean(0)
        super().init_decoder_bias(center)

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            indices, _ = fused_topk(x - self.b_dec, self.W_enc, self.b_enc, self.config.k, dtype=self.selection_dtype,
                                    scratch=scratch_of(self))
        return indices, torch.relu(sparse_encode(x, self.W_enc, self.b_enc, indices, center=self.b_dec))

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        self.check_input(x)
        if modality is not None:
            self.resolve_modality(modality)
        with torch.no_grad():
            indices, values = self._select(x)
        return SparseCode(values, indices, self.n_latents)

    def decode(self, code: SparseCode, modality: str | None = None) -> torch.Tensor:
        if modality is not None:
            self.resolve_modality(modality)
        return super().decode(code, modality)

    def training_forward(self, x: Batch, ctx: TrainContext) -> TrainOutput:
        batch = self.check_batch(x)
        recon, losses, metrics, codes = {}, {}, {}, []
        for m, xm in batch.items():
            indices, values = self._select(xm)
            recon[m] = sparse_decode(indices, values, self.W_dec) + self.b_dec
            losses[f"recon_{m}"], metrics_m = self.modality_losses(xm, recon[m], m)
            metrics.update(metrics_m)
            codes.append(SparseCode(values, indices, self.n_latents))
        code = SparseCode(torch.cat([c.values for c in codes]), torch.cat([c.indices for c in codes]), self.n_latents)
        return TrainOutput(recon=recon, losses=losses, code=code, metrics=metrics)

    @torch.no_grad()
    def fold_input_scales(self, scales: dict[str, float]) -> None:
        values = set(scales.values())
        if len(values) != 1:
            raise VlsaeError("vl-shared has one decoder for every modality, so it needs one input scale for all of them; "
                             "train it with per-modality scaling off")
        scale = values.pop()
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
