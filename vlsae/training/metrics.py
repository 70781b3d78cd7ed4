"""The trainer's own figures: FVU (per modality too), L0, dead fraction, shrinkage.

FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over a set of rows (1 - explained variance).
L0 = mean number of non-zero latents per row.
Shrinkage = mean over rows of ||x_hat|| / ||x||: the standard "L2 ratio" (SAELens, SAEBench); < 1
    means the SAE shrinks its outputs (L1-trained SAEs do; TopK ones should sit near 1).
Dead fraction = latents that did not fire within the trainer's dead window (training stream);
never_fired_fraction = latents that fire on none of the evaluation rows.

All figures are on raw inputs (the input scale is folded in before evaluation), so
they are comparable across runs with different scales.
"""
from __future__ import annotations

import torch

from vlsae.errors import VlsaeError


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    var = (x - x.mean(0)).pow(2).sum()
    return float((x - recon).pow(2).sum() / var.clamp_min(1e-12))


def shrinkage(x: torch.Tensor, recon: torch.Tensor) -> float:
    return float((recon.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).mean())


@torch.no_grad()
def geometric_median(x: torch.Tensor, iterations: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm on rows of x (n, d): the point minimising the sum of distances."""
    x = x.double()
    median = x.mean(0)
    for _ in range(iterations):
        dist = (x - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1.0):
            median = new
            break
        median = new
    return median.float()


def _stream_metrics(sae, x: torch.Tensor, modality: str | None, batch_size: int) -> dict[str, float | torch.Tensor]:
    sq_err, l0_sum, shrink_sum = 0.0, 0.0, 0.0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        code = sae.encode(chunk, modality)
        recon = sae.decode(code, modality)
        sq_err += float((chunk - recon).pow(2).sum())
        l0_sum += float(code.l0().sum())
        shrink_sum += float((recon.norm(dim=1) / chunk.norm(dim=1).clamp_min(1e-12)).sum())
        fired |= code.active_mask()
    n = x.shape[0]
    var = float((x - x.mean(0)).pow(2).sum())
    return {"fvu": sq_err / max(var, 1e-12), "l0": l0_sum / n, "shrinkage": shrink_sum / n, "fired": fired}


@torch.no_grad()
def evaluate(sae, rows: torch.Tensor | dict[str, torch.Tensor], batch_size: int = 4096) -> dict[str, float]:
    """FVU, L0, shrinkage and the fraction of latents that never fired on ``rows`` (raw inputs).

    For paired rows (a dict) each modality is scored with its own decoder and the
    headline figures are the means over modalities.
    """
    was_training = sae.training
    sae.eval()
    try:
        if isinstance(rows, dict):
            out: dict[str, float] = {}
            fired = None
            for m, x in rows.items():
                r = _stream_metrics(sae, x, m, batch_size)
                out[f"fvu_{m}"], out[f"l0_{m}"], out[f"shrinkage_{m}"] = r["fvu"], r["l0"], r["shrinkage"]
                fired = r["fired"] if fired is None else fired | r["fired"]
            mods = list(rows)
            for key in ("fvu", "l0", "shrinkage"):
                out[key] = sum(out[f"{key}_{m}"] for m in mods) / len(mods)
            out["never_fired_fraction"] = 1.0 - float(fired.float().mean()) if fired is not None else float("nan")
            return out
        if rows.shape[0] == 0:
            raise VlsaeError("no rows to evaluate on")
        r = _stream_metrics(sae, rows, None, batch_size)
        return {"fvu": r["fvu"], "l0": r["l0"], "shrinkage": r["shrinkage"],
                "never_fired_fraction": 1.0 - float(r["fired"].float().mean())}
    finally:
        sae.train(was_training)
