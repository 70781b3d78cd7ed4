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
