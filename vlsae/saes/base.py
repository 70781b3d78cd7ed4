"""What every SAE architecture shares: config base, module base, training I/O.

An architecture is one file in this package: a config dataclass (subclass of
:class:`SAEConfig`), a module (subclass of :class:`SAE`) and the decorator
``@register_sae("name")``. The base class supplies the parameter layout that
checkpoints document (``W_enc`` (n_latents, d_in), ``b_enc`` (n_latents,),
``W_dec`` (n_latents, d_in), ``b_dec`` (d_in,)), decoder-norm handling, input
scale folding and the dense/sparse conversions. Architectures override only
what differs.

Multimodal SAEs (:class:`MultimodalSAE`) train on paired batches, a dict of
modality -> (batch, d_in) rows, and say which modalities in one place: the
``modalities`` attribute every SAE has (empty for a single-stream SAE). Every
SAE takes the same ``encode(x, modality=None)`` / ``decode(code, modality=None)``;
a single-stream SAE ignores the modality.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Union

import torch
from torch import nn
import torch.nn.functional as F

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode
from vlsae.sparse import SparseCode

Batch = Union[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class SAEConfig:
    """Inference config: what a checkpoint needs to be rebuilt and used."""

    d_in: int = option(help="width of the input activations")
    n_latents: int = option(help="number of dictionary latents")
    unit_norm_decoder: bool = option(True, help="keep decoder rows at unit norm (gradient parallel to each row removed)")
    decoder_init_norm: float = option(0.1, help="initial decoder row norm when unit_norm_decoder is false")
    hook: str = option("", help="where the activations came from (model spec and hook point), for the record")

    def __post_init__(self) -> None:
        if self.d_in is None or self.n_latents is None:
            raise VlsaeError("an SAE config needs d_in and n_latents")
        if self.d_in <= 0 or self.n_latents <= 0:
            raise VlsaeError(f"d_in and n_latents must be positive, got d_in={self.d_in}, n_latents={self.n_latents}")


@dataclass
class TrainContext:
    """What the trainer tells an SAE about the current step."""

    step: int = 0
    progress: float = 0.0  # fraction of training done, in [0, 1]
    dead_mask: torch.Tensor | None = None  # (n_latents,) bool: latents counted dead by the trainer
    # (batch, d_in) gradient of the downstream loss with respect to the (scaled) input rows, computed by the
    # trainer from its readout for SAEs that ask for it (``uses_downstream_grad``); None otherwise
    downstream_grad: torch.Tensor | None = None


@dataclass
class TrainOutput:
    """recon: (batch, d_in) or a dict modality -> tensor; losses: named scalar terms
    summed into the objective; code: the sparse code, for L0 and fired-latent tracking."""

    recon: Batch
    losses: dict[str, torch.Tensor]
    code: SparseCode
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


class SAE(nn.Module):
    """Base module. Subclasses set ``config_class`` and implement ``encode`` and
    ``training_forward``; ``decode`` defaults to a sparse linear decoder."""

    arch: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # dtype of the no-grad matmul that only *chooses* the active latents during
    # training (None: the parameters' dtype). The trainer sets bf16 where the
    # CPU has bf16 matrix units; the chosen latents' values, the loss and every
    # gradient are recomputed in full precision, so only near-ties can differ.
    selection_dtype: torch.dtype | None = None
    # How a data-parallel run (vlsae.training.distributed) all-reduces each persistent floating
    # buffer after the backward pass: buffer name -> "mean" (the default for a buffer not named),
    # "min", "max" or "none" (a buffer every rank computes alike from already synchronised ones).
    buffer_reductions: ClassVar[dict[str, str]] = {}

    def __init__(self, config: SAEConfig):
        super().__init__()
        self.config = config
        self.build_decoder()

    def build_decoder(self) -> None:
        """One linear decoder ``W_dec`` (n_latents, d_in) + ``b_dec``; multimodal SAEs override."""
        d, n = self.config.d_in, self.config.n_latents
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.reset_decoder()

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def reset_decoder(self) -> None:
        """Random directions; unit norm, or ``decoder_init_norm`` when norms are free."""
        self.W_dec.normal_()
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if not self.config.unit_norm_decoder:
            self.W_dec.mul_(self.config.decoder_init_norm)

    @torch.no_grad()
    def init_decoder_bias(self, center: torch.Tensor) -> None:
        """Start ``b_dec`` at a data centre (geometric median or mean)."""
        self.b_dec.copy_(center.to(self.b_dec))

    # -------------------------------------------------------- the public API
    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def n_latents(self) -> int:
        return self.config.n_latents

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this SAE reads paired batches of; empty for a single-stream SAE."""
        return ()

    def check_input(self, x: torch.Tensor) -> None:
        """One-line errors for the two mistakes everybody makes once."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise VlsaeError(f"{self.arch} SAE expects inputs of shape (batch, {self.d_in}), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        """x: (batch, d_in) -> sparse code (inference path); ``modality`` names the stream
        for multimodal SAEs and is ignored by single-stream ones."""
        raise NotImplementedError

    def decode(self, code: SparseCode, modality: str | None = None) -> torch.Tensor:
        """code -> (batch, d_in) reconstruction."""
        return sparse_decode(code.indices, code.values, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor, modality: str | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, modality), modality)

    def training_forward(self, x: Batch, ctx: TrainContext) -> TrainOutput:
        """Reconstruction, named loss terms and the code, for one training batch."""
        raise NotImplementedError

    def edits_parameters_in_forward(self, step: int) -> bool:
        """True when ``training_forward`` at ``step`` may set parameters from the batch itself (not
        through the optimizer); a data-parallel run then copies rank 0's parameters to every rank."""
        return False

    # ------------------------------------------------ decoder-norm handling
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row,
        so Adam's step moves directions, not norms."""
        if self.config.unit_norm_decoder and self.W_dec.grad is not None:
            w, g = self.W_dec, self.W_dec.grad
            g.addcmul_(w, torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).view(-1, 1), value=-1)  # no (n, d) temporary

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Put unit-norm decoder rows back on the sphere after the update."""
        if self.config.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # -------------------------------------------------------- input scaling
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """The SAE was trained on ``x * scale``; rewrite the weights so it takes raw ``x``.

        With a linear encoder ``W_enc (x*c - b_dec) = (c W_enc)(x - b_dec/c)`` and
        the reconstruction of raw x is ``(z W_dec + b_dec) / c``; latent values and
        thresholds are unchanged. Unit-norm decoders stop being unit norm, which
        is fine after training.
        """
        if hasattr(self, "W_enc"):
            self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, d_in={self.d_in}, n_latents={self.n_latents}"


@dataclass
class MultimodalConfig(SAEConfig):
    """An SAE config with the modalities its paired batches hold."""

    modalities: tuple[str, ...] = option(("image", "text"), help="modalities of the paired data this SAE reads")
    normalize_by_variance: bool = option(True, help="divide each modality's squared error by its variance before summing")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.modalities:
            raise VlsaeError("a multimodal SAE needs at least one modality, e.g. modalities: [image, text]")
        if len(set(self.modalities)) != len(self.modalities):
            raise VlsaeError(f"modalities must be distinct, got {list(self.modalities)}")


class MultimodalSAE(SAE):
    """Base of SAEs that train on paired batches: a dict of modality -> (batch, d_in) rows.

    Subclasses decide how many decoders they keep (one per modality for ``vl``,
    one for all for ``vl-shared``); what they share is the modality bookkeeping,
    the per-modality loss and the per-modality input scales.
    """

    config: MultimodalConfig

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.config.modalities)

    def resolve_modality(self, modality: str | None) -> str:
        """The modality to use: ``modality`` checked, or the only one when the SAE has one."""
        if modality is None:
            if len(self.modalities) == 1:
                return self.modalities[0]
            raise VlsaeError(f"{self.arch} SAE reads several modalities; pass modality= one of {list(self.modalities)}")
        if modality not in self.modalities:
            raise VlsaeError(f"unknown modality '{modality}'; this SAE has {list(self.modalities)}")
        return modality

    def check_batch(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not isinstance(batch, dict):
            raise VlsaeError(f"{self.arch} SAE trains on paired batches: a dict of modality -> (batch, {self.d_in}) tensor, "
                             f"with modalities {list(self.modalities)}")
        unknown = set(batch) - set(self.modalities)
        if unknown:
            raise VlsaeError(f"batch has modality '{sorted(unknown)[0]}' that this SAE lacks; it has {list(self.modalities)}")
        for x in batch.values():
            self.check_input(x)
        return batch

    def modality_losses(self, x: torch.Tensor, recon: torch.Tensor, m: str) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss term, metrics) for one modality: variance-normalised or raw MSE, both reported."""
        fvu = normalized_mse(x, recon)
        mse = (x - recon).pow(2).mean()
        metrics = {f"fvu_{m}": float(fvu.detach()), f"mse_{m}": float(mse.detach())}
        return (fvu if self.config.normalize_by_variance else mse), metrics

    @torch.no_grad()
    def fold_input_scales(self, scales: dict[str, float]) -> None:
        """Trained on ``x_m * scales[m]``; rewrite so each modality takes raw inputs."""
        raise NotImplementedError

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        self.fold_input_scales({m: scale for m in self.modalities})


def dense_pre_activations(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, b_dec: torch.Tensor,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """(x - b_dec) @ W_enc.T + b_enc; x: (batch, d) -> (batch, n_latents).

    ``dtype`` (e.g. bf16) computes it in lower precision, for selection only."""
    centred = x - b_dec
    if dtype is not None and dtype != centred.dtype:
        centred, W_enc = centred.to(dtype), W_enc.to(dtype)
        b_enc = None if b_enc is None else b_enc.to(dtype)
    if b_enc is None:
        return centred @ W_enc.t()
    return torch.addmm(b_enc, centred, W_enc.t())


# ------------------------------------------------------------ batch normalisers
# In a data-parallel run each rank holds a slice of the global batch. For the training forward
# the trainer sets a function that sums a tensor over the ranks; the variances that normalise the
# losses are then the global batch's, so the mean of the ranks' losses is the global batch's loss
# (the losses are means over rows divided by a global statistic) and the run does not depend on
# the number of ranks beyond float order.
_RANK_SUM: ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = ContextVar("vlsae_rank_sum", default=None)


@contextlib.contextmanager
def global_batch(rank_sum: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator[None]:
    """Within the block, batch normalisers are the global batch's: ``rank_sum(t)`` sums ``t`` over the ranks
    (no gradient flows through it). ``None``: this process holds the whole batch (nothing changes)."""
    token = _RANK_SUM.set(rank_sum)
    try:
        yield
    finally:
        _RANK_SUM.reset(token)


def row_variance(x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch's rows of ||x - mean(x)||^2, x: (batch, d); the global batch's in a data-parallel
    run (computed without gradient there: it normalises, it is not optimised)."""
    rank_sum = _RANK_SUM.get()
    if rank_sum is None:
        return (x - x.mean(0)).pow(2).sum(dim=1).mean()
    with torch.no_grad():
        x = x.detach()
        head = rank_sum(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]))
        rows = head[-1]
        spread = rank_sum((x - head[:-1] / rows).pow(2).sum().reshape(1))
        return spread[0] / rows


def auxk_loss(residual: torch.Tensor, aux_recon: torch.Tensor, n_dead: int, k_aux: int) -> torch.Tensor:
    """Gao et al.'s AuxK term: how well the dead latents model the residual,
    normalised by the residual's variance and scaled by min(n_dead / k_aux, 1).

    residual: (batch, d) detached x - x_hat; aux_recon: (batch, d) decoded dead latents, no bias.
    """
    var = row_variance(residual).clamp_min(1e-8)
    err = (aux_recon - residual).pow(2).sum(dim=1).mean() / var
    return err * min(n_dead / max(k_aux, 1), 1.0)


def normalized_mse(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch (the batch FVU). In a data-parallel
    training forward: this slice's mean row error over the global batch's :func:`row_variance`."""
    if _RANK_SUM.get() is not None:
        return (x - recon).pow(2).sum(dim=1).mean() / row_variance(x).clamp_min(1e-12)
    if x.requires_grad:
        var = (x - x.mean(0)).pow(2).sum()
    else:  # a data batch: one pass, no (batch, d) temporaries (a few ms of a CPU step at batch 4096)
        var = x.var(0, correction=0).sum() * x.shape[0]
    return F.mse_loss(recon, x, reduction="sum") / var.clamp_min(1e-8)
