"""The pair scorers of ``vlsae filter``: one registry, higher score = keep.

=============  ==========  ===================================================================
name           needs       score of a pair
=============  ==========  ===================================================================
``saev``       SAE, probe  SAE-V: Σ w_f over the latents active on both the image's and the
                           caption's tokens; w_f = mean cosine of f's top-5 text and top-5 image
                           tokens among its top-30 activations (latents lacking 5 of each: none)
``vl-overlap`` SAE         cosine of the image's and the caption's pooled codes
``vl-jaccard`` SAE         |A ∩ B| / |A ∪ B| of the active latent sets of image and caption
``l0``         SAE         mean active latents per row of the pair (SAE-V's L0 ranker)
``cooc-l0``    SAE         number of latents active on both sides (SAE-V's co-occurring L0)
``clipscore``  model       cosine of the raw image and caption embeddings (no SAE)
``random``     nothing     a seeded uniform number per key (the same whatever the sharding)
=============  ==========  ===================================================================

Adding a scorer is one module in this package with a :class:`Scorer`
subclass decorated by ``@register_scorer("name")``.
"""
from __future__ import annotations

from typing import Callable

from vlsae.registry import Registry

from multimodal.filtering.scorers.base import PairBatch, ProbeBatches, Scorer

SCORERS: Registry[type[Scorer]] = Registry("filter scorer", packages=[__name__])


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make a scorer usable as ``vlsae filter --scorer name``."""
    return SCORERS.register(name)


def list_scorers() -> list[str]:
    return SCORERS.names()


def get_scorer(name: str) -> type[Scorer]:
    """The scorer class registered as ``name`` (a one-line error naming the valid ones otherwise)."""
    return SCORERS.get(name)


def create_scorer(name: str, seed: int = 0) -> Scorer:
    return get_scorer(name)(seed=seed)


__all__ = ["SCORERS", "PairBatch", "ProbeBatches", "Scorer", "create_scorer", "get_scorer", "list_scorers",
           "register_scorer"]
