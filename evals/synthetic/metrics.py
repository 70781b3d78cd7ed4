"""Scores of a learned dictionary and its codes against planted ground truth.

All functions take plain tensors: ``V`` (n_features, d) true directions,
``D`` (n_latents, d) learned decoder directions (any norm; rows are normalised
here), ``H`` (n, n_features) true codes and ``Z`` (n, n_latents) learned dense
codes (``sae.encode(x).to_dense()``). Rates are fractions in [0, 1].
MMCS and feature recovery rates follow Sharkey et al. ("Taking features out of
superposition with sparse autoencoders", 2022); absorption follows Chanin et al.
("A is for Absorption", 2024) and the hierarchical-tree reading of Costa et al.
(MP-SAE, "From Flat to Hierarchical", 2025); where a metric is ambiguous the
docstring says which reading is used.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


# ------------------------------------------------------------ directions
def cosine_matrix(V: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """(n_features, n_latents) cosine between every true and learned direction.
    A zero row (e.g. a learned atom of norm 0) has cosine 0 with everything."""
    v = V.float() / V.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = D.float() / D.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return v @ d.t()


def mmcs(V: torch.Tensor, D: torch.Tensor, *, absolute: bool = False) -> float:
    """Mean over rows of V of the max cosine to any row of D (``absolute``: |cos|,
    sign-agnostic, for signed features). ``mmcs(V, D)`` is ground truth -> learned;
    ``mmcs(D, V)`` is learned -> ground truth, which penalises junk latents."""
    if V.shape[0] == 0 or D.shape[0] == 0:
        return 0.0
    c = cosine_matrix(V, D)
    if absolute:
        c = c.abs()
    return float(c.max(dim=1).values.mean())


def recovery_rate(V: torch.Tensor, D: torch.Tensor, threshold: float = 0.9, *, absolute: bool = False) -> float:
    """FRR(tau): fraction of true features whose best learned cosine exceeds ``threshold``."""
    if V.shape[0] == 0:
        return 0.0
    if D.shape[0] == 0:
        return 0.0
    c = cosine_matrix(V, D)
    if absolute:
        c = c.abs()
    return float((c.max(dim=1).values > threshold).float().mean())


def match_features(V: torch.Tensor, D: torch.Tensor, *, absolute: bool = True) -> torch.Tensor:
    """Hungarian one-to-one matching of features to latents maximising total
    (|)cosine(|). Returns (n_features,) long: the matched latent, -1 where there
    are more features than latents and a feature is left over."""
    c = cosine_matrix(V, D)
    if absolute:
        c = c.abs()
    rows, cols = linear_sum_assignment(c.double().numpy(), maximize=True)
    match = torch.full((V.shape[0],), -1, dtype=torch.long)
    match[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return match


def best_latent(V: torch.Tensor, D: torch.Tensor, *, absolute: bool = False) -> torch.Tensor:
    """(n_features,) index of each feature's best-matching latent (not one-to-one)."""
    c = cosine_matrix(V, D)
    return (c.abs() if absolute else c).argmax(dim=1)


def _matched_cos(V: torch.Tensor, D: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """(n_features,) signed cosine of each feature with its matched latent (0 when unmatched)."""
    c = cosine_matrix(V, D)
    out = torch.zeros(V.shape[0])
    ok = match >= 0
    out[ok] = c[ok.nonzero().squeeze(1), match[ok]]
    return out


def orient(Z: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each latent whose codes sum to a negative value: (z_j, d_j) -> (-z_j, -d_j).
    The product z_j d_j, hence every reconstruction, is unchanged; a signed SAE (AbsTopK,
    signed MP) that wrote a non-negative feature as -d with negative codes is then
    scored like one that wrote +d. Non-negative codes are left as they are."""
    sign = torch.where(Z.sum(dim=0) < 0, -1.0, 1.0)
    return Z * sign, D * sign[:, None]


# --------------------------------------------------------------- codes
def _pearson_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of matching columns of a, b (n, m) -> (m,); 0 where one is constant."""
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    num = (a * b).sum(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(den > 1e-12, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


def matched_code_correlation(H: torch.Tensor, Z: torch.Tensor, V: torch.Tensor, D: torch.Tensor,
                             match: torch.Tensor | None = None) -> float:
    """Hungarian-matched code MCC: match features to latents by |cos|, then the mean
    over features of the Pearson correlation between the true code h_i and the
    matched latent's activation z_j, multiplied by sign(cos(v_i, d_j)) so an
    anti-parallel latent counts with the orientation it actually has. Unmatched
    features and never-firing latents contribute 0; features that never occur in H
    (no correlation is defined) are left out of the mean."""
    if match is None:
        match = match_features(V, D)
    occurs = (H != H[:1]).any(dim=0)
    if not bool(occurs.any()):
        return float("nan")
    ok = match >= 0
    r = torch.zeros(V.shape[0])
    sign = torch.sign(_matched_cos(V, D, match))
    if bool(ok.any()):
        r[ok] = _pearson_columns(H[:, ok], Z[:, match[ok]]) * sign[ok]
    return float(r[occurs].mean())


# ----------------------------------------------------- hierarchy metrics
def child_features(parent: torch.Tensor) -> torch.Tensor:
    """Indices of the features that have a parent."""
    return (parent >= 0).nonzero().squeeze(1)


def absorption_cos(V: torch.Tensor, D: torch.Tensor, parent: torch.Tensor, match: torch.Tensor | None = None,
                   *, relative: bool = True, absolute: bool = False, live: torch.Tensor | None = None) -> float:
    """MP-SAE's absorption score: mean over child features c of cos(matched latent of c,
    true direction of parent(c)); lower is better. With ``relative`` the true
    cos(v_c, v_parent) is subtracted, so a perfect dictionary scores 0 also when children
    lean on their parents (preset B); in preset A (orthogonal) both readings agree.
    A negative score means child atoms point away from their parent (the parent
    latent carries part of the child); ``absolute`` averages |excess cosine| so
    both distortions count. ``live`` (n_latents,) bool: skip children matched to a
    latent that never fires (its direction is a leftover, not a learned feature)."""
    if match is None:
        match = match_features(V, D)
    kids = child_features(parent)
    kids = kids[match[kids] >= 0]
    if live is not None:
        kids = kids[live[match[kids]]]
    if kids.numel() == 0:
        return float("nan")
    c_learned = cosine_matrix(V[parent[kids]], D[match[kids]]).diagonal()
    if relative:
        c_learned = c_learned - cosine_matrix(V[parent[kids]], V[kids]).diagonal()
    if absolute:
        c_learned = c_learned.abs()
    return float(c_learned.mean())


def absorption_rate(H: torch.Tensor, Z: torch.Tensor, parent: torch.Tensor, match: torch.Tensor) -> dict[str, float]:
    """Occurrence-level absorption, pooled over every child occurrence (true child
    code non-zero, so its parent is active too) and ``match`` from :func:`match_features`.

    child_silent: fraction where the matched child latent is silent while the matched
    parent latent fires (§14's definition: the parent latent took the child's place).
    parent_silent: fraction where the matched parent latent is silent (Chanin et al.'s
    absorption: the child latent swallowed the parent and the parent latent misses).
    """
    kids = child_features(parent)
    kids = kids[(match[kids] >= 0) & (match[parent[kids]] >= 0)]
    total = 0
    child_silent = 0
    parent_silent = 0
    for c in kids.tolist():
        occ = H[:, c] != 0
        n_occ = int(occ.sum())
        if n_occ == 0:
            continue
        zc = Z[occ, match[c]] != 0
        zp = Z[occ, match[parent[c]]] != 0
        total += n_occ
        child_silent += int((~zc & zp).sum())
        parent_silent += int((~zp).sum())
    if total == 0:
        return {"child_silent": float("nan"), "parent_silent": float("nan")}
    return {"child_silent": child_silent / total, "parent_silent": parent_silent / total}


def structure_mse(V: torch.Tensor, D: torch.Tensor, level: torch.Tensor, match: torch.Tensor) -> dict[str, float]:
    """Flat and hierarchical MSE (§14-ii): after matching, the mean squared error
    between learned and true pairwise cosines, over same-level pairs (flat) and
    pairs at different levels (hierarchical). Unmatched features are skipped."""
    ok = (match >= 0).nonzero().squeeze(1)
    if ok.numel() < 2:
        return {"flat_mse": float("nan"), "hier_mse": float("nan")}
    true = cosine_matrix(V[ok], V[ok])
    learned = cosine_matrix(D[match[ok]], D[match[ok]])
    err = (learned - true).pow(2)
    lev = level[ok]
    off = ~torch.eye(ok.numel(), dtype=torch.bool)
    same = (lev[:, None] == lev[None, :]) & off
    diff = lev[:, None] != lev[None, :]
    return {
        "flat_mse": float(err[same].mean()) if bool(same.any()) else float("nan"),
        "hier_mse": float(err[diff].mean()) if bool(diff.any()) else float("nan"),
    }


def per_group_recovery(V: torch.Tensor, D: torch.Tensor, group: torch.Tensor, threshold: float = 0.9,
                       *, absolute: bool = False) -> dict[int, float]:
    """FRR(threshold) within each value of ``group`` (n_features,) (level, frequency band...)."""
    out = {}
    for g in sorted(set(group.tolist())):
        sel = group == g
        out[int(g)] = recovery_rate(V[sel], D, threshold, absolute=absolute)
    return out


# ---------------------------------------------------- bidirectional metrics
def axis_metrics(V_axes: torch.Tensor, D: torch.Tensor, threshold: float = 0.9) -> dict[str, float]:
    """For signed axes (n_axes, d): recovery (max |cos| > tau), split rate (one latent
    with cos > tau and another with cos < -tau) and latents per axis (mean count of
    latents with |cos| > tau)."""
    if V_axes.shape[0] == 0:
        return {"axis_recovery": float("nan"), "split_rate": float("nan"), "latents_per_axis": float("nan")}
    c = cosine_matrix(V_axes, D)
    pos = (c > threshold).any(dim=1)
    neg = (c < -threshold).any(dim=1)
    return {
        "axis_recovery": float((c.abs().max(dim=1).values > threshold).float().mean()),
        "split_rate": float((pos & neg).float().mean()),
        "latents_per_axis": float((c.abs() > threshold).sum(dim=1).float().mean()),
    }


def sign_accuracy(H_axes: torch.Tensor, Z: torch.Tensor, V_axes: torch.Tensor, D: torch.Tensor,
                  threshold: float = 0.9) -> dict[str, float]:
    """Over every (sample, axis) with the axis active (true code h != 0):

    sign_accuracy: does sign(z_j * cos(u_a, d_j)) equal sign(h), with j the axis's
    best |cos| latent (§14-iii; a silent latent counts as wrong, so a one-sided
    latent scores about the fraction of the pole it covers).
    readout_sign_accuracy: the same with the readout sum_j z_j cos(u_a, d_j) over
    every latent with |cos| > ``threshold`` (fair to split dictionaries: a +/- pair
    of latents reads both signs); an axis with no such latent counts as wrong.
    sign_accuracy_fired: sign_accuracy over the occurrences where the best latent
    fires at all (separates "wrong sign" from "silent").
    """
    if V_axes.shape[0] == 0:
        return {"sign_accuracy": float("nan"), "readout_sign_accuracy": float("nan"), "sign_accuracy_fired": float("nan")}
    c = cosine_matrix(V_axes, D)  # (n_axes, n_latents)
    best = c.abs().argmax(dim=1)
    single = Z[:, best] * c.gather(1, best[:, None]).squeeze(1)  # (n, n_axes)
    weights = torch.where(c.abs() > threshold, c, torch.zeros(()))
    readout = Z.float() @ weights.t()  # (n, n_axes)
    active = H_axes != 0
    if not bool(active.any()):
        return {"sign_accuracy": float("nan"), "readout_sign_accuracy": float("nan"), "sign_accuracy_fired": float("nan")}
    truth = torch.sign(H_axes[active])
    got = torch.sign(single[active])
    fired = got != 0
    return {
        "sign_accuracy": float((got == truth).float().mean()),
        "readout_sign_accuracy": float((torch.sign(readout[active]) == truth).float().mean()),
        "sign_accuracy_fired": float((got[fired] == truth[fired]).float().mean()) if bool(fired.any()) else float("nan"),
    }


def sign_usage(Z: torch.Tensor, latents: torch.Tensor, min_share: float = 0.1) -> dict[str, float]:
    """Over the given latents' firings on ``Z``:

    both_signs: fraction of latents that fire with each sign on at least ``min_share``
    of their firings (a truly bidirectional latent; a stray small negative value
    from interference does not count).
    positive_share: mean over latents of the share of their firings that are positive
    (1 for a unipolar latent read the right way round). Silent latents are left out.
    """
    if latents.numel() == 0:
        return {"both_signs": float("nan"), "positive_share": float("nan")}
    z = Z[:, latents]
    fired = (z != 0).sum(dim=0).float()
    live = fired > 0
    if not bool(live.any()):
        return {"both_signs": float("nan"), "positive_share": float("nan")}
    pos = (z > 0).sum(dim=0).float()[live] / fired[live]
    neg = (z < 0).sum(dim=0).float()[live] / fired[live]
    both = (pos >= min_share) & (neg >= min_share)
    return {"both_signs": float(both.float().mean()), "positive_share": float(pos.mean())}


# ----------------------------------------------------- multimodal metrics
def same_index_agreement(V_a: torch.Tensor, D_a: torch.Tensor, V_b: torch.Tensor, D_b: torch.Tensor) -> float:
    """Fraction of shared concepts (row i of V_a and of V_b is the same concept)
    whose best-matching latent (max signed cosine) is the same index in both
    modalities' decoders. A shared dictionary scores 1; two unrelated ones about
    1 / n_latents."""
    if V_a.shape[0] != V_b.shape[0]:
        raise ValueError("shared concepts must be the same rows in both modalities")
    if D_a.shape[0] != D_b.shape[0]:
        raise ValueError("both decoders need the same number of latents for index agreement")
    return float((best_latent(V_a, D_a) == best_latent(V_b, D_b)).float().mean())


def modality_scores(Z_a: torch.Tensor, Z_b: torch.Tensor) -> torch.Tensor:
    """(n_latents,) E_a[z_j] / (E_a[z_j] + E_b[z_j]) on |z|; NaN for latents silent on both."""
    ea = Z_a.abs().float().mean(0)
    eb = Z_b.abs().float().mean(0)
    tot = ea + eb
    return torch.where(tot > 0, ea / tot.clamp_min(1e-30), torch.full_like(tot, float("nan")))


def multimodal_fraction(Z_a: torch.Tensor, Z_b: torch.Tensor, low: float = 0.2, high: float = 0.8) -> float:
    """Fraction of live latents whose modality score lies in [low, high]."""
    s = modality_scores(Z_a, Z_b)
    live = ~torch.isnan(s)
    if not bool(live.any()):
        return float("nan")
    return float(((s[live] >= low) & (s[live] <= high)).float().mean())


# ------------------------------------------------------- reconstruction
def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    x = x.double()
    var = (x - x.mean(0)).pow(2).sum()
    if float(var) == 0:
        return float("nan")
    return float((x - recon.double()).pow(2).sum() / var)


def mean_l0(Z: torch.Tensor) -> float:
    """Mean number of non-zero latents per row."""
    return float((Z != 0).sum(dim=1).float().mean())


def dead_fraction(Z: torch.Tensor) -> float:
    """Fraction of latents that never fire on the rows of Z."""
    return float((~(Z != 0).any(dim=0)).float().mean())


def firing_rates(Z: torch.Tensor) -> torch.Tensor:
    """(n_latents,) fraction of rows on which each latent fires."""
    return (Z != 0).float().mean(dim=0)


def frequency_match_error(freq: torch.Tensor, Z: torch.Tensor, match: torch.Tensor) -> float:
    """Median over matched features of |log(p_j / f_i)|, p_j the matched latent's
    firing rate and f_i the feature's planted frequency (GBA's resonance check);
    latents that never fire are left out."""
    ok = match >= 0
    p = firing_rates(Z)[match[ok]]
    f = freq[ok].float()
    keep = (p > 0) & (f > 0)
    if not bool(keep.any()):
        return float("nan")
    return float((p[keep].log() - f[keep].log()).abs().median())


__all__ = [
    "cosine_matrix", "orient", "mmcs", "recovery_rate", "match_features", "best_latent", "matched_code_correlation",
    "absorption_cos", "absorption_rate", "structure_mse", "per_group_recovery", "axis_metrics", "sign_accuracy",
    "sign_usage", "same_index_agreement", "modality_scores", "multimodal_fraction", "fvu", "mean_l0",
    "dead_fraction", "firing_rates", "frequency_match_error",
]
