"""Group Bias Adaptation SAE (Chen, Sheen, Xiong, Wang, Yang, "Taming Polysemanticity in LLMs",
arXiv 2506.14002, ICLR 2026).

A tied-weight SAE with no sparsity penalty: the sparsity comes from the biases,
which are not trained by gradients but adapted to hit a target firing frequency.

    pre_m = <x - b_dec, w_m> / ||w_m||^2 + b_m,   z_m = a_m * phi(pre_m),   x_hat = sum_m z_m w_m + b_dec

``w_m`` (``W_dec`` row m) both detects and writes, and stays on the unit sphere
in training (spherical gradient descent: the radial gradient is removed and the
row renormalised, as for every unit-norm decoder here), so the division by
``||w_m||^2`` is 1 in training; it makes the encoder invariant to
:meth:`fold_input_scale`, which divides the rows by the input scale. ``a_m``
(``scale``) is a trained output scale, so the code values are ``a_m phi(pre_m)``
and the standard sparse decoder applies. Loss: the FVU alone. Gradients reach
W, a and ``b_dec``; the biases ``b_m`` (``b_enc``) get none.

Three defaults are ours, chosen on the imbalanced planted set (128 features,
d = 42, 512 neurons, 1,500 steps; ``benchmarks/variants.py``), where with the
paper's literal choices GBA recovered 5 % of the features at cos 0.9:

* ``activation: jumprelu`` (the paper's LLM runs): the value is ``<x - b_dec, w_m>``
  where ``pre_m > 0``, the bias acting only as a threshold. With ReLU the value is
  ``pre_m`` itself, and the large negative biases a selective neuron needs shrink it.
* ``init_scale`` 0.01: the output scales start small, so the reconstruction starts
  near ``b_dec`` and every neuron's gradient is at first Hebbian (towards the mean
  of the rows it fires on), which is the regime in which a neuron locks onto the
  feature whose frequency matches its target. With ``a = 1`` the high-frequency
  groups reconstruct the data densely at once and the others never learn.
* ``bias_min`` -4 instead of -1: the trainer scales inputs to E||x|| = sqrt(d_in),
  where the projection of a row on a random unit direction has RMS ~1, so a bias
  of -1 stops neurons about one RMS above the noise; there the bound was binding
  (neurons pinned at -1 firing at twice their target).

Bias adaptation. Neurons are split into ``groups`` equal groups; group g has the
target activation frequency ``p_g = high_freq * (low_freq / high_freq) **
(g / (groups - 1))`` (geometric from 0.5 to 1e-4). Over a window of
``interval`` optimizer steps the SAE counts, per neuron, how often ``pre_m > 0``
(``window_fires`` over ``window_rows`` rows) and the largest pre-activation
(``window_peak``). At the end of the window, with ``p_m`` the firing frequency,
``r_m = max(0, peak_m)`` and ``rbar_g`` the mean of the positive ``r_m`` of the
group:

* ``p_m > p_g`` (fires too often): ``b_m <- max(b_m - gamma_down * r_m, bias_min)``;
* ``p_m < dead_freq`` (silent): ``b_m <- min(b_m + gamma_up * rbar_g, 0)``;
* otherwise ``b_m`` is left alone.

Then the window restarts. The window statistics are buffers, so they are saved
with the weights and a resumed run adapts at exactly the same steps. A neuron
only recovers a feature whose frequency lies near its group's target ("neuron
resonance"), which is why the targets span four decades instead of one k.

Dense by nature early in training (b = 0 makes half the neurons fire), so the
training pass is plain dense autograd, like ``relu``.

Checkpoint tensors: ``W_dec`` (n, d), ``b_dec`` (d), ``b_enc`` (n, the adapted
biases), ``scale`` (n), and the window buffers ``window_fires`` (n),
``window_peak`` (n), ``window_rows`` (), ``window_batches`` ().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.saes import register_sae
from vlsae.saes.base import SAE, SAEConfig, TrainContext, TrainOutput, normalized_mse
from vlsae.saes.selection import compact
from vlsae.sparse import SparseCode

ACTIVATIONS = ("relu", "jumprelu")


@dataclass
class GBAConfig(SAEConfig):
    groups: int = option(10, help="number of neuron groups, each with its own target firing frequency")
    high_freq: float = option(0.5, help="target firing frequency of the first group (the highest)")
    low_freq: float = option(1e-4, help="target firing frequency of the last group (the lowest)")
    interval: int = option(50, help="optimizer steps between bias adaptations (T_BA)")
    gamma_down: float = option(0.01, help="step of a too-frequent neuron's bias, times its peak pre-activation")
    gamma_up: float = option(0.01, help="step of a silent neuron's bias, times its group's mean peak pre-activation")
    dead_freq: float = option(1e-6, help="a neuron firing less often than this in a window counts as silent")
    bias_min: float = option(-4.0, help="lower bound of the adapted biases (they live in [bias_min, 0]), in the trainer's input units")
    init_scale: float = option(0.01, help="initial output scale a_m of every neuron (small: the reconstruction starts near b_dec)")
    activation: str = option("jumprelu", help="jumprelu (value <x - b_dec, w> where pre > 0, the bias only a threshold) or relu (value pre)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.unit_norm_decoder:
            raise VlsaeError("gba trains on the unit sphere (spherical gradient descent); keep unit_norm_decoder true")
        if not 1 <= self.groups <= self.n_latents:
            raise VlsaeError(f"groups must be in 1..n_latents ({self.n_latents}), got {self.groups}")
        if not 0 < self.low_freq <= self.high_freq <= 1:
            raise VlsaeError(f"need 0 < low_freq <= high_freq <= 1, got {self.low_freq} and {self.high_freq}")
        if self.interval < 1:
            raise VlsaeError(f"interval must be at least 1 step, got {self.interval}")
        if self.gamma_down < 0 or self.gamma_up < 0 or self.dead_freq < 0:
            raise VlsaeError("gamma_down, gamma_up and dead_freq must be >= 0")
        if self.bias_min > 0:
            raise VlsaeError(f"bias_min must be <= 0, got {self.bias_min}")
        if self.activation not in ACTIVATIONS:
            raise VlsaeError(f"activation must be one of {', '.join(ACTIVATIONS)}, got '{self.activation}'")


def group_targets(n_latents: int, groups: int, high: float, low: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) group of each neuron (equal contiguous groups) and (n,) its target frequency."""
    group = torch.arange(n_latents) * groups // n_latents
    if groups == 1:
        return group, torch.full((n_latents,), high)
    exponent = group.double() / (groups - 1)
    return group, (high * (low / high) ** exponent).float()


@register_sae("gba")
class GBASAE(SAE):
    config_class = GBAConfig
    config: GBAConfig
    # data-parallel: the window counts add every rank's rows (window_batches counts steps, the
    # default mean keeps it); the peak is the max over ranks; b_enc is adapted from those
    # synchronised statistics alike on every rank
    buffer_reductions = {"window_fires": "sum", "window_rows": "sum", "window_peak": "max", "b_enc": "none"}

    def __init__(self, config: GBAConfig):
        super().__init__(config)
        n = config.n_latents
        self.scale = nn.Parameter(torch.full((n,), config.init_scale))
        self.register_buffer("b_enc", torch.zeros(n))
        group, target = group_targets(n, config.groups, config.high_freq, config.low_freq)
        self.register_buffer("group", group, persistent=False)
        self.register_buffer("target_freq", target, persistent=False)
        self.register_buffer("window_fires", torch.zeros(n))
        self.register_buffer("window_peak", torch.full((n,), -torch.inf))
        self.register_buffer("window_rows", torch.zeros(()))
        self.register_buffer("window_batches", torch.zeros(()))

    # ------------------------------------------------------------ encoder
    def projections(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, n): <x - b_dec, w_m> / ||w_m||^2, the bias-free part of the pre-activation."""
        w = self.W_dec
        return (x - self.b_dec) @ (w / w.pow(2).sum(dim=1, keepdim=True).clamp_min(1e-12)).t()

    def activate(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activations, code values a_m phi(pre_m)), both (batch, n)."""
        pre = proj + self.b_enc
        if self.config.activation == "relu":
            act = torch.relu(pre)
        else:
            act = proj * (pre > 0).to(proj.dtype)
        return pre, act * self.scale

    def encode(self, x: torch.Tensor, modality: str | None = None) -> SparseCode:
        self.check_input(x)
        pre, values = self.activate(self.projections(x))
        with torch.no_grad():
            indices, valid = compact(pre > 0)
        return SparseCode(torch.where(valid, values.gather(1, indices), 0.0), indices, self.n_latents)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        pre, z = self.activate(self.projections(x))
        recon = torch.addmm(self.b_dec, z, self.W_dec)
        if self.training:
            self.record_window(pre.detach())
        with torch.no_grad():
            indices, valid = compact(pre.detach() > 0)
        code = SparseCode(torch.where(valid, z.detach().gather(1, indices), 0.0), indices, self.n_latents)
        return TrainOutput(recon=recon, losses={"mse": normalized_mse(x, recon)}, code=code)

    # --------------------------------------------------- bias adaptation
    @torch.no_grad()
    def record_window(self, pre: torch.Tensor) -> None:
        """Add one batch's firing counts and peaks to the current window."""
        self.window_fires.add_((pre > 0).sum(dim=0).to(self.window_fires))
        self.window_peak.copy_(torch.maximum(self.window_peak, pre.max(dim=0).values.to(self.window_peak)))
        self.window_rows.add_(pre.shape[0])
        self.window_batches.add_(1)

    @torch.no_grad()
    def adapt_biases(self) -> None:
        """One bias-adaptation step from the window's statistics, then a fresh window."""
        c = self.config
        freq = self.window_fires / self.window_rows.clamp_min(1)
        peak = self.window_peak.clamp_min(0)
        groups = c.groups
        positive = (peak > 0).to(peak.dtype)
        total = torch.zeros(groups, device=peak.device).index_add_(0, self.group, peak * positive)
        count = torch.zeros(groups, device=peak.device).index_add_(0, self.group, positive)
        group_peak = (total / count.clamp_min(1))[self.group]
        down = (self.b_enc - c.gamma_down * peak).clamp_min(c.bias_min)
        up = (self.b_enc + c.gamma_up * group_peak).clamp_max(0.0)
        too_often = freq > self.target_freq
        silent = freq < c.dead_freq
        self.b_enc.copy_(torch.where(too_often, down, torch.where(silent, up, self.b_enc)))
        self.window_fires.zero_()
        self.window_peak.fill_(-torch.inf)
        self.window_rows.zero_()
        self.window_batches.zero_()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if int(self.window_batches) >= self.config.interval:
            self.adapt_biases()
