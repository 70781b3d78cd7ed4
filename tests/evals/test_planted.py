import numpy as np
import pytest

from evals.planted import auroc_matrix, match_values, summarize_matches


def test_auroc_matrix_known_cases():
    rng = np.random.default_rng(0)
    label = rng.random(200) < 0.3
    scores = np.stack([label * 1.0, 1.0 - label, np.zeros(200), rng.random(200)], axis=1)
    a = auroc_matrix(scores, {"v": label, "empty": np.zeros(200, bool)})["v"]
    assert a[0] == pytest.approx(1.0) and a[1] == pytest.approx(0.0) and a[2] == pytest.approx(0.5)
    assert 0.35 < a[3] < 0.65
    assert "empty" not in auroc_matrix(scores, {"empty": np.zeros(200, bool)})


def test_match_values_same_index():
    img = {"red": np.array([0.5, 0.95, 0.6]), "star": np.array([0.9, 0.5, 0.5])}
    txt = {"red": np.array([0.5, 0.92, 0.6]), "star": np.array([0.5, 0.5, 0.99]), "only_text": np.array([1.0, 0, 0])}
    matches = match_values(img, txt)
    assert [m.value for m in matches] == ["red", "star"]
    s = summarize_matches(matches)
    assert s["same_index_rate"] == pytest.approx(0.5)
    assert s["both_auroc_ge_0.9"] == pytest.approx(1.0)


def test_linear_probe_auroc_is_high_for_linear_labels_and_chance_for_random_ones():
    import torch

    from evals.planted import linear_probe_auroc, summarize_by_attribute, ValueMatch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 12, generator=g) * 3 + 1
    direction = torch.randn(12, generator=g)
    linear = ((x - 1) @ direction > 0.5).numpy()
    rng = np.random.default_rng(0)
    noise = rng.random(3000) < 0.3
    labels = {"colour=red": linear, "shape=star": noise}
    out = linear_probe_auroc(x[:2000], {k: v[:2000] for k, v in labels.items()}, x[2000:], {k: v[2000:] for k, v in labels.items()})
    assert out["colour=red"] > 0.97
    assert 0.4 < out["shape=star"] < 0.6
    by = summarize_by_attribute([ValueMatch("colour=red", 1, 0.95, 1, 0.92), ValueMatch("colour=blue", 2, 0.9, 3, 0.8),
                                 ValueMatch("shape=star", 4, 0.6, 4, 0.7)])
    assert by["colour"]["same_index_rate"] == 0.5 and by["colour"]["values"] == 2
    assert by["shape"]["both_auroc_ge_0.9"] == 0.0


def test_class_mean_reference_gives_each_planted_value_its_own_shared_concept():
    """Factorial data (each pair: one colour and one shape, each value a direction; the caption side is
    the image side rotated slightly and offset by a modality gap): the class-mean concepts make a vl
    code whose best latent per value is the same index on both sides and separates it."""
    import torch

    from evals.planted import auroc_matrix, class_mean_concepts, class_mean_vl_sae, match_values

    g = torch.Generator().manual_seed(0)
    n, d = 3000, 24
    values = {"colour": ["red", "blue", "green"], "shape": ["star", "ring", "cross", "heart"]}
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:7]
    picks = {a: torch.randint(len(v), (n,), generator=g) for a, v in values.items()}
    image = basis[picks["colour"]] + basis[3 + picks["shape"]] + 0.1 * torch.randn(n, d, generator=g)
    text = image @ (torch.eye(d) + 0.05 * torch.randn(d, d, generator=g)) + 2.0 + 0.1 * torch.randn(n, d, generator=g)
    labels = {f"{a}={v}": (picks[a] == i).numpy() for a, vs in values.items() for i, v in enumerate(vs)}
    names, directions, means = class_mean_concepts({"image": image, "text": text}, labels, labels)
    assert names == sorted(labels) and directions.shape == (7, d) and set(means) == {"image", "text"}
    sae = class_mean_vl_sae({"image": image, "text": text}, labels, labels, k=2)
    with torch.no_grad():
        img = torch.zeros(n, 7).scatter(1, (code := sae.encode(image, "image")).indices, code.values)
        txt = torch.zeros(n, 7).scatter(1, (code := sae.encode(text, "text")).indices, code.values)
    matches = match_values(auroc_matrix(img, labels), auroc_matrix(txt, labels))
    assert all(m.same and m.image_latent == names.index(m.value) for m in matches)
    assert min(min(m.image_auroc, m.text_auroc) for m in matches) > 0.95


def _catch_all_matrices():
    """Latent 0 fires on everything: it is the best latent of three shapes and of size=medium, on both
    sides; size=medium has the highest AUROC there. colour=red has latent 2 to itself; shape=ring's
    best latent differs between the sides."""
    img = {"shape=circle": np.array([0.80, 0.6, 0.5, 0.5]), "shape=square": np.array([0.75, 0.7, 0.5, 0.5]),
           "shape=star": np.array([0.70, 0.5, 0.5, 0.6]), "size=medium": np.array([0.85, 0.5, 0.5, 0.5]),
           "colour=red": np.array([0.5, 0.5, 0.97, 0.5]), "shape=ring": np.array([0.5, 0.5, 0.5, 0.9])}
    txt = {"shape=circle": np.array([0.82, 0.6, 0.5, 0.5]), "shape=square": np.array([0.78, 0.5, 0.5, 0.5]),
           "shape=star": np.array([0.71, 0.5, 0.5, 0.5]), "size=medium": np.array([0.90, 0.5, 0.5, 0.5]),
           "colour=red": np.array([0.5, 0.5, 0.95, 0.5]), "shape=ring": np.array([0.5, 0.93, 0.5, 0.5])}
    return img, txt


def test_a_catch_all_latent_counts_once_in_the_exclusive_rate():
    from evals.planted import catch_all_latents

    matches = {m.value: m for m in match_values(*_catch_all_matrices())}
    assert matches["size=medium"].exclusive_same and matches["colour=red"].exclusive_same
    for value in ("shape=circle", "shape=square", "shape=star"):
        m = matches[value]
        assert m.same and not m.exclusive_same and not m.image_exclusive and not m.text_exclusive
    assert not matches["shape=ring"].same and matches["shape=ring"].image_exclusive  # latent 3 is its own on images
    s = summarize_matches(list(matches.values()))
    assert s["same_index_rate"] == pytest.approx(5 / 6)  # the catch-all latent makes four values look matched
    assert s["exclusive_same_index_rate"] == pytest.approx(2 / 6)  # it counts once: size=medium, plus colour=red
    assert s["catch_all_latents"] == 1 and catch_all_latents(list(matches.values())) == [0]


def test_exclusivity_is_per_side_and_ties_go_to_the_first_value():
    img = {"a": np.array([0.9, 0.5]), "b": np.array([0.8, 0.5])}
    txt = {"a": np.array([0.6, 0.7]), "b": np.array([0.95, 0.5])}  # a owns 0 on images, b owns 0 on captions
    a, b = match_values(img, txt)
    assert a.image_exclusive and not b.image_exclusive and b.text_exclusive and not b.exclusive_same
    tie = {"a": np.array([0.9, 0.5]), "b": np.array([0.9, 0.5])}
    a, b = match_values(tie, tie)
    assert a.exclusive_same and not b.exclusive_same  # one owner per latent, even on a tie
    assert np.isnan(summarize_matches([])["exclusive_same_index_rate"])
    from evals.planted import ValueMatch
    assert ValueMatch("colour=red", 1, 0.95, 1, 0.92).exclusive_same  # a hand-made match has no rival


def test_latent_roles_label_each_card_with_its_own_value_or_as_catch_all():
    from evals.planted import LatentRole, latent_roles

    roles = latent_roles(match_values(*_catch_all_matrices()))
    assert set(roles) == {0, 1, 2, 3}
    assert roles[2].label() == "colour=red" and not roles[2].catch_all
    catch_all = roles[0]
    assert catch_all.catch_all and catch_all.exclusive_value == "size=medium"
    assert catch_all.values[0] == "size=medium" and set(catch_all.values) == {"size=medium", "shape=circle",
                                                                            "shape=square", "shape=star"}
    assert catch_all.label().startswith("size=medium (catch-all: also the best latent of shape=circle")
    assert roles[3].label() == "shape=ring (best latent on images only)"
    assert roles[1].label() == "shape=ring (best latent on captions only)"
    shared = LatentRole(5, ("shape=star", "shape=heart"), ("shape=heart",), None)
    assert shared.label() == "shared: the best latent of 2 values (shape=star, shape=heart)"
    pair = LatentRole(6, ("colour=white", "position=top left"), ("colour=white",), "colour=white")
    assert pair.label() == "colour=white (shared: also the best latent of position=top left)"
    three = LatentRole(7, ("a=1", "b=2", "c=3"), (), None)
    assert three.label() == "catch-all: the best latent of 3 values (a=1, b=2, c=3)"
