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
