"""Planted-attribute probes: which latent separates each known concept value.

ShapesWorld plants attribute values (shape=star, colour=red, ...) in every pair.
For each value we score every latent by the AUROC of its activation for
"pair has this value" vs not, separately on images and on captions. A unified
concept set (VL-SAE's goal) shows up as the *same* latent index winning on both
sides. Captions only mention some attributes, so caption labels use the
mentioned values and image labels the planted ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata


def auroc_matrix(scores: torch.Tensor | np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """AUROC of every column of ``scores`` (rows, n_latents) for each boolean label (rows,).

    Uses the rank-sum (Mann-Whitney) form with tied ranks averaged, so a latent
    that never fires scores exactly 0.5. Labels with no positives or no
    negatives are skipped.
    """
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    ranks = rankdata(s, axis=0)
    out = {}
    for name, label in labels.items():
        label = np.asarray(label, dtype=bool)
        n_pos = int(label.sum())
        n_neg = label.shape[0] - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        rank_sum = ranks[label].sum(axis=0)
        out[name] = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


@dataclass
class ValueMatch:
    value: str
    image_latent: int
    image_auroc: float
    text_latent: int
    text_auroc: float

    @property
    def same(self) -> bool:
        return self.image_latent == self.text_latent

    @property
    def shared_and_separated(self) -> bool:
        """The VL-SAE target for one value: the same latent on both sides, AUROC >= 0.9 on each."""
        return self.same and min(self.image_auroc, self.text_auroc) >= 0.9


def match_values(image_auroc: dict[str, np.ndarray], text_auroc: dict[str, np.ndarray]) -> list[ValueMatch]:
    """For every value scored on both sides, the best latent per modality."""
    matches = []
    for value in sorted(set(image_auroc) & set(text_auroc)):
        i = int(np.argmax(image_auroc[value]))
        t = int(np.argmax(text_auroc[value]))
        matches.append(ValueMatch(value, i, float(image_auroc[value][i]), t, float(text_auroc[value][t])))
    return matches


def summarize_matches(matches: list[ValueMatch]) -> dict[str, float]:
    """same_index_rate, mean AUROCs and the fraction of values with both AUROCs >= 0.9."""
    if not matches:
        return {"values": 0, "same_index_rate": float("nan"), "image_auroc": float("nan"), "text_auroc": float("nan")}
    return {
        "values": len(matches),
        "same_index_rate": float(np.mean([m.same for m in matches])),
        "image_auroc": float(np.mean([m.image_auroc for m in matches])),
        "text_auroc": float(np.mean([m.text_auroc for m in matches])),
        "both_auroc_ge_0.9": float(np.mean([min(m.image_auroc, m.text_auroc) >= 0.9 for m in matches])),
    }


def summarize_by_attribute(matches: list[ValueMatch]) -> dict[str, dict[str, float]]:
    """:func:`summarize_matches` per attribute (the part of ``value`` before ``=``)."""
    groups: dict[str, list[ValueMatch]] = {}
    for m in matches:
        groups.setdefault(m.value.split("=", 1)[0], []).append(m)
    return {attr: summarize_matches(group) for attr, group in sorted(groups.items())}


def linear_probe_auroc(train_x: torch.Tensor, train_labels: dict[str, np.ndarray], test_x: torch.Tensor,
                       test_labels: dict[str, np.ndarray], l2: float = 1e-4, max_iter: int = 300) -> dict[str, float]:
    """Held-out AUROC of a supervised logistic-regression probe per label: the ceiling for any latent.

    A single SAE latent is one direction (or one nearest-concept test) read from
    the same activations, so it cannot separate a value better than a probe
    trained for it; values whose probe stays under a target show the *model*
    does not hold them, not that the SAE missed them. All labels are fitted
    jointly (one weight column each, full-batch L-BFGS on standardised inputs).
    """
    names = [n for n in sorted(test_labels) if n in train_labels and 0 < np.asarray(train_labels[n]).sum() < len(train_labels[n])]
    if not names:
        return {}
    x = train_x.detach().float().cpu()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = torch.tensor(np.stack([np.asarray(train_labels[n], dtype=np.float32) for n in names], axis=1))
    weight = torch.zeros(x.shape[1], len(names), requires_grad=True)
    bias = torch.zeros(len(names), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scores = ((test_x.detach().float().cpu() - mean) / std) @ weight + bias
    aurocs = auroc_matrix(scores, {n: test_labels[n] for n in names})
    return {n: float(aurocs[n][i]) for i, n in enumerate(names) if n in aurocs}


def class_mean_concepts(acts: dict[str, torch.Tensor], image_labels: dict[str, np.ndarray],
                        text_labels: dict[str, np.ndarray], image: str = "image", text: str = "text") -> tuple[list[str], torch.Tensor, dict[str, torch.Tensor]]:
    """One unit direction per planted value, shared by both modalities, from the labels (supervised).

    For each value and modality: the mean of the (modality-centred) activations
    that have it minus the mean of those that do not, normalised; the value's
    concept is the normalised sum of the image and the text direction. Set as
    the concept vectors of a ``vl`` SAE (with the modality means as decoder
    biases, which its encoder subtracts), this is the code the architecture
    would give if training had found one concept per planted value: the
    reference that tells the nearest-concept code's limits (what it cannot
    express even then) from the training objective's (what it does not find).
    Returns (value names, (values, width) directions, modality means).
    """
    rows = {m: acts[m].detach().float().cpu() for m in (image, text)}
    means = {m: x.mean(0) for m, x in rows.items()}
    centred = {m: rows[m] - means[m] for m in rows}
    names = [n for n in sorted(image_labels) if n in text_labels
             and all(0 < np.asarray(lab[n]).sum() < len(lab[n]) for lab in (image_labels, text_labels))]
    directions = []
    for name in names:
        total = torch.zeros_like(means[image])
        for modality, labels in ((image, image_labels), (text, text_labels)):
            x = centred[modality]
            has = torch.as_tensor(np.asarray(labels[name], dtype=bool))
            total += torch.nn.functional.normalize(x[has].mean(0) - x[~has].mean(0), dim=0)
        directions.append(torch.nn.functional.normalize(total, dim=0))
    width = means[image].numel()
    return names, (torch.stack(directions) if directions else torch.empty(0, width)), means


def class_mean_vl_sae(acts: dict[str, torch.Tensor], image_labels: dict[str, np.ndarray],
                      text_labels: dict[str, np.ndarray], k: int):
    """An untrained ``vl`` SAE whose concepts are :func:`class_mean_concepts` (decoders left random:
    only its codes are meant to be read)."""
    from vlsae import create_sae

    names, directions, means = class_mean_concepts(acts, image_labels, text_labels)
    if not names:
        raise ValueError("no planted value occurs in some but not all pairs of both modalities")
    sae = create_sae("vl", d_in=directions.shape[1], n_latents=len(names), k=min(k, len(names)))
    with torch.no_grad():
        sae.W_enc.copy_(directions)
        for modality, mean in means.items():
            sae.b_dec[modality].copy_(mean)
    return sae
