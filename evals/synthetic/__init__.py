"""Planted-feature synthetic suite: activations with known features, to score what an SAE recovers.

    from evals.synthetic import generate, list_suites, score_sae, run_suite
    data = generate("hierarchical", seed=0, n_train=50_000, n_test=10_000, preset="A")
    scores = score_sae(trained_sae, data)          # every metric of the suite
    rows = run_suite("hierarchical", ["topk", "mp"])  # train, score, print, (write JSON)

Generators with ground truth (:mod:`.generators`), metrics on plain tensors
(:mod:`.metrics`), scoring of any registered SAE (:mod:`.score`) and the
leaderboard runner behind ``vlsae synth`` (:mod:`.leaderboard`).
"""
from evals.synthetic.generators import PlantedData, generate, list_presets, list_suites
from evals.synthetic.leaderboard import run_suite
from evals.synthetic.score import score_planted, score_sae

__all__ = ["PlantedData", "generate", "list_presets", "list_suites", "run_suite", "score_planted", "score_sae"]
