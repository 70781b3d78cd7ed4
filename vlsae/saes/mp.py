"""Matching Pursuit SAE (Costa, Fel, Lubana, Tolooshams, Ba; arXiv 2506.03093, NeurIPS 2025).

One dictionary ``W_dec`` (rows d_j, unit norm in training) is both encoder and
decoder, plus the pre-bias ``b_dec``; there is no ``W_enc``. Encoding unrolls
matching pursuit from r_0 = x - b_dec:

    j_t = argmax_j <r_{t-1}, d_j> / ||d_j||            (|.| when ``signed``)
    alpha_t = <r_{t-1}, d_{j_t}> / ||d_{j_t}||^2       (clamped at 0 unless ``signed``)
    r_t = r_{t-1} - alpha_t d_{j_t}

and x_hat = x - r_T = b_dec + sum_t alpha_t d_{j_t}. Each step leaves the
residual orthogonal to the atom it chose, so the error never grows with more
steps. (With unit-norm atoms the norms drop out; keeping them makes the
algorithm invariant to :meth:`fold_input_scale`, which divides the atoms by
the input scale.) Loss: FVU + AuxK (dead atoms fitted to the final residual;
coefficient 1.0, SAELens's choice for MP, since dead atoms are MP's known
weakness). The argmax is not differentiated.

Speed. The selection pass runs without autograd and uses the Gram trick:
scores s = r_0 U^T once (U = the atoms scaled to unit norm), then
s -= alpha_t G[j_t] per step with G = D U^T (rows picked by a one-non-zero-per-row
CSR matmul on the CPU), so each step is O(batch * n_latents) memory traffic
instead of a (batch, d, n_latents) matmul. G costs n_latents^2 * d once per
batch, so it is used only when that is cheaper than recomputing s every step
(n_latents <= steps * batch) and G fits in 2^28 entries (1 GiB in fp32);
otherwise s is recomputed exactly from the residual each step. The
coefficients are always computed from the explicit residual, and then
recomputed differentiably from the chosen atom sequence with (batch, d) ops
only (:meth:`MPSAE.pursuit_coefficients`). Measured on the 2-core CPU (batch
1024, d 256, 4096 latents, k 32, one thread): a training step takes ~0.5 s
against ~0.13 s for TopK; the pursuit's argmax passes dominate.

Inference: ``k`` steps by default (``encode(x, steps=...)`` to change it), or,
with ``residual_threshold`` > 0, per-sample stopping once ||r|| < tau or the
support stops changing (a re-selected atom or a zero coefficient), capped at
``max_iterations`` (0 = d_in). Encoding is not differentiable.

Codes: an atom selected twice accumulates into one entry (coefficients add),
so ``code.l0()`` counts distinct latents; unused slots are zero padding.

Checkpoint tensors: ``W_dec``, ``b_dec``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.kernels import sparse_decode, sparse_encode
from vlsae.saes import register_sae
from vlsae.saes.base import SAE, SAEConfig, TrainContext, TrainOutput, auxk_loss, normalized_mse
from vlsae.sparse import SparseCode

GRAM_MAX_ENTRIES = 1 << 28


@dataclass
class MPConfig(SAEConfig):
    k: int = option(32, help="pursuit steps (atoms chosen) per input in training, and at inference unless residual_threshold is set")
    signed: bool = option(False, help="classical MP: choose by |correlation| and allow negative coefficients (default: non-negative)")
    residual_threshold: float = option(0.0, help="inference: stop a sample once ||residual|| < this or its support stops changing (0 = exactly k steps)")
    max_iterations: int = option(0, help="inference step cap when residual_threshold is set (0 = d_in)")
    k_aux: int = option(0, help="dead atoms used by AuxK; 0 means d_in // 2")
    aux_coef: float = option(1.0, help="weight of the AuxK loss (0 turns it off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k <= 0:
            raise VlsaeError(f"k (pursuit steps) must be positive, got {self.k}")
        if self.residual_threshold < 0 or self.max_iterations < 0:
            raise VlsaeError("residual_threshold and max_iterations must be >= 0")

    @property
    def aux_width(self) -> int:
        return self.k_aux or max(self.d_in // 2, 1)


def _subtract_rows(scores: torch.Tensor, rows: torch.Tensor, alpha: torch.Tensor, gram: torch.Tensor) -> None:
    """In place: scores[b] -= alpha[b] * gram[rows[b]].

    On the CPU a one-non-zero-per-row CSR matrix times ``gram``, accumulated into
    ``scores`` by addmm, reads each gram row once and writes nothing else
    (measured 2.5x faster than gather + addcmul at batch 1024, 4096 latents).
    """
    batch = scores.shape[0]
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        crow = torch.arange(batch + 1, device=scores.device)
        picks = torch.sparse_csr_tensor(crow, rows, alpha.to(scores.dtype), (batch, gram.shape[0]), check_invariants=False)
        torch.addmm(scores, picks, gram, alpha=-1.0, out=scores)
    else:
        scores.addcmul_(F.embedding(rows, gram), alpha[:, None], value=-1.0)


def merge_repeats(atoms: torch.Tensor, coefs: torch.Tensor, n_latents: int) -> SparseCode:
    """Sum the coefficients of atoms chosen more than once in a row.

    atoms (batch, T) long, coefs (batch, T) -> SparseCode of width T whose first
    entries per row are the distinct atoms; the rest is zero padding.
    Differentiable in ``coefs``.
    """
    sorted_atoms, order = atoms.sort(dim=1)
    sorted_coefs = coefs.gather(1, order)
    starts = torch.ones_like(sorted_atoms, dtype=torch.bool)
    starts[:, 1:] = sorted_atoms[:, 1:] != sorted_atoms[:, :-1]
    slot = starts.cumsum(dim=1) - 1  # (batch, T): which distinct atom each entry belongs to
    values = torch.zeros_like(coefs).scatter_add(1, slot, sorted_coefs)
    indices = torch.zeros_like(atoms).scatter(1, slot, sorted_atoms)
    return SparseCode(values, indices, n_latents)


@register_sae("mp")
class MPSAE(SAE):
    config_class = MPConfig
    config: MPConfig

    # ------------------------------------------------------------ selection
    @torch.no_grad()
    def pursue(self, x: torch.Tensor, steps: int, residual_threshold: float = 0.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The greedy pass, without autograd.

        x: (batch, d_in) -> atoms (batch, T) long, coefs (batch, T), scores
        (batch, n_latents) = <r_T, d_j> / ||d_j|| of the final residual. T = steps,
        or fewer when every sample stopped early (``residual_threshold`` > 0); a
        stopped sample's later coefficients are 0.
        """
        D = self.W_dec
        batch, n = x.shape[0], D.shape[0]
        sq_norms = D.pow(2).sum(dim=1).clamp_min(1e-12)
        unit = D * sq_norms.rsqrt()[:, None]  # atoms scaled to unit norm, for scoring
        r = x - self.b_dec
        scores = r @ unit.t()  # (batch, n): <r, d_j> / ||d_j||
        # Gram rows move the scores: <r - alpha d_i, u_j> = score_j - alpha <d_i, u_j>.
        gram = D @ unit.t() if (n <= steps * batch and n * n <= GRAM_MAX_ENTRIES) else None
        stopping = residual_threshold > 0
        active = r.norm(dim=1) >= residual_threshold if stopping else None
        support = torch.zeros(batch, n, dtype=torch.bool, device=x.device) if stopping else None
        atoms, coefs = [], []
        for _ in range(steps):
            j = self._best_atom(scores)
            chosen = D[j]
            alpha = (r * chosen).sum(dim=1) / sq_norms[j]
            if not self.config.signed:
                alpha = alpha.clamp_min(0)
            if stopping:
                alpha = torch.where(active, alpha, torch.zeros_like(alpha))
                repeated = support.gather(1, j[:, None]).squeeze(1)
                support.scatter_(1, j[:, None], True)
            r = r - alpha[:, None] * chosen
            if gram is not None:
                _subtract_rows(scores, j, alpha, gram)
            else:
                scores = r @ unit.t()
            atoms.append(j)
            coefs.append(alpha)
            if stopping:
                active = active & ~repeated & (alpha != 0) & (r.norm(dim=1) >= residual_threshold)
                if not bool(active.any()):
                    break
        if not atoms:  # steps == 0
            return torch.zeros(batch, 1, dtype=torch.long, device=x.device), x.new_zeros(batch, 1), scores
        return torch.stack(atoms, dim=1), torch.stack(coefs, dim=1), scores

    def _best_atom(self, scores: torch.Tensor) -> torch.Tensor:
        """(batch,) index of the best score, or of the largest |score| when signed (no |.| copy)."""
        top, best = scores.max(dim=1)  # max() is ~2x faster than argmax() on the CPU
        if not self.config.signed:
            return best
        bottom, worst = scores.min(dim=1)
        return torch.where(top >= -bottom, best, worst)

    def pursuit_coefficients(self, x: torch.Tensor, atoms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable coefficients of a given atom sequence.

        x: (batch, d_in), atoms: (batch, T) -> coefs (batch, T), final residual (batch, d_in).
        Gradients reach ``W_dec`` (through coefficients and atoms) and ``b_dec``.
        """
        chosen = F.embedding(atoms, self.W_dec)  # (batch, T, d): one gather, one dense grad
        sq_norms = chosen.pow(2).sum(dim=2).clamp_min(1e-12)
        r = x - self.b_dec
        coefs = []
        # unbind, not chosen[:, t]: each slice's backward would write a full (batch, T, d) zero tensor
        for atom, sq_norm in zip(chosen.unbind(dim=1), sq_norms.unbind(dim=1)):
            alpha = (r * atom).sum(dim=1) / sq_norm
            if not self.config.signed:
                alpha = torch.relu(alpha)
            r = r - alpha[:, None] * atom
            coefs.append(alpha)
        return torch.stack(coefs, dim=1), r

    # ---------------------------------------------------------- public API
    def encode(self, x: torch.Tensor, modality: str | None = None, steps: int | None = None) -> SparseCode:
        """Inference: ``steps`` pursuit steps (default ``k``), or the residual rule if configured
        (``modality`` is ignored: one stream)."""
        self.check_input(x)
        tau = self.config.residual_threshold if steps is None else 0.0
        if steps is None:
            steps = (self.config.max_iterations or self.d_in) if tau > 0 else self.config.k
        if steps < 0:
            raise VlsaeError(f"steps must be >= 0, got {steps}")
        atoms, coefs, _ = self.pursue(x, steps, tau)
        code = merge_repeats(atoms, coefs, self.n_latents)
        # distinct atoms come first (sorted by index; zero-coefficient ones included): trim after the last non-zero
        positions = torch.arange(1, code.values.shape[1] + 1, device=x.device)
        width = max(int(((code.values != 0) * positions).max()), 1)
        return SparseCode(code.values[:, :width], code.indices[:, :width], self.n_latents)

    def training_forward(self, x: torch.Tensor, ctx: TrainContext) -> TrainOutput:
        atoms, _, scores = self.pursue(x, self.config.k)
        coefs, residual = self.pursuit_coefficients(x, atoms)
        recon = x - residual
        losses = {"mse": normalized_mse(x, recon)}
        losses.update(self.aux_loss(residual.detach(), scores, ctx))
        return TrainOutput(recon=recon, losses=losses, code=merge_repeats(atoms, coefs, self.n_latents))

    def aux_loss(self, residual: torch.Tensor, scores: torch.Tensor, ctx: TrainContext) -> dict[str, torch.Tensor]:
        """AuxK: the dead atoms best correlated with the final residual, fitted to it."""
        dead = ctx.dead_mask
        coef = self.config.aux_coef
        if coef == 0 or dead is None or not bool(dead.any()):
            return {}
        n_dead = int(dead.sum())
        k_aux = self.config.aux_width
        with torch.no_grad():
            score = scores.abs() if self.config.signed else scores
            _, idx = score.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=1, sorted=False)
        values = sparse_encode(residual, self.W_dec, None, idx)
        if not self.config.signed:
            values = torch.relu(values)
        aux_recon = sparse_decode(idx, values, self.W_dec)
        return {"auxk": coef * auxk_loss(residual, aux_recon, n_dead, k_aux)}

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Dividing atoms and bias by ``scale`` keeps choices and coefficients
        (alpha = <r, d>/||d||^2 is scale-free) and divides the reconstruction by
        ``scale``; the residual threshold is in input units, so it scales too."""
        super().fold_input_scale(scale)
        if self.config.residual_threshold > 0:
            self.config = dataclasses.replace(self.config, residual_threshold=self.config.residual_threshold / scale)
