"""Downstream fidelity of an SAE on a CLIP: zero-shot accuracy with its reconstructions spliced in.

FVU says how much of an embedding's variance the SAE misses, not whether what
it misses matters. For a CLIP source the downstream use is zero-shot
classification, so this is the vision-language analogue of a language SAE's
"loss recovered": the plain head's accuracy when the image embeddings are
replaced by their reconstructions through the image decoder, when the prompt
embeddings are replaced by theirs through the text decoder, and both, against
the zero-ablated floor (an all-zero image embedding: every prompt gets the same
logit, so one constant prediction). ``recovered = (spliced - floor) /
(plain - floor)``: 1 is a reconstruction that loses nothing zero-shot needs.

A single-stream SAE trained on one modality splices that modality only.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from evals.zeroshot.concept import check_sae, reconstruct
from evals.zeroshot.head import ZeroShotHead

SPLICES = ("image", "text", "both")


def _accuracy(head: ZeroShotHead, image: Tensor, attribute: str, truth: Tensor, chunk: int = 2048) -> float:
    predicted = torch.cat([head.predict(image[i: i + chunk], attribute) for i in range(0, image.shape[0], chunk)])
    return float((predicted == truth).float().mean())


def _recovered(value: float, plain: float, floor: float) -> float | None:
    return (value - floor) / (plain - floor) if plain - floor > 1e-9 else None


@torch.no_grad()
def spliced_accuracy(head: ZeroShotHead, sae: Any, image: Tensor, labels: dict[str, Tensor],
                     modalities: Sequence[str] = ("image", "text")) -> dict[str, Any]:
    """attribute -> {plain, image, text, both, floor, recovered_image, recovered_text, recovered_both, n}.

    head: the plain zero-shot head (``head.raw`` must be set for the text splice); image: (n, d) raw
    image embeddings; labels: attribute -> (n,) class indices. Entries of a modality the SAE does not
    reconstruct (``modalities``) are None.
    """
    check_sae(sae, head.d)
    spliced_image = reconstruct(sae, image.float(), "image") if "image" in modalities else None
    spliced_head = None
    if "text" in modalities and head.raw is not None:
        raw = reconstruct(sae, head.raw.float(), "text")
        spliced_head = replace(head, text=F.normalize(raw, dim=-1), raw=raw)
    zero = torch.zeros(1, head.d)
    out: dict[str, Any] = {}
    for attribute in head.attributes:
        truth = labels[attribute]
        plain = _accuracy(head, image, attribute, truth)
        floor = float((head.predict(zero, attribute).expand_as(truth) == truth).float().mean())
        row: dict[str, Any] = {"plain": plain, "floor": floor, "n": int(truth.numel())}
        row["image"] = _accuracy(head, spliced_image, attribute, truth) if spliced_image is not None else None
        row["text"] = _accuracy(spliced_head, image, attribute, truth) if spliced_head is not None else None
        row["both"] = (_accuracy(spliced_head, spliced_image, attribute, truth)
                       if spliced_head is not None and spliced_image is not None else None)
        for splice in SPLICES:
            row[f"recovered_{splice}"] = None if row[splice] is None else _recovered(row[splice], plain, floor)
        out[attribute] = row
    return out


def mean_recovered(result: dict[str, Any], splice: str = "both") -> float | None:
    """The mean over attributes of ``recovered_<splice>`` (None when no attribute has it)."""
    values = [r[f"recovered_{splice}"] for r in result.values() if r.get(f"recovered_{splice}") is not None]
    return sum(values) / len(values) if values else None


def describe_fidelity(result: dict[str, Any]) -> list[str]:
    """One line per attribute: plain -> spliced accuracies (points) and the floor."""
    def pct(value: float | None) -> str:
        return "  n/a" if value is None else f"{100 * value:5.1f}"

    lines = []
    for attribute, r in result.items():
        lines.append(f"{attribute:<9} plain {pct(r['plain'])}  image {pct(r['image'])}  text {pct(r['text'])}  "
                     f"both {pct(r['both'])}  (zero-ablated {pct(r['floor'])}, n={r['n']})")
    return lines
