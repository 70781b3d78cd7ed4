"""ITDA: Inference-Time Decomposition of Activations (Leask, Nanda, Al Moubayed; arXiv 2505.17769, ICML 2025).

No gradient training: the dictionary is made of the activations themselves.
Reading the data stream once, each row x is encoded by matching pursuit
against the current dictionary; if the fraction of its squared norm left
unexplained, ||x - a D||^2 / ||x||^2, exceeds ``threshold``, x / ||x|| becomes
a new atom. Atoms remember where they came from (``labels``: the row's
position in the stream), which is what makes ITDA a similarity measure: two
models read the same stream, and the Jaccard index of their dictionaries'
label sets says how alike they decompose it (:mod:`evals.similarity`).

Encoder (paper Algorithm 2, signed matching pursuit), ``k`` steps from r = x:

    j = argmax_j |<r, d_j>| / ||d_j||,   a_j += <r, d_j> / ||d_j||^2,   r -= (<r, d_j> / ||d_j||^2) d_j

decoder x_hat = a D, no bias. Construction (paper Algorithm 1): rows are
encoded ``chunk`` at a time against the dictionary built so far (atoms added
by one chunk are seen by the next); among a chunk's new atoms, one within
|cos| > ``dedupe_cos`` of an earlier one of the same chunk is dropped (the
paper's removal of near-identical atoms added together). The threshold is
relative (a fraction of ||x||^2), not the paper's absolute loss, so one
setting means the same at any activation scale; a lower threshold gives a
larger dictionary. ``n_latents`` is the capacity: once full, nothing is added.

Everything here is invariant to a rotation of the activations (correlations,
norms and cosines are), so two ITDAs of a stream and of its rotated copy make
the same choices: their Jaccard similarity is 1 up to float rounding.

Training: ``vlsae train --arch itda`` (or ``train(create_sae("itda", ...), source)``)
builds it in one pass over the stream with no optimizer: the trainer calls
:meth:`training_forward` on each batch under ``no_grad`` (it adds atoms and
returns the streaming reconstruction, with no loss terms). A readout (a
downstream gradient) does not apply and is refused.

Checkpoint tensors: ``W_dec`` (n_latents, d_in) (rows past ``size`` are zero),
``b_dec`` (d_in, zero), ``labels`` (n_latents,) long (stream position of each
atom, -1 for an empty slot), ``size`` () and ``seen`` () long (atoms built,
rows read): all in the state dict, so a resumed build continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.saes import register_sae
from vlsae.saes.base import SAE, SAEConfig, TrainContext, TrainOutput, normalized_mse
from vlsae.saes.mp import merge_repeats
from vlsae.sparse import SparseCode


@dataclass
class ITDAConfig(SAEConfig):
    k: int = option(8, help="matching-pursuit steps (L0) per input, when encoding and when deciding whether to add an atom")
    threshold: float = option(0.1, help="add a row as an atom when the fraction of its squared norm that k steps leave "
                                        "unexplained exceeds this (lower: a larger dictionary)")
    dedupe_cos: float = option(0.99, help="drop a new atom within this |cosine| of an earlier new atom of the same chunk")
    chunk: int = option(128, help="rows encoded against the dictionary at once while building (the next chunk sees their atoms)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k <= 0:
            raise VlsaeError(f"k (pursuit steps) must be positive, got {self.k}")
        if not 0 <= self.threshold < 1:
            raise VlsaeError(f"threshold is a fraction of the squared norm: give a value in [0, 1), got {self.threshold}")
        if not 0 < self.dedupe_cos <= 1:
            raise VlsaeError(f"dedupe_cos must be in (0, 1], got {self.dedupe_cos}")
        if self.chunk <= 0:
            raise VlsaeError(f"chunk must be positive, got {self.chunk}")


@register_sae("itda")
class ITDA(SAE):
    config_class = ITDAConfig
    config: ITDAConfig
    trains_by_gradient: ClassVar[bool] = False  # the trainer builds it in one pass, no optimizer

    def __init__(self, config: ITDAConfig):
        super().__init__(config)
        self.W_dec.requires_grad_(False)
        self.b_dec.requires_grad_(False)
        with torch.no_grad():
            self.W_dec.zero_()
        self.register_buffer("labels", torch.full((config.n_latents,), -1, dtype=torch.long))
        self.register_buffer("size", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------ state
    @property
    def n_atoms(self) -> int:
        return int(self.size)

    @property
    def full(self) -> bool:
        return self.n_atoms >= self.n_latents

    def atom_labels(self) -> torch.Tensor:
        """(n_atoms,) long: the stream position each atom was taken from."""
        return self.labels[: self.n_atoms].clone()

    @torch.no_grad()
    def init_decoder_bias(self, center: torch.Tensor) -> None:
        """ITDA decodes without a bias (x_hat = a D); the trainer's centre is not used."""

    # ------------------------------------------------------------ pursuit
    @torch.no_grad()
    def pursue(self, x: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Signed matching pursuit over the built atoms: x (batch, d_in) -> atoms (batch, T) long, coefs (batch, T).
        An empty dictionary gives one zero coefficient per row."""
        m = self.n_atoms
        batch = x.shape[0]
        if m == 0 or steps == 0:
            return torch.zeros(batch, 1, dtype=torch.long, device=x.device), x.new_zeros(batch, 1)
        D = self.W_dec[:m].to(x.dtype)
        norms = D.norm(dim=1).clamp_min(1e-12)
        unit = D / norms[:, None]
        r = x.clone()
        atoms, coefs = [], []
        for _ in range(steps):
            scores = r @ unit.t()  # (batch, m): <r, d_j> / ||d_j||
            top, best = scores.max(dim=1)
            bottom, worst = scores.min(dim=1)
            j = torch.where(top >= -bottom, best, worst)
            chosen = D[j]
            alpha = scores.gather(1, j[:, None]).squeeze(1) / norms[j]
            r -= alpha[:, None] * chosen
            atoms.append(j)
            coefs.append(alpha)
        return torch.stack(atoms, dim=1), torch.stack(coefs, dim=1)

    def encode(self, x: torch.Tensor, modality: str | None = None, steps: int | None = None) -> SparseCode:
        """``steps`` (default k) pursuit steps; repeated atoms merge into one latent (``modality`` is ignored)."""
        self.check_input(x)
        steps = self.config.k if steps is None else int(steps)
        if steps < 0:
            raise VlsaeError(f"steps must be >= 0, got {steps}")
        atoms, coefs = self.pursue(x, steps)
        code = merge_repeats(atoms, coefs, self.n_latents)
        positions = torch.arange(1, code.values.shape[1] + 1, device=x.device)
        width = max(int(((code.values != 0) * positions).max()), 1)
        return SparseCode(code.values[:, :width], code.indices[:, :width], self.n_latents)

    # ------------------------------------------------------------ building
    @torch.no_grad()
    def add_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, SparseCode]:
        """Read rows x (batch, d_in) of the stream, ``chunk`` at a time, adding atoms where the residual is
        not explained. Returns the reconstruction and code each row got *before* its own chunk's atoms
        were added (the streaming reconstruction)."""
        self.check_input(x)
        recons, values, indices = [], [], []
        for part in x.split(self.config.chunk):
            atoms, coefs = self.pursue(part, self.config.k)
            code = merge_repeats(atoms, coefs, self.n_latents)
            recon = self.decode(code)
            recons.append(recon)
            values.append(code.values)
            indices.append(code.indices)
            if not self.full:
                self._append(part, recon)
            self.seen += part.shape[0]
        width = max(v.shape[1] for v in values)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731 - zero slots are padding
        code = SparseCode(torch.cat([pad(v) for v in values]), torch.cat([pad(i) for i in indices]), self.n_latents)
        return torch.cat(recons), code

    def _append(self, part: torch.Tensor, recon: torch.Tensor) -> None:
        sq = part.pow(2).sum(dim=1)
        unexplained = (part - recon).pow(2).sum(dim=1) / sq.clamp_min(1e-30)
        rows = torch.nonzero((unexplained > self.config.threshold) & (sq > 0)).squeeze(1)
        if rows.numel() == 0:
            return
        candidates = part[rows] / sq[rows].sqrt()[:, None]
        close = (candidates @ candidates.t()).abs() > self.config.dedupe_cos
        keep: list[int] = []
        for i in range(rows.numel()):  # at most `chunk` candidates: greedy, first one wins
            if not keep or not bool(close[i, keep].any()):
                keep.append(i)
        keep = keep[: self.n_latents - self.n_atoms]
        start, count = self.n_atoms, len(keep)
        chosen = torch.tensor(keep, dtype=torch.long, device=part.device)
        self.W_dec[start:start + count] = candidates[chosen].to(self.W_dec.dtype)
        self.labels[start:start + count] = self.seen + rows[chosen]
        self.size += count

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        """One batch of the one-pass build (no loss terms: nothing here is trained by gradient)."""
        recon, code = self.add_rows(x)
        metrics = {"atoms": float(self.n_atoms), "fvu_streaming": float(normalized_mse(x, recon))}
        return TrainOutput(recon=recon, losses={}, code=code, metrics=metrics)

    # ------------------------------------------------------------ scale
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Atoms divided by ``scale``: choices and coefficients (<r, d>/||d||^2) stay, the reconstruction
        is divided by ``scale``, so the SAE takes raw inputs (as for ``mp``)."""
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, atoms={self.n_atoms}"
