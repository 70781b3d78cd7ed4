"""From "steer toward colour=blue" (or a latent index) and a mode to the interventions that do it.

A feature is named by an attribute value (``colour=blue``: the latents
discovery finds most selective for blue) or by latent indices (``17`` or
``17,40``). The modes:

- ``add``: the feature's latents added at ``strength`` times their usual activation;
- ``clamp``: the feature's latents clamped to ``strength`` times their usual
  activation; for an attribute value, the latents of the attribute's *other*
  values are clamped to 0 as well (the attribute is set to the value, which is
  what turns a red circle blue rather than red-and-blue);
- ``ablate``: the feature's latents scaled by ``1 - strength`` (1 removes them);
- ``concept``: Concept Steerers with the value's word as the concept prompt
  (or ``concept_prompt``), + on the conditional pass, - on the unconditional.

Every mode keeps the SAE's error term (see :mod:`steering.interventions`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vlsae.errors import VlsaeError

from steering.discovery import LatentStats, ValueLatents, typical_activation, value_latents
from steering.interventions import Ablate, Add, Clamp, Concept, Intervention
from steering.points import HookedSAE
from steering.prompts import ATTRIBUTES, attribute_values, check_value

MODES = ("add", "clamp", "ablate", "concept")
#: where each mode's edit goes under guidance by default (cfg: + conditional, - unconditional)
DEFAULT_PASSES = {"add": "cfg", "clamp": "cond", "ablate": "cond", "concept": "cfg"}


@dataclass
class Feature:
    """What to steer: an attribute value, or latent indices (``attribute``/``value`` empty)."""

    attribute: str = ""
    value: str = ""
    latents: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.attribute}={self.value}" if self.attribute else "latent " + ",".join(map(str, self.latents))


def parse_feature(text: str) -> Feature:
    """``ATTRIBUTE=VALUE`` (``colour=blue``) or ``LATENT[,LATENT...]`` (``17,40``); one-line errors otherwise."""
    text = text.strip()
    if "=" in text:
        attribute, value = (part.strip() for part in text.split("=", 1))
        attribute = "colour" if attribute == "color" else attribute
        if attribute not in ATTRIBUTES:
            raise VlsaeError(f"unknown attribute '{attribute}' in --feature {text}; use one of {', '.join(ATTRIBUTES)}")
        return Feature(attribute=attribute, value=check_value(attribute, value))
    try:
        latents = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        latents = ()
    if not latents:
        raise VlsaeError(f"--feature must be ATTRIBUTE=VALUE (e.g. colour=blue) or latent indices (e.g. 17 or 17,40); "
                         f"got '{text}'")
    return Feature(latents=latents)


def feature_latents(hooked: HookedSAE, stats: LatentStats, feature: Feature, per_value: int = 3) -> ValueLatents:
    """The latents of ``feature`` with their usual activations (an index's over the whole prompt set)."""
    if feature.attribute:
        return value_latents(stats, feature.attribute, feature.value, per_value)
    latents = hooked.check_latents(feature.latents)
    return ValueLatents("", "", latents, [0.0] * len(latents), typical_activation(stats, latents))


def build_interventions(hooked: HookedSAE, stats: LatentStats, feature: Feature, mode: str, strength: float,
                        per_value: int = 3, passes: str | None = None, positions: str | Sequence[int] = "all",
                        concept_prompt: str = "") -> list[Intervention]:
    """The interventions that steer toward ``feature`` in ``mode`` at ``strength`` (see the module docstring)."""
    if mode not in MODES:
        raise VlsaeError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
    passes = passes or DEFAULT_PASSES[mode]
    if mode == "concept":
        prompt = concept_prompt or feature.value
        if not prompt:
            raise VlsaeError("--mode concept with latent indices needs a concept prompt (--concept TEXT)")
        return [Concept(sae=hooked, prompt=prompt, strength=strength, passes=passes, positions=positions)]
    found = feature_latents(hooked, stats, feature, per_value)
    common = {"sae": hooked, "latents": found.latents, "scale": found.scale, "passes": passes, "positions": positions}
    if mode == "add":
        return [Add(**common, strength=strength)]
    if mode == "ablate":
        return [Ablate(**common, strength=strength)]
    out: list[Intervention] = [Clamp(**common, value=strength)]
    if feature.attribute:
        others = {f for v in attribute_values(feature.attribute) if v != feature.value and bool(stats.named(v).any())
                  for f in value_latents(stats, feature.attribute, v, per_value).latents} - set(found.latents)
        if others:
            out.append(Clamp(sae=hooked, latents=sorted(others), value=0.0, passes=passes, positions=positions))
    return out


__all__ = ["MODES", "DEFAULT_PASSES", "Feature", "parse_feature", "feature_latents", "build_interventions"]
