"""Representation similarity: ITDA Jaccard, linear CKA, layer matching (``vlsae similarity``).

    from evals.similarity import compare, jaccard, linear_cka, layer_matching
    result = compare(["acts/a-layer0", "acts/a-layer1"], ["acts/b-layer0", "acts/b-layer1"])
    result["jaccard"], result["cka"], result["layer_matching"]
"""
from evals.similarity.compare import ITDASettings, build_itda, compare
from evals.similarity.measures import jaccard, layer_matching, linear_cka

__all__ = ["ITDASettings", "build_itda", "compare", "jaccard", "layer_matching", "linear_cka"]
