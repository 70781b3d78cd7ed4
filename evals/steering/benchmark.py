"""The steering benchmark: flip tables over every (source value -> target value) pair, with the baselines.

For an attribute (colour or shape) and each target value t, one batch holds,
for every other value s, the prompt "a S X" (X: a value of the other attribute,
varied over the pairs) ``seeds`` times. Every arm generates that batch from the
same noise:

- ``unsteered``: the prompts as they are;
- ``sae add`` / ``sae clamp`` / ``sae concept``: :func:`steering.features.build_interventions`
  toward ``t`` (the same interventions for the whole batch: they depend only on the target);
- ``raw difference``: no SAE, each row steered by H("a T X") - H("a S X") at the same layer;
- ``prompt edit``: the prompts rewritten to "a T X", the upper reference.

Removal: for each colour c, "a C X" for a few X, with ``sae ablate`` (c's
latents), ``sae concept`` at negative strength (Concept Steerers' removal),
and the baselines raw difference toward "a X" and the prompt "a X".

Per arm and strength, per judge: flip rate (reads t), preservation of the
other attribute (and its unsteered rate), the removed value gone, image change
and *background* change (pixels that are background in both images: an
off-target change the target does not explain), each with a bootstrap
interval over pairs (:func:`scipy.stats.bootstrap`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from multimodal.generation import generate
from multimodal.shapesworld import RGB
from steering.features import Feature, build_interventions
from steering.hooks import steered_generate
from steering.interventions import Concept, Delta, Intervention
from steering.points import HookedSAE
from steering.prompts import article, attribute_values, describe

from evals.steering.judging import JudgePanel, Readings, image_change

OTHER = {"colour": "shape", "shape": "colour"}


@dataclass
class Row:
    """One image of the benchmark: its prompt, the edited prompt, the pair and the values a judge should read."""

    prompt: str
    edited: str
    pair: str
    source: str
    target: str
    kept: str


@dataclass
class Group:
    """One generation batch: rows sharing a target (or, for removal, a removed value)."""

    target: str
    rows: list[Row]


@dataclass
class Arm:
    """A way to steer a group: ``build(group, strength)`` gives interventions (None: edit the prompt)."""

    name: str
    strengths: list[float]
    build: Callable[[Group, float], list[Intervention]] | None


def _prompt(attribute: str, value: str, other: str) -> str:
    return describe(value, other) if attribute == "colour" else describe(other, value)


def pair_groups(attribute: str, seeds: int, values: Sequence[str] | None = None) -> list[Group]:
    """One group per target value: every other value as source, the other attribute varied over the pairs."""
    values = list(values or attribute_values(attribute))
    others = attribute_values(OTHER[attribute])
    groups = []
    for t_index, target in enumerate(values):
        rows = []
        for s_index, source in enumerate(values):
            if source == target:
                continue
            kept = others[(s_index + t_index) % len(others)]
            rows += [Row(_prompt(attribute, source, kept), _prompt(attribute, target, kept), f"{source}->{target}",
                         source, target, kept)] * seeds
        groups.append(Group(target, rows))
    return groups


def removal_groups(seeds: int, shapes_per_colour: int = 3, values: Sequence[str] | None = None) -> list[Group]:
    """One group per colour c: "a C SHAPE" for a few shapes; the edit removes c ("a SHAPE")."""
    colours, shapes = list(values or attribute_values("colour")), attribute_values("shape")
    groups = []
    for c_index, colour in enumerate(colours):
        rows = []
        for k in range(shapes_per_colour):
            shape = shapes[(c_index + 3 * k) % len(shapes)]
            rows += [Row(describe(colour, shape), article(shape), f"{colour}->none", colour, "", shape)] * seeds
        groups.append(Group(colour, rows))
    return groups


def sae_arm(hooked: HookedSAE, stats: Any, attribute: str, mode: str, strengths: Sequence[float],
            per_value: int = 3, name: str = "") -> Arm:
    """``sae MODE``: the interventions ``vlsae steer --feature ATTRIBUTE=TARGET --mode MODE`` uses."""
    def build(group: Group, strength: float) -> list[Intervention]:
        return build_interventions(hooked, stats, Feature(attribute, group.target), mode, strength, per_value)
    return Arm(name or f"sae {mode}", list(strengths), build)


def removal_concept_arm(hooked: HookedSAE, strengths: Sequence[float]) -> Arm:
    """Concept Steerers' removal: the colour's word as concept prompt, at negative strength."""
    return Arm("sae concept (negative)", [-abs(s) for s in strengths],
               lambda group, strength: [Concept(sae=hooked, prompt=group.target, strength=strength)])


def raw_arm(hooked: HookedSAE, strengths: Sequence[float], passes: str = "cond") -> Arm:
    """No SAE: each row steered by H(edited prompt) - H(prompt) at the SAE's layer."""
    def build(group: Group, strength: float) -> list[Intervention]:
        return [Delta.prompt_difference(hooked.adapter, hooked.point, [r.edited for r in group.rows],
                                        [r.prompt for r in group.rows], strength=strength, passes=passes)]
    return Arm("raw difference", list(strengths), build)


def background_change(steered: Tensor, base: Tensor, radius: float = 60.0) -> float:
    """Mean absolute difference, in [0, 1], over pixels that are background in both images (no ShapesWorld
    object colour within ``radius``): what changed that the object's edit does not explain."""
    reference = torch.tensor(list(RGB.values()), dtype=torch.float32)

    def background(images: Tensor) -> Tensor:
        flat = images.float().permute(0, 2, 3, 1).unsqueeze(-2)  # (n, H, W, 1, 3)
        return ((flat - reference).norm(dim=-1) >= radius).all(dim=-1)  # (n, H, W)

    mask = background(steered) & background(base)
    if not bool(mask.any()):
        return 0.0
    diff = (steered.float() - base.float()).abs().mean(dim=1)  # (n, H, W)
    return float(diff[mask].mean() / 255.0)


def _interval(per_pair: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(per_pair, dtype=float)
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()) if len(values) else 0.0, float(values.mean()) if len(values) else 0.0
    from scipy.stats import bootstrap

    result = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                       random_state=0)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _pair_rates(rows: Sequence[Row], hits: Sequence[bool]) -> list[float]:
    by_pair: dict[str, list[bool]] = {}
    for row, hit in zip(rows, hits):
        by_pair.setdefault(row.pair, []).append(bool(hit))
    return [sum(v) / len(v) for v in by_pair.values()]


def score(attribute: str, rows: Sequence[Row], readings: Readings, removal: bool = False) -> dict[str, Any]:
    """judge -> {flip | gone, kept}: mean over images, the 95 % bootstrap interval over pairs, and the share of
    pairs at or above 80 % (flip) / 90 % (gone)."""
    other = OTHER[attribute]
    out: dict[str, Any] = {}
    for judge, read in readings.items():
        entry: dict[str, Any] = {}
        if attribute in read:
            if removal:
                hits = [v != r.source for v, r in zip(read[attribute], rows)]
                key, bar = "gone", 0.9
            else:
                hits = [v == r.target for v, r in zip(read[attribute], rows)]
                key, bar = "flip", 0.8
            pairs = _pair_rates(rows, hits)
            entry[key] = {"rate": sum(hits) / len(hits), "ci": _interval(pairs),
                          "pairs_at_bar": sum(p >= bar for p in pairs) / len(pairs), "worst_pair": min(pairs)}
        if other in read:
            kept = [v == r.kept for v, r in zip(read[other], rows)]
            entry["kept"] = {"rate": sum(kept) / len(kept), "ci": _interval(_pair_rates(rows, kept))}
        out[judge] = entry
    return out


@dataclass
class ArmResult:
    arm: str
    strength: float
    judges: dict[str, Any]
    change: float
    background_change: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def run_benchmark(pipe: Any, attribute: str, groups: Sequence[Group], arms: Sequence[Arm], panel: JudgePanel,
                  seed: int = 0, steps: int = 20, guidance_scale: float = 4.0, removal: bool = False,
                  progress: Callable[[str], None] | None = None) -> list[ArmResult]:
    """Every arm at every strength on every group, plus ``unsteered`` and ``prompt edit``; same noise throughout."""
    generation = {"seed": seed, "steps": steps, "guidance_scale": guidance_scale}
    all_rows = [r for g in groups for r in g.rows]
    images: dict[tuple[str, float], list[Tensor]] = {}
    seconds: dict[tuple[str, float], float] = {}
    plan = [("unsteered", 0.0, None), ("prompt edit", 0.0, None)] + [(a.name, s, a) for a in arms for s in a.strengths]
    for name, strength, arm in plan:
        start = time.perf_counter()
        out = []
        for group in groups:
            prompts = [r.prompt for r in group.rows]
            if name == "unsteered":
                out.append(generate(pipe, prompts, **generation))
            elif name == "prompt edit":
                out.append(generate(pipe, [r.edited for r in group.rows], **generation))
            else:
                out.append(steered_generate(pipe, prompts, arm.build(group, strength), **generation))
        images[(name, strength)] = out
        seconds[(name, strength)] = time.perf_counter() - start
        if progress is not None:
            progress(f"{attribute}: {name} {strength:g} ({seconds[(name, strength)]:.0f} s)")
    base = torch.cat(images[("unsteered", 0.0)])
    results = []
    for (name, strength), chunks in images.items():
        generated = torch.cat(chunks)
        results.append(ArmResult(name, strength, score(attribute, all_rows, panel.read(generated), removal),
                                 image_change(generated, base), background_change(generated, base),
                                 round(seconds[(name, strength)], 2)))
    return results


def best_strength(results: Sequence[ArmResult], judge: str = "cnn", slack: float = 0.10,
                  key: str = "flip") -> dict[str, ArmResult]:
    """Per arm: the strength with the highest ``key`` rate (by ``judge``) among those whose kept rate is within
    ``slack`` of the unsteered one (the issue's "shape still matches within 10 points"); the best overall when
    none qualifies."""
    unsteered = next(r for r in results if r.arm == "unsteered")
    floor = unsteered.judges.get(judge, {}).get("kept", {}).get("rate", 0.0) - slack
    best: dict[str, ArmResult] = {}
    for arm in dict.fromkeys(r.arm for r in results):
        rows = [r for r in results if r.arm == arm]
        ok = [r for r in rows if r.judges.get(judge, {}).get("kept", {}).get("rate", 1.0) >= floor] or rows
        best[arm] = max(ok, key=lambda r: r.judges.get(judge, {}).get(key, {}).get("rate", 0.0))
    return best


def generation_cost(pipe: Any, prompts: Sequence[str], interventions: Sequence[Intervention], repeats: int = 3,
                    steps: int = 20, guidance_scale: float = 4.0) -> dict[str, float]:
    """Seconds of plain and of steered generation of ``prompts`` (the fastest of ``repeats`` runs each,
    interleaved so that load from other processes hits both alike) and their ratio."""
    generation = {"seed": 0, "steps": steps, "guidance_scale": guidance_scale}
    plain, steered = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(pipe, list(prompts), **generation)
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        steered_generate(pipe, list(prompts), interventions, **generation)
        steered.append(time.perf_counter() - start)
    return {"images": len(prompts), "plain_s": min(plain), "steered_s": min(steered),
            "ratio": min(steered) / min(plain)}


__all__ = ["generation_cost", "OTHER", "Row", "Group", "Arm", "pair_groups", "removal_groups", "sae_arm", "removal_concept_arm",
           "raw_arm", "background_change", "score", "ArmResult", "run_benchmark", "best_strength"]
