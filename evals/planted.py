"""Planted-attribute probes: which latent separates each known concept value.

ShapesWorld plants attribute values (shape=star, colour=red, ...) in every pair.
For each value we score every latent by the AUROC of its activation for
"pair has this value" vs not, separately on images and on captions. A unified
concept set (VL-SAE's goal) shows up as the *same* latent index winning on both
sides. Captions only mention some attributes, so caption labels use the
mentioned values and image labels the planted ones.

A latent that fires on most scenes can be the best latent of many values at
once (in the demo one latent was the best for eight of ten shapes), which
inflates the same-index rate. So each match also says whether its value *owns*
its latent (no value with a higher AUROC has the same best latent), and the
summaries give the exclusive rate beside the plain one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from vlsae.saes import create_sae


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
    """The best latent of one planted value on images and on captions.

    ``image_exclusive`` / ``text_exclusive`` say that no value with a higher
    AUROC on that side has the same best latent. A catch-all latent (one that
    fires on most scenes) can be the best latent of many values at once; only
    the strongest of them owns it, so it counts as one match, not many. A
    match built by hand, without the other values, is exclusive by default.
    """

    value: str
    image_latent: int
    image_auroc: float
    text_latent: int
    text_auroc: float
    image_exclusive: bool = True
    text_exclusive: bool = True

    @property
    def same(self) -> bool:
        return self.image_latent == self.text_latent

    @property
    def exclusive_same(self) -> bool:
        """The same latent on both sides and owned by this value on both: a same-index match that
        a catch-all latent cannot hand out to several values."""
        return self.same and self.image_exclusive and self.text_exclusive

    @property
    def shared_and_separated(self) -> bool:
        """The VL-SAE target for one value: the same latent on both sides, AUROC >= 0.9 on each."""
        return self.same and min(self.image_auroc, self.text_auroc) >= 0.9


def _owners(best: dict[str, tuple[int, float]]) -> dict[int, str]:
    """Per latent, the value that owns it: the highest AUROC among the values whose best latent it is
    (ties go to the value first in sorted order, so every latent has one owner)."""
    owners: dict[int, str] = {}
    for value in sorted(best):
        latent, auroc = best[value]
        if latent not in owners or auroc > best[owners[latent]][1]:
            owners[latent] = value
    return owners


def match_values(image_auroc: dict[str, np.ndarray], text_auroc: dict[str, np.ndarray]) -> list[ValueMatch]:
    """For every value scored on both sides, the best latent per modality and whether the value owns it."""
    values = sorted(set(image_auroc) & set(text_auroc))
    best = {}
    for side, aurocs in (("image", image_auroc), ("text", text_auroc)):
        best[side] = {v: (int(np.argmax(aurocs[v])), float(np.max(aurocs[v]))) for v in values}
    owners = {side: _owners(best[side]) for side in best}
    matches = []
    for v in values:
        (i, i_auroc), (t, t_auroc) = best["image"][v], best["text"][v]
        matches.append(ValueMatch(v, i, i_auroc, t, t_auroc, image_exclusive=owners["image"][i] == v,
                                  text_exclusive=owners["text"][t] == v))
    return matches


def catch_all_latents(matches: list[ValueMatch]) -> list[int]:
    """Latents that are the best latent of two or more of ``matches`` on images or on captions."""
    shared = set()
    for side in ("image_latent", "text_latent"):
        counts: dict[int, int] = {}
        for m in matches:
            counts[getattr(m, side)] = counts.get(getattr(m, side), 0) + 1
        shared |= {latent for latent, n in counts.items() if n > 1}
    return sorted(shared)


def summarize_matches(matches: list[ValueMatch]) -> dict[str, float]:
    """Headline figures of a set of matches, side by side: ``same_index_rate`` (the best latent is the
    same index on both sides) and ``exclusive_same_index_rate`` (and no stronger value has that latent
    as its best: what is left once catch-all latents count once); ``catch_all_latents`` (how many
    latents are the best latent of several of these values); mean AUROCs; the fraction of values
    with both AUROCs >= 0.9."""
    if not matches:
        return {"values": 0, "same_index_rate": float("nan"), "exclusive_same_index_rate": float("nan"),
                "catch_all_latents": 0, "image_auroc": float("nan"), "text_auroc": float("nan")}
    return {
        "values": len(matches),
        "same_index_rate": float(np.mean([m.same for m in matches])),
        "exclusive_same_index_rate": float(np.mean([m.exclusive_same for m in matches])),
        "catch_all_latents": len(catch_all_latents(matches)),
        "image_auroc": float(np.mean([m.image_auroc for m in matches])),
        "text_auroc": float(np.mean([m.text_auroc for m in matches])),
        "both_auroc_ge_0.9": float(np.mean([min(m.image_auroc, m.text_auroc) >= 0.9 for m in matches])),
    }


@dataclass(frozen=True)
class LatentRole:
    """What the planted values say about one latent, for labelling its concept card.

    image_values / text_values: the values whose best latent it is on that side, strongest first;
    exclusive_value: the value whose exclusive same-index match it is (at most one), else None.
    """

    latent: int
    image_values: tuple[str, ...]
    text_values: tuple[str, ...]
    exclusive_value: str | None

    @property
    def values(self) -> tuple[str, ...]:
        """Every value that has this latent as its best on some side; the exclusive one first."""
        seen = [self.exclusive_value] if self.exclusive_value else []
        for v in self.image_values + self.text_values:
            if v not in seen:
                seen.append(v)
        return tuple(seen)

    @property
    def catch_all(self) -> bool:
        return len(self.values) > 1

    def label(self) -> str:
        """One line for the card: the value this latent stands for, or that it stands for several
        ("shared" by two values, "catch-all" from three on), so a card never names just one of them."""
        values = self.values
        kind = "catch-all" if len(values) > 2 else "shared"
        if self.exclusive_value and not self.catch_all:
            return self.exclusive_value
        if self.exclusive_value:
            return f"{self.exclusive_value} ({kind}: also the best latent of {', '.join(values[1:])})"
        if self.catch_all:
            return f"{kind}: the best latent of {len(values)} values ({', '.join(values)})"
        side = "images" if self.image_values else "captions"
        return f"{values[0]} (best latent on {side} only)"


def latent_roles(matches: list[ValueMatch]) -> dict[int, LatentRole]:
    """Per latent that is some value's best latent on some side, its :class:`LatentRole`."""
    by_side: dict[str, dict[int, list[ValueMatch]]] = {"image": {}, "text": {}}
    exclusive: dict[int, str] = {}
    for m in matches:
        by_side["image"].setdefault(m.image_latent, []).append(m)
        by_side["text"].setdefault(m.text_latent, []).append(m)
        if m.exclusive_same:
            exclusive[m.image_latent] = m.value
    roles = {}
    for latent in sorted(set(by_side["image"]) | set(by_side["text"])):
        image = sorted(by_side["image"].get(latent, []), key=lambda m: -m.image_auroc)
        text = sorted(by_side["text"].get(latent, []), key=lambda m: -m.text_auroc)
        roles[latent] = LatentRole(latent, tuple(m.value for m in image), tuple(m.value for m in text),
                                   exclusive.get(latent))
    return roles


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

    names, directions, means = class_mean_concepts(acts, image_labels, text_labels)
    if not names:
        raise ValueError("no planted value occurs in some but not all pairs of both modalities")
    sae = create_sae("vl", d_in=directions.shape[1], n_latents=len(names), k=min(k, len(names)))
    with torch.no_grad():
        sae.W_enc.copy_(directions)
        for modality, mean in means.items():
            sae.b_dec[modality].copy_(mean)
    return sae
