"""Every planted-feature metric on a constructed case with a known answer."""
import math

import pytest
import torch

from evals.synthetic import generate
from evals.synthetic import metrics as M
from evals.synthetic.score import score_planted


def orthonormal(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g))
    return q.t().contiguous()


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


V = orthonormal(8, 16)
PERM = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])


# --------------------------------------------------------------- directions
def test_mmcs_perfect_permuted_scaled():
    assert math.isclose(M.mmcs(V, V), 1.0, abs_tol=1e-6)
    assert math.isclose(M.mmcs(V, 3.0 * V[PERM]), 1.0, abs_tol=1e-6)  # order and norm do not matter
    assert math.isclose(M.mmcs(V[PERM], V), 1.0, abs_tol=1e-6)


def test_mmcs_signs_and_reverse():
    # anti-parallel atoms are no match when signs count (the best is an orthogonal atom, cos 0)
    assert math.isclose(M.mmcs(V, -V), 0.0, abs_tol=1e-6)
    assert math.isclose(M.mmcs(V[:1], -V[:1]), -1.0, abs_tol=1e-6)
    assert math.isclose(M.mmcs(V, -V, absolute=True), 1.0, abs_tol=1e-6)
    # half the dictionary orthogonal junk: forward still 1 for the covered half only
    junk = orthonormal(16, 16, seed=1)
    W = orthonormal(16, 16, seed=2)
    covered = torch.cat([W[:4], W[8:]])  # 12 learned atoms: 4 true, 8 orthogonal to the true 4
    assert math.isclose(M.mmcs(W[:4], covered), 1.0, abs_tol=1e-6)
    assert math.isclose(M.mmcs(covered, W[:4]), 4 / 12, abs_tol=1e-6)  # reverse punishes junk
    assert M.mmcs(V, junk) < 1.0


def test_cosine_of_known_angle():
    D = unit(V[0] + V[1])[None]
    assert math.isclose(float(M.cosine_matrix(V[:1], D)), 2 ** -0.5, abs_tol=1e-6)


def test_recovery_rate_thresholds():
    # atom i = cos(t_i) v_i + sin(t_i) w_i with w_i orthogonal to every v
    W = orthonormal(16, 16)
    true, other = W[:4], W[4:8]
    cosines = torch.tensor([0.95, 0.85, 0.75, 0.99])
    D = cosines[:, None] * true + (1 - cosines ** 2).sqrt()[:, None] * other
    assert math.isclose(M.recovery_rate(true, D, 0.9), 0.5)
    assert math.isclose(M.recovery_rate(true, D, 0.8), 0.75)
    assert math.isclose(M.recovery_rate(true, -D, 0.8), 0.0)
    assert math.isclose(M.recovery_rate(true, -D, 0.8, absolute=True), 0.75)


def test_match_features_permutation_and_leftovers():
    D = V[PERM]
    match = M.match_features(V, D)
    assert torch.equal(D[match], V)
    few = M.match_features(V, V[:5])
    assert (few == -1).sum() == 3 and torch.equal(few[:5], torch.arange(5))


# --------------------------------------------------------------------- codes
def test_matched_code_correlation():
    g = torch.Generator().manual_seed(0)
    H = (torch.rand(500, 8, generator=g) < 0.3) * torch.rand(500, 8, generator=g)
    inv = torch.argsort(PERM)
    Z = 2.0 * H[:, PERM]  # latent j has direction V[PERM[j]], so it carries feature PERM[j]
    D = V[PERM]
    assert math.isclose(M.matched_code_correlation(H, Z, V, D), 1.0, abs_tol=1e-5)
    # anti-parallel atoms read with negated codes are the same dictionary
    assert math.isclose(M.matched_code_correlation(H, -Z, V, -D), 1.0, abs_tol=1e-5)
    # codes unrelated to the data: near 0
    Z_shuffled = Z[torch.randperm(500, generator=g)]
    assert abs(M.matched_code_correlation(H, Z_shuffled, V, D)) < 0.15
    # dead latents count as 0; a feature that never occurs is left out
    H2 = H.clone()
    H2[:, 0] = 0
    Z2 = Z.clone()
    Z2[:, inv[1]] = 0  # feature 1's latent never fires
    assert math.isclose(M.matched_code_correlation(H2, Z2, V, D), 6 / 7, abs_tol=1e-5)


# ----------------------------------------------------------------- hierarchy
PARENT = torch.tensor([-1, -1, 0, 0, 1])  # features 2, 3 are children of 0; 4 a child of 1
LEVEL = torch.tensor([0, 0, 1, 1, 1])
VH = orthonormal(5, 8)


def test_absorption_cos():
    assert math.isclose(M.absorption_cos(VH, VH, PARENT), 0.0, abs_tol=1e-6)
    absorbed = VH.clone()
    for c in (2, 3, 4):
        absorbed[c] = unit(VH[c] + VH[PARENT[c]])  # child atom leans fully on the parent
    match = torch.arange(5)
    assert math.isclose(M.absorption_cos(VH, absorbed, PARENT, match), 2 ** -0.5, abs_tol=1e-6)
    # relative reading: the true children already lean on their parents -> 0
    assert math.isclose(M.absorption_cos(absorbed, absorbed, PARENT, match), 0.0, abs_tol=1e-6)
    assert math.isclose(M.absorption_cos(VH, absorbed, PARENT, match, relative=False), 2 ** -0.5, abs_tol=1e-6)
    # child atoms leaning away from the parent: negative signed score, same absolute score
    away = VH.clone()
    for c in (2, 3, 4):
        away[c] = unit(VH[c] - VH[PARENT[c]])
    assert math.isclose(M.absorption_cos(VH, away, PARENT, match), -(2 ** -0.5), abs_tol=1e-6)
    assert math.isclose(M.absorption_cos(VH, away, PARENT, match, absolute=True), 2 ** -0.5, abs_tol=1e-6)


def test_absorption_rate_counts_occurrences():
    n = 100
    H = torch.zeros(n, 5)
    H[:, 0] = 1.0
    H[:50, 2] = 1.0  # 50 occurrences of child 2
    H[50:80, 1] = 1.0
    H[50:80, 4] = 1.0  # 30 occurrences of child 4
    Z = H.clone()
    Z[:20, 2] = 0  # child latent silent on 20 occurrences, parent latent fires
    Z[50:60, 1] = 0  # parent latent of child 4 silent on 10 occurrences, child latent fires
    rates = M.absorption_rate(H, Z, PARENT, torch.arange(5))
    assert math.isclose(rates["child_silent"], 20 / 80)
    assert math.isclose(rates["parent_silent"], 10 / 80)
    perfect = M.absorption_rate(H, H, PARENT, torch.arange(5))
    assert perfect == {"child_silent": 0.0, "parent_silent": 0.0}


def test_structure_mse():
    ok = M.structure_mse(VH, VH, LEVEL, torch.arange(5))
    assert ok == {"flat_mse": 0.0, "hier_mse": 0.0}
    bent = VH.clone()
    bent[2] = unit(VH[2] + VH[0])  # child 2 now has cos 1/sqrt2 with parent 0 (a cross-level pair)
    s = M.structure_mse(VH, bent, LEVEL, torch.arange(5))
    # cross-level pairs: 0-2,0-3,0-4,1-2,1-3,1-4 (each counted twice); only (0,2) is off by 0.5
    assert math.isclose(s["hier_mse"], 0.5 / 6, abs_tol=1e-6)
    # same-level pairs among children: (2,3),(2,4) have cos 0 still; flat unaffected
    assert math.isclose(s["flat_mse"], 0.0, abs_tol=1e-6)


def test_per_group_recovery():
    D = VH[:3]  # recovers features 0, 1, 2 only
    assert M.per_group_recovery(VH, D, LEVEL, 0.9) == {0: 1.0, 1: pytest.approx(1 / 3)}


# ------------------------------------------------------------- bidirectional
def test_axis_metrics_split_and_single():
    axes = V[:4]
    single = M.axis_metrics(axes, V)
    assert single == {"axis_recovery": 1.0, "split_rate": 0.0, "latents_per_axis": 1.0}
    split = M.axis_metrics(axes, torch.cat([V, -axes]))
    assert split == {"axis_recovery": 1.0, "split_rate": 1.0, "latents_per_axis": 2.0}
    half = M.axis_metrics(axes, torch.cat([V, -axes[:2]]))
    assert half["split_rate"] == 0.5 and half["latents_per_axis"] == 1.5


def test_sign_accuracy():
    g = torch.Generator().manual_seed(0)
    n = 2_000
    axes = V[:4]
    signs = torch.where(torch.rand(n, 4, generator=g) < 0.5, 1.0, -1.0)
    H = (torch.rand(n, 4, generator=g) < 0.5) * signs * (0.5 + torch.rand(n, 4, generator=g))
    # a signed dictionary reading the codes exactly
    exact = M.sign_accuracy(H, H, axes, axes)
    assert exact == {"sign_accuracy": 1.0, "readout_sign_accuracy": 1.0, "sign_accuracy_fired": 1.0}
    # a one-sided (ReLU) latent per axis: right on the positive pole only
    relu = M.sign_accuracy(H, H.clamp_min(0), axes, axes)
    frac_pos = float((H[H != 0] > 0).float().mean())
    assert math.isclose(relu["sign_accuracy"], frac_pos, abs_tol=1e-6)
    assert relu["sign_accuracy_fired"] == 1.0  # wrong only by being silent
    # the split pair (+u, -u) with ReLU codes: readout gets every sign right
    D = torch.cat([axes, -axes])
    Z = torch.cat([H.clamp_min(0), (-H).clamp_min(0)], dim=1)
    split = M.sign_accuracy(H, Z, axes, D)
    assert split["readout_sign_accuracy"] == 1.0
    assert 0.4 < split["sign_accuracy"] < 0.6


def test_sign_usage():
    # latent 0: 5 positive, 5 negative firings; latent 1: 19 positive, 1 negative (stray);
    # latent 2: always positive; latent 3: silent (left out)
    Z = torch.zeros(20, 4)
    Z[:5, 0], Z[5:10, 0] = 1.0, -1.0
    Z[:19, 1], Z[19, 1] = 1.0, -0.01
    Z[:3, 2] = 2.0
    u = M.sign_usage(Z, torch.tensor([0, 1, 2, 3]))
    assert u["both_signs"] == pytest.approx(1 / 3)
    assert u["positive_share"] == pytest.approx((0.5 + 0.95 + 1.0) / 3)


# ---------------------------------------------------------------- multimodal
def test_same_index_agreement():
    Vt = orthonormal(8, 16, seed=5)
    assert M.same_index_agreement(V, V, Vt, Vt) == 1.0
    # the text decoder stores concept i at a different index: no agreement
    derange = torch.roll(torch.arange(8), 1)
    assert M.same_index_agreement(V, V, Vt, Vt[derange]) == 0.0
    # 3 of 8 concepts in the same place
    mixed = torch.tensor([0, 1, 2, 4, 5, 6, 7, 3])
    assert M.same_index_agreement(V, V, Vt, Vt[mixed]) == 3 / 8


def test_modality_scores_and_multimodal_fraction():
    Za = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    Zb = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 3.0, 0.0]])
    s = M.modality_scores(Za, Zb)
    assert s[0] == 1.0 and s[1] == 0.0 and float(s[2]) == pytest.approx(1 / 3) and torch.isnan(s[3])
    assert M.multimodal_fraction(Za, Zb) == pytest.approx(1 / 3)


# ------------------------------------------------------------ reconstruction
def test_fvu_l0_dead():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 4, generator=g)
    assert M.fvu(x, x) == 0.0
    assert math.isclose(M.fvu(x, x.mean(0).expand_as(x)), 1.0, rel_tol=1e-6)
    Z = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    assert M.mean_l0(Z) == 1.5
    assert M.dead_fraction(Z) == 0.5
    assert torch.equal(M.firing_rates(Z), torch.tensor([0.5, 0.0, 1.0, 0.0]))


def test_frequency_match_error():
    Z = torch.zeros(100, 3)
    Z[:10, 0] = 1
    Z[:40, 1] = 1
    freq = torch.tensor([0.1, 0.2])
    err = M.frequency_match_error(freq, Z, torch.tensor([0, 1]))
    # |log(0.1/0.1)| = 0, |log(0.4/0.2)| = log 2; median of two values is the lower in torch
    assert math.isclose(err, 0.0, abs_tol=1e-6)
    assert math.isclose(M.frequency_match_error(freq[1:], Z, torch.tensor([1])), math.log(2), rel_tol=1e-5)


# ---------------------------------------------- the whole score on an oracle
@pytest.mark.parametrize("suite,preset", [("independent", "light"), ("hierarchical", "A"), ("hierarchical", "B"),
                                          ("bidirectional", "default"), ("multimodal", "shared")])
def test_oracle_scores_perfect(suite, preset):
    data = generate(suite, preset=preset, seed=0, n_train=10, n_test=3_000)
    if data.modalities:
        s = score_planted(data, data.codes_test, data.test, data.directions)
        assert s["same_index_agreement"] == 1.0
    else:
        s = score_planted(data, data.codes_test, data.codes_test @ data.directions, data.directions)
        assert s["fvu"] < 1e-10
    for key in ("mmcs", "frr_0.9", "mcc"):
        assert s[key] == pytest.approx(1.0, abs=1e-5), key
    if suite == "hierarchical":
        assert s["absorption_cos"] == pytest.approx(0.0, abs=1e-6) and s["absorption_rate"] == 0.0
    if suite == "bidirectional":
        assert s["split_rate"] == 0.0 and s["sign_accuracy"] == 1.0 and s["latents_per_axis"] == 1.0


def test_split_dictionary_on_bidirectional_suite():
    """A ReLU-style dictionary with one latent per pole: split rate 1, two latents per axis."""
    data = generate("bidirectional", seed=0, n_train=10, n_test=2_000)
    V_, H = data.directions, data.codes_test
    axis = data.meta["is_axis"]
    D = torch.cat([V_, -V_[axis]])
    Z = torch.cat([H.clamp_min(0), (-H[:, axis]).clamp_min(0)], dim=1)
    s = score_planted(data, Z, Z @ D, D)
    assert s["split_rate"] == 1.0 and s["latents_per_axis"] == 2.0
    assert s["readout_sign_accuracy"] == 1.0 and s["fvu"] < 1e-10
    assert s["bidirectional_fraction"] == 0.0


def test_orient_flips_negative_latents_only():
    Z = torch.tensor([[-1.0, 2.0, 0.0], [-2.0, 0.0, 0.0]])
    Zo, Do = M.orient(Z, V[:3])
    assert torch.equal(Zo, torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 0.0]]))
    assert torch.equal(Do[0], -V[0]) and torch.equal(Do[1:], V[1:3])
    assert torch.allclose(Zo @ Do, Z @ V[:3])


def test_signed_dictionary_scores_like_positive_one():
    """A signed SAE writing features as -v with negative codes gets the oracle's scores."""
    data = generate("hierarchical", preset="A", seed=0, n_train=10, n_test=2_000)
    H, V_ = data.codes_test, data.directions
    flip = torch.where(torch.arange(V_.shape[0]) % 2 == 0, -1.0, 1.0)
    s = score_planted(data, H * flip, H @ V_, V_ * flip[:, None])
    assert s["mmcs"] == pytest.approx(1.0, abs=1e-5) and s["mcc"] == pytest.approx(1.0, abs=1e-5)
    assert s["absorption_cos"] == pytest.approx(0.0, abs=1e-6)


def test_absorption_skips_dead_latents():
    absorbed = VH.clone()
    absorbed[2] = unit(VH[2] + VH[0])
    live = torch.tensor([True, True, False, True, True])  # child 2's latent never fires
    assert M.absorption_cos(VH, absorbed, PARENT, torch.arange(5), live=live) == pytest.approx(0.0, abs=1e-6)
    assert M.absorption_cos(VH, absorbed, PARENT, torch.arange(5)) == pytest.approx(2 ** -0.5 / 3, abs=1e-6)


def test_offset_dictionary_scores_on_preset_b():
    """Preset B: a dictionary of parent directions + child offsets (child minus parent part)
    recovers every offset, and its children sit 1/sqrt2 below the true parent cosine.
    (Only the directions matter here; the codes are a plausible stand-in.)"""
    data = generate("hierarchical", preset="B", seed=0, n_train=10, n_test=2_000)
    offsets = data.meta["offset_directions"]
    parent = data.meta["parent"]
    kids = parent >= 0
    assert torch.allclose((offsets[kids] * data.directions[parent[kids]]).sum(1), torch.zeros(int(kids.sum())), atol=1e-5)
    H = data.codes_test
    Z = H.clone()  # offset codes: parent code absorbs the child's parent component
    for c in kids.nonzero().squeeze(1).tolist():
        Z[:, parent[c]] += H[:, c] * 2 ** -0.5
        Z[:, c] = H[:, c] * 2 ** -0.5
    s = score_planted(data, Z, H @ data.directions, offsets)
    assert s["frr_0.9_offset"] == 1.0 and s["mmcs_offset"] == pytest.approx(1.0, abs=1e-5)
    assert s["absorption_cos"] == pytest.approx(-(2 ** -0.5), abs=1e-4)
