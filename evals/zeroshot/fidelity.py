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
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from multimodal.adapters import Adapter, create_adapter
from multimodal.pairs import DEFAULT_MAX_SKIPPED
from multimodal.shapesworld import vocabulary
from multimodal.zoo.shapes_clip import ZERO_SHOT_ATTRIBUTES
from vlsae.checkpoint import load_sae, read_config
from vlsae.errors import VlsaeError

from evals.zeroshot.concept import check_sae, reconstruct
from evals.zeroshot.data import cached_images, extracted_images, read_labels, record_labels
from evals.zeroshot.head import TEXT_HOOK, ZeroShotHead, shapesworld_head

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


def spliced_modalities(sae: Any, sae_path: str | Path | None = None) -> tuple[str, ...]:
    """What the SAE reconstructs: its modalities (a VL-SAE: image and text), else the one modality a
    single-stream run was trained on (``data.modality`` in its config metadata; image when unknown)."""
    own = tuple(m for m in (getattr(sae, "modalities", ()) or ()) if m in ("image", "text"))
    if own:
        return own
    modality = None
    if sae_path is not None:
        try:
            modality = ((read_config(sae_path).get("metadata") or {}).get("data") or {}).get("modality")
        except VlsaeError:
            modality = None
    return (modality,) if modality in ("image", "text") else ("image",)


def fidelity_from_pairs(adapter: Adapter, sae: Any, metas: Sequence[dict[str, Any]], image: Tensor,
                        modalities: Sequence[str] = ("image", "text"), min_records: int = 20,
                        head: ZeroShotHead | None = None) -> dict[str, Any] | None:
    """Spliced zero-shot accuracy on the single-object ShapesWorld records among ``metas`` (rows of
    ``image`` aligned with them): what the concept report shows. None when the model has no text
    embedding or fewer than ``min_records`` records have one object (nothing to classify)."""
    if TEXT_HOOK not in adapter.hook_points():
        return None
    rows, labels = [], {a: [] for a in ZERO_SHOT_ATTRIBUTES}
    classes = {a: list(vocabulary()[a]) for a in ZERO_SHOT_ATTRIBUTES}
    for i, meta in enumerate(metas):
        if not isinstance(meta.get("objects"), list):
            continue
        try:
            row = record_labels(str(i), meta, classes)
        except VlsaeError:
            continue  # a record outside the vocabulary has no ShapesWorld label
        if row is not None:
            rows.append(i)
            for attribute, index in row.items():
                labels[attribute].append(index)
    if len(rows) < min_records:
        return None
    head = head or shapesworld_head(adapter)
    picked = image[torch.tensor(rows, dtype=torch.long)]
    result = spliced_accuracy(head, sae, picked, {a: torch.tensor(v) for a, v in labels.items()}, modalities)
    return {"attributes": result, "records": len(rows), "mean_recovered": mean_recovered(result, "both")
            if "text" in modalities and "image" in modalities else mean_recovered(result, modalities[0])}


def fidelity_of_run(sae_path: str | Path, model: str, data: str, acts: str | None = None, limit: int | None = None,
                    device: str = "auto", max_skipped: float = DEFAULT_MAX_SKIPPED) -> dict[str, Any]:
    """``vlsae info RUN --zeroshot DATA --model SPEC``: the run's spliced zero-shot accuracy on the
    single-object ShapesWorld records of ``data`` (image embeddings from ``acts`` or extracted)."""
    sae = load_sae(sae_path).eval()
    adapter = create_adapter(model, device=device)
    head = shapesworld_head(adapter)
    check_sae(sae, head.d, model)
    keys, labels, left_out = read_labels(data, head.classes, max_skipped=max_skipped, limit=limit)
    image = cached_images(acts, keys, model) if acts else extracted_images(adapter, data, keys, max_skipped=max_skipped)
    modalities = spliced_modalities(sae, sae_path)
    result = spliced_accuracy(head, sae, image, labels, modalities)
    key = "both" if len(modalities) == 2 else modalities[0]
    return {"attributes": result, "records": len(keys), "left_out": left_out, "spliced": list(modalities),
            "mean_recovered": mean_recovered(result, key), "model": model, "data": data}
