"""Planted-feature generators: shapes, seeds, the rules each suite promises."""
import math

import pytest
import torch

from evals.synthetic import generate, list_presets, list_suites
from evals.synthetic.generators import deep_tree, mp_sae_tree
from vlsae.errors import VlsaeError

SMALL = dict(n_train=2_000, n_test=1_000)
ALL_CASES = [(s, p) for s in ["independent", "hierarchical", "bidirectional", "multimodal"] for p in list_presets(s)]


def test_list_suites():
    assert list_suites() == ["bidirectional", "hierarchical", "independent", "multimodal"]


@pytest.mark.parametrize("suite,preset", ALL_CASES)
def test_shapes_and_consistency(suite, preset):
    data = generate(suite, preset=preset, seed=1, **SMALL)
    assert data.meta["suite"] == suite and data.meta["preset"] == preset
    if suite == "multimodal":
        assert data.modalities == ("image", "text")
        for m in data.modalities:
            n_f, d = data.directions[m].shape
            assert data.train[m].shape == (2_000, d) and data.test[m].shape == (1_000, d)
            assert data.codes_train[m].shape == (2_000, n_f) and data.codes_test[m].shape == (1_000, n_f)
        return
    n_f, d = data.directions.shape
    assert data.train.shape == (2_000, d) and data.test.shape == (1_000, d)
    assert data.codes_train.shape == (2_000, n_f) and data.codes_test.shape == (1_000, n_f)
    assert torch.allclose(data.directions.norm(dim=1), torch.ones(n_f), atol=1e-5)
    # without noise the activations are exactly the planted code times the dictionary
    assert torch.allclose(data.train, data.codes_train @ data.directions, atol=1e-5)
    assert not torch.equal(data.train[:1_000], data.test)


@pytest.mark.parametrize("suite,preset", ALL_CASES)
def test_seed_reproducible(suite, preset):
    a = generate(suite, preset=preset, seed=3, n_train=300, n_test=200)
    b = generate(suite, preset=preset, seed=3, n_train=300, n_test=200)
    c = generate(suite, preset=preset, seed=4, n_train=300, n_test=200)
    if suite == "multimodal":
        for m in a.modalities:
            assert torch.equal(a.train[m], b.train[m]) and torch.equal(a.directions[m], b.directions[m])
            assert not torch.equal(a.directions[m], c.directions[m])
    else:
        assert torch.equal(a.train, b.train) and torch.equal(a.codes_test, b.codes_test)
        assert torch.equal(a.directions, b.directions)
        assert not torch.equal(a.directions, c.directions)


def test_mp_sae_tree_rules_and_l0():
    tree = mp_sae_tree()
    assert tree.n == 20 and math.isclose(tree.expected_l0(), 1.36)
    data = generate("hierarchical", preset="A", seed=0, n_train=40_000, n_test=100)
    z = data.codes_train != 0
    parent = data.meta["parent"]
    for c in (parent >= 0).nonzero().squeeze(1).tolist():
        assert not bool((z[:, c] & ~z[:, parent[c]]).any()), "a child fired without its parent"
    for group in data.meta["groups"]:
        assert int(z[:, group].sum(dim=1).max()) <= 1, "siblings fired together"
    l0 = z.sum(dim=1).float()
    assert set(l0.unique().tolist()) == {1.0, 2.0}
    # standard error of the mean L0 is ~0.0024 at 40k samples
    assert abs(float(l0.mean()) - 1.36) < 0.02
    # orthonormal directions at correlation 0
    gram = data.directions @ data.directions.t()
    assert torch.allclose(gram, torch.eye(20), atol=1e-5)
    # magnitudes N(1.5, 0.25^2)
    vals = data.codes_train[z]
    assert abs(float(vals.mean()) - 1.5) < 0.02 and abs(float(vals.std()) - 0.25) < 0.02


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_intra_level_correlation(rho):
    data = generate("hierarchical", preset="A", seed=0, n_train=10, n_test=10, correlation=rho)
    V = data.directions
    gram = V @ V.t()
    for group in data.meta["groups"]:
        block = gram[group][:, group]
        off = block[~torch.eye(len(group), dtype=torch.bool)]
        assert torch.allclose(off, torch.full_like(off, rho), atol=1e-4)
    level = data.meta["level"]
    assert gram[level == 0][:, level == 1].abs().max() < 1e-5  # levels stay orthogonal


def test_deep_tree_preset_b():
    tree = deep_tree(3, 4)
    assert tree.n == 84
    data = generate("hierarchical", preset="B", seed=0, n_train=20_000, n_test=100)
    V, parent = data.directions, data.meta["parent"]
    assert V.shape == (84, 128)
    z = data.codes_train != 0
    kids = (parent >= 0).nonzero().squeeze(1)
    for c in kids.tolist():
        assert not bool((z[:, c] & ~z[:, parent[c]]).any())
        # child = normalise(parent + orthogonal offset): cos 1/sqrt(2), (child - parent) has no parent component
        assert abs(float(V[c] @ V[parent[c]]) - 2 ** -0.5) < 1e-5
    for group in data.meta["groups"]:
        assert int(z[:, group].sum(dim=1).max()) <= 1
    assert abs(float(z.sum(1).float().mean()) - tree.expected_l0()) < 0.05


@pytest.mark.parametrize("spectrum,target", [("flat", 5.0), ("zipf", 8.0)])
def test_independent_spectrum_l0(spectrum, target):
    data = generate("independent", preset="light", spectrum=spectrum, seed=0, n_train=5_000, n_test=10)
    l0 = (data.codes_train != 0).sum(1).float().mean()
    assert abs(float(l0) - target) < 0.25
    assert float(data.codes_train[data.codes_train != 0].min()) >= 0.5


def test_independent_geometric_and_gba():
    data = generate("independent", preset="light", spectrum="geometric", seed=0, n_train=20_000, n_test=10)
    freq, band = data.meta["frequencies"], data.meta["band"]
    assert math.isclose(float(freq.max()), 0.1, rel_tol=1e-5) and math.isclose(float(freq.min()), 1e-4, rel_tol=1e-4)
    assert band.unique().numel() == 10
    emp = (data.codes_train[:, band == 0] != 0).float().mean()
    assert abs(float(emp) - 0.1) < 0.01
    gba = generate("independent", preset="gba", seed=0, n_train=2_000, n_test=10)
    assert gba.directions.shape == (128, 42)
    s = (gba.codes_train != 0).sum(1)
    assert set(s.unique().tolist()) == {3, 20}
    assert abs(float((s == 3).float().mean()) - 0.5) < 0.05


def test_bidirectional_signs():
    data = generate("bidirectional", seed=0, n_train=20_000, n_test=10, p_plus=0.8)
    axis = data.meta["is_axis"]
    h = data.codes_train
    assert float(h[:, ~axis].min()) >= 0
    active = h[:, axis][h[:, axis] != 0]
    assert abs(float((active > 0).float().mean()) - 0.8) < 0.02
    assert abs(float((h != 0).sum(1).float().mean()) - 6.0) < 0.1


def test_multimodal_shared_geometry():
    data = generate("multimodal", preset="shared", seed=0, n_train=20_000, n_test=10, rho=0.6)
    c = data.meta["n_shared"]
    ui, ut = data.directions["image"][:c], data.directions["text"][:c]
    assert torch.allclose((ui * ut).sum(1), torch.full((c,), 0.6), atol=1e-5)
    mu = data.meta["offsets"]
    assert abs(float((mu["image"] - mu["text"]).norm()) - 2.0) < 1e-5
    hi, ht = data.codes_train["image"][:, :c], data.codes_train["text"][:, :c]
    assert not bool(((ht != 0) & (hi == 0)).any()), "a caption mentioned a concept its image lacks"
    mention = float((ht != 0).sum() / (hi != 0).sum())
    assert abs(mention - 0.8) < 0.02
    x_img = data.codes_train["image"] @ data.directions["image"] + mu["image"]
    assert torch.allclose(data.train["image"], x_img, atol=1e-5)


def test_multimodal_separate_widths():
    data = generate("multimodal", preset="separate", seed=0, n_train=100, n_test=10)
    assert data.d_in == {"image": 64, "text": 48}
    assert data.directions["image"].shape == (128, 64) and data.directions["text"].shape == (128, 48)


def test_noise_level():
    sigma = 0.05
    data = generate("independent", seed=0, n_train=20_000, n_test=10, noise=sigma)
    resid = data.train - data.codes_train @ data.directions
    # xi ~ N(0, I/d): per-row squared norm of sigma*xi averages sigma^2
    assert abs(float(resid.pow(2).sum(1).mean()) - sigma ** 2) < 0.05 * sigma ** 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(suite="nope"), "unknown synthetic suite"),
    (dict(suite="hierarchical", preset="C"), "unknown preset"),
    (dict(suite="hierarchical", colour=3), "no option 'colour'"),
    (dict(suite="hierarchical", correlation=1.0), "correlation"),
    (dict(suite="independent", spectrum="pink"), "spectrum"),
    (dict(suite="bidirectional", p_plus=2.0), "p_plus"),
    (dict(suite="independent", n_train=0), "positive"),
])
def test_bad_options_are_user_errors(kwargs, match):
    suite = kwargs.pop("suite")
    args = dict(n_train=10, n_test=10)
    args.update(kwargs)
    with pytest.raises(VlsaeError, match=match):
        generate(suite, **args)
