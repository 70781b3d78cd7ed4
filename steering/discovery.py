"""Attribute discovery: which SAE latents stand for each value of an attribute, found automatically.

Two rankings, as the seed paper's "automated pipeline for discovering
human-interpretable attributes" asks:

1. **selectivity** (SAeUron, Cywinski & Deja 2025): for value c,
   importance(f) = mu_c(f) / sum_g mu_c(g) - mu_not_c(f) / sum_g mu_not_c(g),
   the latent's mean activation on prompts naming c, normalised over latents,
   minus the same on the other prompts. Cheap: one text-encoder pass per prompt.
2. **flips**: steer neutral prompts (ones that do not name the value) with the
   candidate latent added (:class:`~steering.interventions.Add`), generate, and
   count how often a judge reads the value in the images. The evidence that
   the latent *causes* the value, not just co-occurs with its word.

Each discovered latent is named by its top prompts (those it fires on most).
The statistics come from :func:`latent_stats` over a prompt set; the same
statistics give a latent's usual activation (:func:`typical_activation`), the
unit steering strengths are measured in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from steering.hooks import steered_generate
from steering.interventions import Add
from steering.points import HookedSAE, position_mask
from steering.prompts import attribute_values, check_value, names_value

#: images -> the judge's reading of one attribute per image
Reader = Callable[[Tensor], list[Any]]


@dataclass
class LatentStats:
    """Per-prompt latent statistics of one SAE over a prompt set, at its hook point.

    ``mean``: (prompts, latents) mean activation over the prompt's token
    positions (padding included: the UNet attends to it too); ``active_sum``
    and ``active_count``: sum and count of the non-zero activations, for a
    latent's usual value where it fires.
    """

    prompts: list[str]
    mean: Tensor
    active_sum: Tensor
    active_count: Tensor

    @property
    def n_latents(self) -> int:
        return int(self.mean.shape[1])

    def named(self, value: str) -> Tensor:
        """(prompts,) bool: which prompts name ``value``."""
        return torch.tensor([names_value(p, value) for p in self.prompts], dtype=torch.bool)


@torch.no_grad()
def latent_stats(hooked: HookedSAE, prompts: Sequence[str], positions: str = "all", batch_size: int = 128) -> LatentStats:
    """:class:`LatentStats` of ``hooked``'s SAE on ``prompts`` (tokenised as the pipeline does)."""
    prompts = list(prompts)
    if not prompts:
        raise VlsaeError("latent statistics need at least one prompt")
    means, sums, counts = [], [], []
    for start in range(0, len(prompts), batch_size):
        states, ids = hooked.hidden_states(prompts[start: start + batch_size])
        mask = position_mask(ids, hooked.eos_id, positions)
        rows, context, width = states.shape
        dense = hooked.encode(states.reshape(-1, width)).to_dense().reshape(rows, context, -1).float()
        dense = dense * mask.unsqueeze(-1)
        tokens = mask.sum(dim=1, keepdim=True).clamp_min(1)
        means.append(dense.sum(dim=1) / tokens)
        sums.append(dense.clamp_min(0).sum(dim=1))
        counts.append((dense > 0).sum(dim=1).float())
    return LatentStats(prompts, torch.cat(means), torch.cat(sums), torch.cat(counts))


def selectivity(stats: LatentStats, named: Tensor) -> Tensor:
    """(latents,) SAeUron's importance of each latent for the prompts ``named`` against the rest."""
    if not bool(named.any()) or bool(named.all()):
        raise VlsaeError("selectivity needs prompts that name the value and prompts that do not")
    inside, outside = stats.mean[named].mean(dim=0), stats.mean[~named].mean(dim=0)
    return inside / inside.sum().clamp_min(1e-12) - outside / outside.sum().clamp_min(1e-12)


def typical_activation(stats: LatentStats, latents: Sequence[int], named: Tensor | None = None) -> list[float]:
    """Each latent's mean non-zero activation on the prompts ``named`` (default all); 1 where it never fires."""
    rows = named if named is not None else torch.ones(len(stats.prompts), dtype=torch.bool)
    out = []
    for f in latents:
        count = float(stats.active_count[rows, f].sum())
        out.append(float(stats.active_sum[rows, f].sum()) / count if count > 0 else 1.0)
    return out


def top_prompts(stats: LatentStats, latent: int, n: int = 3) -> list[str]:
    """The ``n`` prompts ``latent`` fires on most (its name)."""
    order = torch.argsort(stats.mean[:, latent], descending=True)[:n]
    return [stats.prompts[int(i)] for i in order if float(stats.mean[int(i), latent]) > 0]


@dataclass
class ValueLatents:
    """The latents standing for one attribute value: indices, selectivity, usual activation, names."""

    attribute: str
    value: str
    latents: list[int]
    selectivity: list[float]
    scale: list[float]
    names: list[list[str]] = field(default_factory=list)
    flip_rate: list[float | None] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"attribute": self.attribute, "value": self.value,
                "latents": [{"latent": f, "selectivity": round(s, 5), "scale": round(a, 4), "top_prompts": n,
                             "flip_rate": None if r is None else round(r, 4)}
                            for f, s, a, n, r in zip(self.latents, self.selectivity, self.scale, self.names,
                                                     self.flip_rate or [None] * len(self.latents))]}


def value_latents(stats: LatentStats, attribute: str, value: str, n: int = 3) -> ValueLatents:
    """The ``n`` latents most selective for ``value`` (by :func:`selectivity`), with their usual activation
    on prompts naming it and their top prompts."""
    check_value(attribute, value)
    named = stats.named(value)
    if not bool(named.any()):
        raise VlsaeError(f"no prompt of the prompt set names '{value}'; give prompts that do (--prompts FILE)")
    score = selectivity(stats, named)
    order = [int(i) for i in torch.argsort(score, descending=True)[: max(1, n)]]
    return ValueLatents(attribute, value, order, [float(score[f]) for f in order],
                        typical_activation(stats, order, named), [top_prompts(stats, f) for f in order])


def attribute_latents(stats: LatentStats, attribute: str, n: int = 3,
                      values: Sequence[str] | None = None) -> dict[str, ValueLatents]:
    """:func:`value_latents` of every value of ``attribute`` (or of ``values``) some prompt names."""
    chosen = [check_value(attribute, v) for v in values] if values else attribute_values(attribute)
    return {v: value_latents(stats, attribute, v, n) for v in chosen if bool(stats.named(v).any())}


@dataclass
class FlipSettings:
    """How discovery steers a candidate latent: neutral prompts, seeds, strength, generation settings."""

    strength: float = 4.0
    passes: str = "cfg"
    seeds: int = 2
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 4.0


def flip_rates(pipe: Any, hooked: HookedSAE, found: ValueLatents, neutral: Sequence[str], read: Reader,
               settings: FlipSettings) -> list[float]:
    """For each latent of ``found``: the fraction of images of ``neutral`` prompts (``settings.seeds`` each)
    that ``read`` reads as the value when the latent is added, less the unsteered fraction."""
    prompts = [p for p in neutral for _ in range(settings.seeds)]
    if not prompts:
        raise VlsaeError(f"no neutral prompt for '{found.value}' (every prompt names it)")
    generation = {"seed": settings.seed, "steps": settings.steps, "guidance_scale": settings.guidance_scale}
    base = read(steered_generate(pipe, prompts, [], **generation))
    base_rate = sum(v == found.value for v in base) / len(prompts)
    rates = []
    for latent, scale in zip(found.latents, found.scale):
        add = Add(sae=hooked, latents=[latent], scale=[scale], strength=settings.strength, passes=settings.passes)
        seen = read(steered_generate(pipe, prompts, [add], **generation))
        rates.append(sum(v == found.value for v in seen) / len(prompts) - base_rate)
    return rates


def discover(pipe: Any, hooked: HookedSAE, stats: LatentStats, attribute: str, read: Reader | None = None,
             candidates: int = 3, neutral: int = 4, settings: FlipSettings | None = None,
             progress: Callable[[str], None] | None = None, values: Sequence[str] | None = None) -> list[ValueLatents]:
    """The discovery table of ``attribute`` (every value, or ``values``): per value, its ``candidates`` most
    selective latents, ranked by flip rate when ``read`` (a judge of this attribute) is given, else by selectivity.

    Neutral prompts of a value: the first ``neutral`` prompts of the set that do
    not name it, spread over the set (every k-th), so they vary in the other attributes.
    """
    settings = settings or FlipSettings()
    table = []
    for value, found in attribute_latents(stats, attribute, candidates, values).items():
        if read is not None:
            others = [p for p in stats.prompts if not names_value(p, value)]
            step = max(1, len(others) // max(1, neutral))
            chosen = others[::step][:neutral]
            rates: list[float | None] = list(flip_rates(pipe, hooked, found, chosen, read, settings))
            order = sorted(range(len(found.latents)), key=lambda i: (-(rates[i] or 0.0), -found.selectivity[i]))
            found = ValueLatents(attribute, value, [found.latents[i] for i in order],
                                 [found.selectivity[i] for i in order], [found.scale[i] for i in order],
                                 [found.names[i] for i in order], [rates[i] for i in order])
        else:
            found.flip_rate = [None] * len(found.latents)
        if progress is not None:
            progress(f"{attribute}={value}: latents {found.latents}")
        table.append(found)
    return table


__all__ = ["LatentStats", "latent_stats", "selectivity", "typical_activation", "top_prompts", "ValueLatents",
           "value_latents", "attribute_latents", "FlipSettings", "flip_rates", "discover"]
