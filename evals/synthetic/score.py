"""Score a trained SAE on a planted-feature data set: every metric of its suite.

Works with any registered SAE through its public API only: ``encode`` ->
:class:`vlsae.sparse.SparseCode`, ``decode(code, modality)``. Decoder directions
are read by decoding one-hot codes (minus the decoded empty code), so tied,
untied and per-modality decoders all work the same way.
"""
from __future__ import annotations

from typing import Any

import torch
from scipy.stats import spearmanr

from evals.synthetic import metrics as M
from evals.synthetic.generators import PlantedData
from vlsae.sparse import SparseCode


# ---------------------------------------------------------------- SAE access
def _device(sae: torch.nn.Module) -> torch.device:
    try:
        return next(sae.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def decoder_directions(sae: Any, modality: str | None = None) -> torch.Tensor:
    """(n_latents, d) the direction each latent writes: decode(e_j) - decode(0)."""
    n = sae.n_latents
    dev = _device(sae)
    one_hot = SparseCode(torch.ones(n, 1, device=dev), torch.arange(n, device=dev)[:, None], n)
    empty = SparseCode(torch.zeros(1, 1, device=dev), torch.zeros(1, 1, dtype=torch.long, device=dev), n)
    return (sae.decode(one_hot, modality) - sae.decode(empty, modality)).float().cpu()


@torch.no_grad()
def encode_decode(sae: Any, x: torch.Tensor, modality: str | None = None,
                  batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes (n, n_latents) and reconstructions (n, d) of x, in batches.
    Multimodal SAEs use ``modality``; single-stream ones ignore it."""
    dev = _device(sae)
    was_training = sae.training
    sae.eval()
    codes, recons = [], []
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(dev)
            code = sae.encode(xb, modality)
            codes.append(code.to_dense().float().cpu())
            recons.append(sae.decode(code, modality).float().cpu())
    finally:
        sae.train(was_training)
    return torch.cat(codes), torch.cat(recons)


# -------------------------------------------------------------- suite scores
def _common(x: torch.Tensor, Z: torch.Tensor, recon: torch.Tensor, H: torch.Tensor,
            V: torch.Tensor, D: torch.Tensor, *, absolute: bool = False) -> tuple[dict[str, float], torch.Tensor]:
    live = (Z != 0).any(dim=0)
    match = M.match_features(V, D)
    out = {
        "fvu": M.fvu(x, recon),
        "l0": M.mean_l0(Z),
        "dead_fraction": M.dead_fraction(Z),
        "mmcs": M.mmcs(V, D, absolute=absolute),
        "mmcs_reverse": M.mmcs(D[live], V, absolute=absolute) if bool(live.any()) else 0.0,
        "frr_0.8": M.recovery_rate(V, D, 0.8, absolute=absolute),
        "frr_0.9": M.recovery_rate(V, D, 0.9, absolute=absolute),
        "mcc": M.matched_code_correlation(H, Z, V, D, match),
    }
    return out, match


def score_planted(data: PlantedData, Z: torch.Tensor | dict[str, torch.Tensor],
                  recon: torch.Tensor | dict[str, torch.Tensor],
                  D: torch.Tensor | dict[str, torch.Tensor], *, one_sae: bool = True) -> dict[str, Any]:
    """All metrics of ``data.suite`` from test-set codes Z, reconstructions and decoder
    directions D (dicts by modality for the multimodal suite; ``one_sae=False`` when
    they come from one SAE per modality, which skips the latent-space-wide metrics).
    Latents are first oriented (:func:`metrics.orient`) so signed SAEs are not
    penalised for writing a feature as -d with negative codes."""
    suite = data.suite
    meta = data.meta
    if suite == "multimodal":
        return _score_multimodal(data, Z, recon, D, one_sae)  # type: ignore[arg-type]
    x, H, V = data.test, data.codes_test, data.directions
    assert isinstance(Z, torch.Tensor) and isinstance(D, torch.Tensor) and isinstance(recon, torch.Tensor)
    Z, D = M.orient(Z, D)
    absolute = suite == "bidirectional"
    out, match = _common(x, Z, recon, H, V, D, absolute=absolute)
    if suite == "independent":
        band = meta["band"]
        if len(set(band.tolist())) > 1:
            out["frr_0.9_by_band"] = {str(k): v for k, v in M.per_group_recovery(V, D, band, 0.9).items()}
        out["freq_match_error"] = M.frequency_match_error(meta["frequencies"], Z, match)
        s_true = (H != 0).sum(dim=1).float()
        l0 = (Z != 0).sum(dim=1).float()
        if float(s_true.std()) > 0 and float(l0.std()) > 0:
            out["l0_s_spearman"] = float(spearmanr(s_true.numpy(), l0.numpy()).statistic)
    elif suite == "hierarchical":
        parent, level = meta["parent"], meta["level"]
        live = (Z != 0).any(dim=0)
        out["absorption_cos"] = M.absorption_cos(V, D, parent, match, live=live)
        out["absorption_cos_abs"] = M.absorption_cos(V, D, parent, match, absolute=True, live=live)
        offsets = meta.get("offset_directions")
        if offsets is not None and not torch.allclose(offsets, V):
            out["mmcs_offset"] = M.mmcs(offsets, D)
            out["frr_0.9_offset"] = M.recovery_rate(offsets, D, 0.9)
        rates = M.absorption_rate(H, Z, parent, match)
        out["absorption_rate"] = rates["child_silent"]
        out["parent_silent_rate"] = rates["parent_silent"]
        out.update(M.structure_mse(V, D, level, match))
        out["frr_0.9_by_level"] = {str(k): v for k, v in M.per_group_recovery(V, D, level, 0.9).items()}
    elif suite == "bidirectional":
        axis = meta["is_axis"]
        out.update(M.axis_metrics(V[axis], D, 0.9))
        out.update(M.sign_accuracy(H[:, axis], Z, V[axis], D, 0.9))
        axis_latents = match[axis][match[axis] >= 0]
        uni_latents = match[~axis][match[~axis] >= 0]
        out["bidirectional_fraction"] = M.sign_usage(Z, axis_latents)["both_signs"]
        out["unipolar_purity"] = M.sign_usage(Z, uni_latents)["positive_share"]
        out["frr_0.9_unipolar"] = M.recovery_rate(V[~axis], D, 0.9, absolute=True)
    return out


def _score_multimodal(data: PlantedData, Z: dict[str, torch.Tensor], recon: dict[str, torch.Tensor],
                      D: dict[str, torch.Tensor], one_sae: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    per: dict[str, dict[str, float]] = {}
    if one_sae:  # one latent space: orient each latent by its codes on both modalities together
        sign = torch.where(sum(Z[m].sum(dim=0) for m in data.modalities) < 0, -1.0, 1.0)
        Z = {m: Z[m] * sign for m in data.modalities}
        D = {m: D[m] * sign[:, None] for m in data.modalities}
    else:
        oriented = {m: M.orient(Z[m], D[m]) for m in data.modalities}
        Z = {m: v[0] for m, v in oriented.items()}
        D = {m: v[1] for m, v in oriented.items()}
    for m in data.modalities:
        scores, _ = _common(data.test[m], Z[m], recon[m], data.codes_test[m], data.directions[m], D[m])
        per[m] = scores
        for key, value in scores.items():
            out[f"{key}_{m}"] = value
    for key in ("fvu", "l0", "mmcs", "mmcs_reverse", "frr_0.8", "frr_0.9", "mcc"):
        out[key] = sum(per[m][key] for m in per) / len(per)
    if one_sae:  # a latent is dead when it fires on neither modality
        fired = torch.stack([(Z[m] != 0).any(dim=0) for m in data.modalities]).any(dim=0)
        out["dead_fraction"] = float((~fired).float().mean())
    else:
        out["dead_fraction"] = sum(per[m]["dead_fraction"] for m in per) / len(per)
    c = data.meta["n_shared"]
    a, b = data.modalities[:2]
    out["same_index_agreement"] = M.same_index_agreement(data.directions[a][:c], D[a], data.directions[b][:c], D[b])
    out["chance_agreement"] = 1.0 / D[a].shape[0]
    if one_sae:
        out["multimodal_fraction"] = M.multimodal_fraction(Z[a], Z[b])
    return out


def score_sae(sae: Any, data: PlantedData) -> dict[str, Any]:
    """Encode ``data.test`` with one SAE and score it. For the multimodal suite a
    single-stream SAE encodes both modalities with its one decoder (the shared
    setting: both modalities have the same width); a multimodal SAE gets each
    modality's encode/decode."""
    if data.modalities:
        Z, R, D = {}, {}, {}
        for m in data.modalities:
            Z[m], R[m] = encode_decode(sae, data.test[m], m)
            D[m] = decoder_directions(sae, m)
        return score_planted(data, Z, R, D)
    Z, R = encode_decode(sae, data.test)
    return score_planted(data, Z, R, decoder_directions(sae))


def score_pair(saes: dict[str, Any], data: PlantedData) -> dict[str, Any]:
    """Multimodal suite with one single-stream SAE per modality (the separate setting)."""
    Z, R, D = {}, {}, {}
    for m in data.modalities:
        Z[m], R[m] = encode_decode(saes[m], data.test[m])
        D[m] = decoder_directions(saes[m])
    return score_planted(data, Z, R, D, one_sae=False)
