"""OOD scores that read the SAE (kind ``sae``); every one is "higher = more in-distribution".

- ``recon``: minus the normalised reconstruction error ||x - x_hat||^2 / ||x||^2: an input
  off the learned dictionary reconstructs badly.
- ``concept-energy``: the sum of the active latents' values. For ``vl`` that is VL-SAE's
  nearest-concept energy, sum over the k nearest concepts of s_i = 2 - ||x_hat - w_i||
  (how close the input lies to its nearest learned concept directions, the learned-prototype
  analogue of KNN); for a linear-encoder SAE, the sum of its top-k activations.
- ``code-knn``: minus the distance from the unit sparse code to its k-th nearest unit fit code
  (Sun et al.'s KNN, in code space).
- ``cap``: the class activation profile rank score: Spearman's rho between the sample's code
  and the mean code of the fit rows of its zero-shot predicted class.
- ``concept-mcm``: MCM on concept-mixed prompt logits, ((1 - lam) cos(x, t) + lam cos(z(x), z(t))) / T,
  with z the SAE code (image side for x, text side for the prompt's raw embedding t; one encoder
  for a single-stream SAE): VL-SAE's concept-level alignment, the zero-shot enhancement of
  :mod:`evals.zeroshot.concept`, applied to OOD. lam = 0 is ``mcm`` exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vlsae.sparse import SparseCode

from evals.ood.context import CHUNK, Features, Reference, kth_nearest_code_similarity
from evals.ood.scores import register_score
from evals.ood.scores.baselines import max_class_probability
from evals.zeroshot.concept import mix


@register_score("recon", kind="sae", summary="minus the SAE's normalised reconstruction error")
def recon(ref: Reference, feats: Features) -> Tensor:
    return -feats.recon_error


@register_score("concept-energy", kind="sae",
                summary="sum of the active concepts' values (vl: similarity to the k nearest concept directions)")
def concept_energy(ref: Reference, feats: Features) -> Tensor:
    return feats.code.values.float().sum(dim=1)


@register_score("code-knn", kind="sae", summary="minus the distance to the k-th nearest fit code (unit sparse codes)")
def code_knn(ref: Reference, feats: Features) -> Tensor:
    similarity = kth_nearest_code_similarity(feats.code, ref.code_bank, ref.settings.k)
    return -torch.sqrt((2 - 2 * similarity).clamp_min(0))


def _rank_rows(values: np.ndarray) -> np.ndarray:
    """Average ranks along each row (ties share their mean rank), centred and unit-normalised per row,
    so the dot product of two such rows is Spearman's rho."""
    from scipy.stats import rankdata

    ranks = rankdata(values, axis=1)
    ranks -= ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(ranks, axis=1, keepdims=True)
    return np.divide(ranks, norms, out=np.zeros_like(ranks), where=norms > 0)


@register_score("cap", kind="sae", needs=("head",),
                summary="Spearman of the code with its predicted class's mean fit code (class activation profile)")
def cap(ref: Reference, feats: Features) -> Tensor:
    profiles = _rank_rows(ref.profiles.numpy().astype(np.float64))
    predicted = feats.predicted.numpy()
    code = feats.code
    out = []
    for i in range(0, len(code), CHUNK):
        block = SparseCode(code.values[i:i + CHUNK].float(), code.indices[i:i + CHUNK], code.n_latents).to_dense()
        ranks = _rank_rows(block.numpy().astype(np.float64))
        out.append((ranks * profiles[predicted[i:i + CHUNK]]).sum(axis=1))
    return torch.from_numpy(np.concatenate(out)).float()


@register_score("concept-mcm", kind="sae", needs=("head",),
                summary="MCM on (1 - lam) image-prompt cosine + lam code-code cosine (VL-SAE concept alignment)")
def concept_mcm(ref: Reference, feats: Features) -> Tensor:
    concept = feats.unit_dense_code @ ref.matcher.text_code.T  # (n, n_prompts) cos(z(x), z(t))
    return max_class_probability(ref, mix(feats.cosines, concept, ref.settings.lam) / ref.settings.temperature)
