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
