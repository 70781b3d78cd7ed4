"""The OOD evaluator against hand-computed values (with ties), scikit-learn, and its bootstrap."""
import numpy as np
import pytest

from evals.ood.metrics import METRICS, compare_auroc, evaluate, grouped_metrics, ood_metrics, score_levels
from vlsae.errors import VlsaeError

# ID [3, 2, 2, 1] against OOD [2, 1, 0]: ties at 2 and at 1 across the classes.
ID = np.array([3.0, 2.0, 2.0, 1.0])
OOD = np.array([2.0, 1.0, 0.0])
HAND = {
    # pairs won by ID: 3 beats all 3; each 2 beats 1 and 0 and ties 2 (2.5); 1 beats 0 and ties 1 (1.5): 9.5 of 12
    "auroc": 9.5 / 12,
    # keeping all 4 ID (95 % of 4 needs 4) takes threshold 1, which accepts OOD 2 and 1
    "fpr95": 2 / 3,
    # catching all 3 OOD takes "score <= 2", which flags ID 2, 2, 1
    "fpr95_ood": 3 / 4,
    # precision at each ID sample's own threshold: 1/1, 3/4, 3/4, 4/6
    "aupr_in": (1 + 0.75 + 0.75 + 4 / 6) / 4,
    # precision at each OOD sample's own threshold (score <= t): 1/1, 2/3, 3/6
    "aupr_out": (1 + 2 / 3 + 0.5) / 3,
}


def test_point_metrics_match_the_hand_computed_values_with_ties():
    got = ood_metrics(ID, OOD)
    for name in METRICS:
        assert got[name] == pytest.approx(HAND[name]), name


def test_grouped_statistic_matches_the_hand_values_and_sklearn_on_tied_data():
    id_levels, ood_levels, n = score_levels(ID, OOD)
    grouped = grouped_metrics(id_levels[None], ood_levels[None], n)[:, 0]
    assert grouped == pytest.approx([HAND[m] for m in METRICS])
    rng = np.random.default_rng(0)
    for _ in range(200):  # small integer scores: ties everywhere, including all-equal sets
        a = rng.integers(0, 5, rng.integers(1, 25)).astype(float)
        b = rng.integers(0, 5, rng.integers(1, 25)).astype(float) - rng.integers(0, 2)
        i, o, levels = score_levels(a, b)
        reference = ood_metrics(a, b)
        assert grouped_metrics(i[None], o[None], levels)[:, 0] == pytest.approx([reference[m] for m in METRICS])


def test_direction_and_perfect_separation():
    assert ood_metrics([5, 6, 7], [1, 2])["auroc"] == 1.0
    assert ood_metrics([1, 2], [5, 6, 7])["auroc"] == 0.0
    assert ood_metrics([5, 6, 7], [1, 2])["fpr95"] == 0.0
    assert ood_metrics([1, 1, 1], [1, 1])["auroc"] == 0.5  # all tied: chance
    swapped = ood_metrics(OOD, ID)
    assert swapped["auroc"] == pytest.approx(1 - HAND["auroc"])


def test_bootstrap_intervals_hold_the_estimate_shrink_with_n_and_repeat_by_seed():
    rng = np.random.default_rng(1)
    small = evaluate(rng.normal(1, 1, 100), rng.normal(0, 1, 80), n_resamples=400, seed=3)
    large = evaluate(rng.normal(1, 1, 2000), rng.normal(0, 1, 1600), n_resamples=400, seed=3)
    for result in (small, large):
        for name in METRICS:
            low, high = result[f"{name}_ci"]
            assert low <= result[name] + 1e-9 and result[name] - 1e-9 <= high
    width = lambda r: r["auroc_ci"][1] - r["auroc_ci"][0]  # noqa: E731
    assert width(large) < width(small) / 2
    assert 0.70 < large["auroc"] < 0.82  # two unit Gaussians one sd apart: AUROC = Phi(1 / sqrt 2) = 0.76
    again = evaluate(*[np.asarray(v) for v in (np.arange(50.0), np.arange(40.0) - 5)], n_resamples=200, seed=7)
    assert again == evaluate(np.arange(50.0), np.arange(40.0) - 5, n_resamples=200, seed=7)
    assert "auroc_ci" not in evaluate(ID, OOD, n_resamples=0)


def test_paired_difference_is_a_tie_for_equal_scores_and_positive_for_a_better_one():
    rng = np.random.default_rng(2)
    id_x, ood_x = rng.normal(0, 1, 300), rng.normal(0, 1, 300)
    good = (id_x + 3, ood_x)       # separates well
    weak = (id_x + 0.3, ood_x)     # barely
    same = compare_auroc(good, good, n_resamples=200)
    assert same["delta"] == 0 and same["delta_ci"] == [0.0, 0.0]
    ahead = compare_auroc(good, weak, n_resamples=200)
    assert ahead["delta"] > 0.3 and ahead["delta_ci"][0] > 0


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(VlsaeError, match="ID and OOD"):
        ood_metrics([], [1.0])
    with pytest.raises(VlsaeError, match="NaN"):
        evaluate([1.0, float("nan")], [0.0])
