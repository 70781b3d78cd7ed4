"""The ZF plot and epsilon_LBO of Lee et al. ("Evaluating and Designing SAEs by Approximating
Quasi-Orthogonality", arXiv 2503.24277), for any SAE.

Under epsilon-quasi-orthogonal atoms the norm of a dense input ``z`` and the norm
of its code ``f`` agree up to ``||f|| in [||z|| / sqrt(1 + c), ||z|| / sqrt(1 - c)]``
with ``c = epsilon (h - 1)``. Per row, with the code scaled by the decoder norms
and the decoder bias appended as one more "feature",
``f~ = (f_1 ||d_1||, ..., f_n ||d_n||, ||b_dec||)`` (the paper's code does the same),

    epsilon_LBO = | ||z||^2 - ||f~||^2 | / ((h - 1) ||f~||^2),   h = n_latents + 1 (the entries of f~).

The ZF plot scatters ``||z||`` (x) against ``||f~||`` (y) with the identity and the
cones for c in {0.25, 0.5, 1}: rows above a cone are over-activated (a code
larger than the input), rows below under-activated. Everything goes through the
SAE's public ``encode``/``decode``: the atoms are ``decode(e_i) - decode(0)`` and
the bias ``decode(0)``, per modality, so tied, per-modality and aligned SAEs
work alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.synthetic.score import decoder_directions
from vlsae.sparse import SparseCode

CONES = (0.25, 0.5, 1.0)
MAX_POINTS = 4000  # per modality in the figure (a seeded subsample; the statistics use every row)


@torch.no_grad()
def zf_norms(sae: Any, acts: dict[str, torch.Tensor], batch_size: int = 1024) -> dict[str, dict[str, torch.Tensor]]:
    """Per modality: ``input`` (n,) = ||z||, ``code`` (n,) = ||f~||, ``eps_lbo`` (n,).

    acts: modality -> (n, d) raw activations; a single-stream SAE ignores the modality."""
    out = {}
    h = int(sae.n_latents) + 1
    for m, x in acts.items():
        atoms = decoder_directions(sae, m)
        norms = atoms.norm(dim=1)
        n = int(sae.n_latents)
        empty = SparseCode(torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), n)
        bias = float(sae.decode(empty, m).float().norm())
        inputs, codes = [], []
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].float()
            code = sae.encode(xb, m)
            scaled = code.values.float().cpu() * norms[code.indices.cpu()]
            codes.append((scaled.pow(2).sum(dim=1) + bias ** 2).sqrt())
            inputs.append(xb.norm(dim=1).cpu())
        z, f = torch.cat(inputs), torch.cat(codes)
        eps = (z.pow(2) - f.pow(2)).abs() / ((h - 1) * f.pow(2).clamp_min(1e-12))
        out[m] = {"input": z, "code": f, "eps_lbo": eps}
    return out


def zf_summary(norms: dict[str, dict[str, torch.Tensor]], cone: float = 0.5) -> dict[str, dict[str, float]]:
    """Per modality: median epsilon_LBO and the fractions of rows above / below the ``cone`` bounds."""
    out = {}
    for m, v in norms.items():
        z, f = v["input"], v["code"]
        out[m] = {"median_eps_lbo": float(v["eps_lbo"].median()),
                  "over_activated": float((f > z / np.sqrt(1 - cone)).float().mean()),
                  "under_activated": float((f < z / np.sqrt(1 + cone)).float().mean()),
                  "cone": cone}
    return out


def zf_figure(folder: Path, norms: dict[str, dict[str, torch.Tensor]], pyplot: Any, name: str = "zf_plot.png") -> str:
    """The ZF scatter, one colour per modality, with the identity and the bound cones."""
    fig, ax = pyplot.subplots(figsize=(5, 4.2))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    top = 0.0
    rng = np.random.default_rng(0)
    summary = zf_summary(norms)
    for i, (m, v) in enumerate(norms.items()):
        z, f = v["input"].numpy(), v["code"].numpy()
        keep = rng.choice(len(z), size=min(len(z), MAX_POINTS), replace=False)
        ax.scatter(z[keep], f[keep], s=3, alpha=0.4, color=colours[i % len(colours)],
                   label=f"{m} (median $\\epsilon_{{LBO}}$ {summary[m]['median_eps_lbo']:.2g})")
        top = max(top, float(np.percentile(z, 99.5)), float(np.percentile(f, 99.5)))
    line = np.linspace(0, top * 1.05, 50)
    ax.plot(line, line, color="black", lw=1, label="||f|| = ||z||")
    for c, style in zip(CONES, (":", "--", "-.")):
        ax.plot(line, line / np.sqrt(1 + c), color="grey", lw=0.8, ls=style, label=f"$\\epsilon(h-1)$ = {c:g}")
        if c < 1:
            ax.plot(line, line / np.sqrt(1 - c), color="grey", lw=0.8, ls=style)
    ax.set_xlim(0, top * 1.05)
    ax.set_ylim(0, top * 1.05)
    ax.set_xlabel("||z|| (input activation)")
    ax.set_ylabel("||f~|| (code x decoder norms, with the bias)")
    ax.set_title("ZF plot: code norm against input norm")
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    pyplot.close(fig)
    return name
