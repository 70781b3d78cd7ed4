"""OOD baselines on the raw embedding, no SAE (kind ``baseline``); every one is "higher = more in-distribution".

- ``msp``: the zero-shot classifier's maximum class probability (Hendrycks & Gimpel 2017):
  softmax over the prompts at the model's logit scale, summed per class.
- ``mcm``: maximum concept matching (Ming et al. 2022): the same with the softmax taken over
  cosines at temperature T (default 1), which keeps the softmax from saturating.
- ``energy``: the free energy of the zero-shot logits, logsumexp over the prompts (Liu et al. 2020).
- ``knn``: minus the distance from the unit embedding to its k-th nearest unit fit embedding
  (Sun et al. 2022).
- ``mahalanobis``: minus the smallest Mahalanobis distance to a class mean of the unit fit
  embeddings, one covariance shared by the classes (Lee et al. 2018); classes are the
  zero-shot predictions on the fit rows.
- ``mahalanobis-1``: the one-class version: one mean, one covariance.

On ShapesWorld the prompts are every single-object description the vocabulary can say and a
class is an attribute value (the head's protocol), so a class's probability is the mass of the
prompts naming it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from evals.ood.context import Features, Reference, kth_nearest_similarity
from evals.ood.scores import register_score


def max_class_probability(ref: Reference, prompt_logits: Tensor) -> Tensor:
    """(n,) the largest class probability of the softmax over ``prompt_logits`` (n, n_prompts),
    marginalised per class of the conditioning attribute."""
    return ref.head.class_log_probs(None, ref.attribute, prompt_logits=prompt_logits).max(dim=1).values.exp()


@register_score("msp", kind="baseline", needs=("head",), summary="maximum zero-shot class probability (logit scale)")
def msp(ref: Reference, feats: Features) -> Tensor:
    return feats.class_log_probs.max(dim=1).values.exp()


@register_score("mcm", kind="baseline", needs=("head",), summary="maximum concept matching: softmax of cosines / T")
def mcm(ref: Reference, feats: Features) -> Tensor:
    return max_class_probability(ref, feats.cosines / ref.settings.temperature)


@register_score("energy", kind="baseline", needs=("head",), summary="logsumexp of the zero-shot prompt logits")
def energy(ref: Reference, feats: Features) -> Tensor:
    return torch.logsumexp(feats.prompt_logits, dim=1)


@register_score("knn", kind="baseline", summary="minus the distance to the k-th nearest fit embedding (unit vectors)")
def knn(ref: Reference, feats: Features) -> Tensor:
    similarity = kth_nearest_similarity(feats.unit, ref.embedding_bank, ref.settings.k)
    return -torch.sqrt((2 - 2 * similarity).clamp_min(0))


def _squared_distances(x: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """(n, n_means) (x - mu)^T P (x - mu) = x'Px - 2 x'P mu + mu'P mu, without an (n, n_means, d) tensor."""
    xp = x @ precision
    mp = means @ precision
    return (xp * x).sum(1, keepdim=True) - 2 * xp @ means.T + (mp * means).sum(1)[None]


@register_score("mahalanobis", kind="baseline", needs=("head",),
                summary="minus the Mahalanobis distance to the nearest predicted-class mean (shared covariance)")
def mahalanobis(ref: Reference, feats: Features) -> Tensor:
    return -_squared_distances(feats.unit, ref.class_means, ref.class_precision).min(dim=1).values


@register_score("mahalanobis-1", kind="baseline", summary="minus the Mahalanobis distance to the fit mean (one class)")
def mahalanobis_one_class(ref: Reference, feats: Features) -> Tensor:
    return -_squared_distances(feats.unit, ref.global_mean[None], ref.global_precision)[:, 0]
