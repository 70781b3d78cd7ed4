"""top-AFA SAE (Lee, Davies, Canby, Hockenmaier, "Evaluating and Designing SAEs by
Approximating Quasi-Orthogonality", arXiv 2503.24277).

No fixed k: each input keeps as many latents as it takes for the norm of its
code to match the norm of the input. Under epsilon-quasi-orthogonal unit atoms a
dense vector ``z = sum_i f_i d_i`` has ``||z|| ~ ||f||`` (the approximate feature
activation, AFA), so the code norm is a per-input budget.

    x_c = x - b_dec,   a = ReLU(W_enc x_c)            (no encoder bias)
    s_(1) >= s_(2) >= ...  the sorted a_i ||d_i||,    S_j = s_(1)^2 + ... + s_(j)^2
    k* = argmin_j | sqrt(S_j) - ||x_c|| |             (j in 1 .. n-1: the last index is disallowed)
    z  = the k* latents with the largest a_i ||d_i||, x_hat = z W_dec + b_dec

Loss: ``FVU + afa_coef * mean_b (||f~|| - ||x_c||)^2 / v + aux_coef * AuxK``,
with ``f~ = (z_i ||d_i||)_i`` over the kept latents and ``v`` the batch's mean
per-dimension variance. The reference divides nothing, but it trains on inputs
standardised per token (per-dimension variance ~1) with a per-element MSE,
which is what the FVU is for such inputs; dividing by ``v`` keeps its weighting
for inputs of any scale. ``afa_coef`` 1/32 is in the paper's sweep {1/128, ...,
1/16}; AuxK (k_aux d_in/2, 1/32) and the unit-norm decoder with W_enc = W_dec
at init follow the reference's BatchTopK-derived setup.

``max_k`` caps k* (0: n_latents - 1, the full rule) so that the per-row sort can
be a ``topk`` on very wide dictionaries. The choice is per input, so inference
is the same rule (no batch dependence, no threshold); :meth:`encode` returns a
code as wide as the batch's largest k*. The scale folding keeps k*: activations,
decoder norms and ``||x_c||`` all scale together.

Checkpoint tensors: ``W_enc``, ``W_dec``, ``b_dec``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode
from vlsae.saes import register_sae
from vlsae.saes.base import SAEConfig, TrainContext, TrainOutput, normalized_mse, row_variance
from vlsae.saes.topk import LinearEncoderSAE
from vlsae.sparse import SparseCode


@dataclass
class TopAFAConfig(SAEConfig):
    afa_coef: float = option(1 / 32, help="weight of the AFA term (||code|| - ||x - b_dec||)^2")
    max_k: int = option(0, help="largest number of active latents considered per input (0: n_latents - 1)")
    k_aux: int = option(0, help="dead latents used by AuxK; 0 means d_in // 2")
    aux_coef: float = option(1 / 32, help="weight of the AuxK loss (0 turns it off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_latents < 2:
            raise VlsaeError("top-AFA needs at least 2 latents (the last index of the cumulative norm is disallowed)")
        if self.afa_coef < 0:
            raise VlsaeError(f"afa_coef must be >= 0, got {self.afa_coef}")
        if self.max_k < 0 or self.max_k >= self.n_latents:
            raise VlsaeError(f"max_k must be in 0..n_latents-1 ({self.n_latents - 1}), got {self.max_k}")

    @property
    def aux_width(self) -> int:
        return self.k_aux or max(self.d_in // 2, 1)

    @property
    def candidates(self) -> int:
        return self.max_k or self.n_latents - 1


def afa_choice(pre: torch.Tensor, decoder_norms: torch.Tensor, input_norms: torch.Tensor,
               candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-AFA selection. pre: (batch, n) pre-activations; decoder_norms: (n,);
    input_norms: (batch,) ||x - b_dec||. Returns indices (batch, K) sorted by a_i ||d_i||
    (K = the batch's largest k*) and k* (batch,)."""
    scaled = torch.relu(pre) * decoder_norms
    top, indices = scaled.topk(candidates, dim=1, sorted=True)
    code_norms = top.pow(2).cumsum(dim=1).sqrt()
    k_star = (code_norms - input_norms[:, None]).abs().argmin(dim=1) + 1
    width = int(k_star.max())
    return indices[:, :width].contiguous(), k_star


@register_sae("topafa")
class TopAFASAE(LinearEncoderSAE):
    config_class = TopAFAConfig
    config: TopAFAConfig

    def __init__(self, config: TopAFAConfig):
        super().__init__(config)
        self.register_parameter("b_enc", None)  # top-AFA has no encoder bias

    def select(self, x: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices (batch, K), valid (batch, K) bool) of each row's k* latents."""
        with torch.no_grad():
            input_norms = (x - self.b_dec).norm(dim=1).to(pre.dtype)
            indices, k_star = afa_choice(pre, self.W_dec.norm(dim=1).to(pre.dtype), input_norms, self.config.candidates)
            valid = torch.arange(indices.shape[1], device=x.device)[None, :] < k_star[:, None]
        return indices, valid

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        self.check_input(x)
        pre = self.pre_activations(x)
        indices, valid = self.select(x, pre)
        values = torch.where(valid, torch.relu(pre.gather(1, indices)), 0.0)
        return SparseCode(values, indices, self.n_latents)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        with torch.no_grad():
            pre = self.selection_pre_activations(x)
        indices, valid = self.select(x, pre)
        values = torch.where(valid, torch.relu(self.selected_pre_activations(x, indices)), 0.0)
        recon = sparse_decode(indices, values, self.W_dec) + self.b_dec
        code_norms = (values * self.W_dec.norm(dim=1)[indices]).pow(2).sum(dim=1).clamp_min(1e-12).sqrt()
        input_norms = (x - self.b_dec).norm(dim=1)
        per_dim_variance = (row_variance(x) / x.shape[1]).clamp_min(1e-8)
        losses = {"mse": normalized_mse(x, recon),
                  "afa": self.config.afa_coef * (code_norms - input_norms).pow(2).mean() / per_dim_variance}
        losses.update(self.aux_loss(x, pre, recon, ctx, self.config.aux_width, self.config.aux_coef))
        return TrainOutput(recon=recon, losses=losses, code=SparseCode(values, indices, self.n_latents))
