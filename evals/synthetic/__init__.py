"""Planted-feature synthetic suite: seeded generators with ground truth, metrics
that score a trained SAE against it, and a leaderboard runner (variants.md §14)."""
from evals.synthetic.generators import PlantedData, generate, list_presets, list_suites

__all__ = ["PlantedData", "generate", "list_presets", "list_suites"]
