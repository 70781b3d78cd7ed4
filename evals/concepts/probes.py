"""Planted-concept probes of a report: which latent stands for each ShapesWorld value, and how well
any probe could do.

The labels come from the pairs' ShapesWorld metadata; the scoring (AUROC per
latent, best and exclusive matches, catch-all latents) is
:mod:`evals.planted`'s. The probe ceiling is a logistic probe on the model's
activations themselves, so a value the *model* does not separate is not
blamed on the SAE.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evals.concepts.pairs import PairActivations
from evals.planted import (
    auroc_matrix,
    latent_roles,
    linear_probe_auroc,
    match_values,
    summarize_matches,
)
from vlsae.concepts import latent_activations

ATTRIBUTES = ("shape", "colour", "size", "position")


def planted_labels(metas: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per attribute value (``attr=value``), boolean labels over the pairs: (image labels: planted
    somewhere in the scene; caption labels: planted and mentioned, in an uncorrupted caption)."""
    values: set[str] = set()
    for meta in metas:
        for obj in meta.get("objects", []):
            for attr in ATTRIBUTES:
                values.add(f"{attr}={obj[attr]}")
    image: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    for name in sorted(values):
        attr, value = name.split("=", 1)
        image[name] = np.array([any(o[attr] == value for o in m.get("objects", [])) for m in metas])
        text[name] = np.array([any(o[attr] == value and attr in o.get("mentioned", []) for o in m.get("objects", []))
                               and not m.get("corrupted", False) for m in metas])
    return image, text


def planted_probe(sae: Any, pairs: PairActivations, image_modality: str = "image", text_modality: str = "text",
                  ceiling: bool = False) -> dict[str, Any]:
    """Best latent per planted value on images and on captions, how often they coincide (plainly and
    exclusively), and each latent's role; with ``ceiling``, also each value's probe ceiling
    (:func:`two_fold_probe_ceiling`) and the counts of encodable values. Empty without planted metadata."""
    image_labels, text_labels = planted_labels(pairs.metas)
    if not image_labels:
        return {}
    image_auroc = auroc_matrix(latent_activations(sae, pairs.acts[image_modality], image_modality), image_labels)
    text_auroc = auroc_matrix(latent_activations(sae, pairs.acts[text_modality], text_modality), text_labels)
    matches = match_values(image_auroc, text_auroc)
    probe: dict[str, Any] = {"matches": matches, "summary": summarize_matches(matches), "roles": latent_roles(matches),
                             "image_auroc": image_auroc, "text_auroc": text_auroc}
    if ceiling:
        ceilings = {"image": two_fold_probe_ceiling(pairs.acts[image_modality], image_labels),
                    "text": two_fold_probe_ceiling(pairs.acts[text_modality], text_labels)}
        encodable = [m for m in matches
                     if min(ceilings["image"].get(m.value, 0.0), ceilings["text"].get(m.value, 0.0)) >= 0.9]
        probe["summary"]["encodable_values"] = len(encodable)
        probe["summary"]["encodable_same_and_both_ge_0.9"] = sum(m.shared_and_separated for m in encodable)
        probe["ceiling"] = ceilings
    return probe


def two_fold_probe_ceiling(acts: torch.Tensor, labels: dict[str, np.ndarray], max_pairs: int = 8000) -> dict[str, float]:
    """Per value, the held-out AUROC of a logistic probe on the activations themselves (fit on even
    pairs, scored on odd ones): what no single latent can beat. A value under 0.9 here is one the
    *model* does not hold well, whatever the SAE does. At most ``max_pairs`` evenly spaced pairs are
    used, so a large report does not spend minutes on its reference."""
    n = acts.shape[0]
    if n < 8:
        return {}
    used = torch.linspace(0, n - 1, min(n, max_pairs)).round().long().unique()
    even, odd = used[0::2], used[1::2]
    return linear_probe_auroc(acts[even], {k: v[even.numpy()] for k, v in labels.items()},
                              acts[odd], {k: v[odd.numpy()] for k, v in labels.items()})
