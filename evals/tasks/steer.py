"""Task ``steer``: steer a diffusion pipeline through text-encoder SAE latents, or discover an attribute's latents
(``vlsae steer``, ``vlsae eval steer``).

A steering run (``feature`` set) writes ``out/images/``, ``out/grid.png``,
``out/results.json`` and ``out/index.html``; a discovery (``discover`` set)
writes ``out/discovery.json`` and ``out/index.html``. The work is
:mod:`evals.steering.run`; this module holds the config and the printed lines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlsae.config import option
from vlsae.errors import VlsaeError

from steering.discovery import FlipSettings
from steering.features import MODES, parse_feature
from steering.points import parse_positions

from evals.steering.judging import JUDGES, JudgePanel
from evals.steering.run import check_out, check_steer, discover_run, prepare, steer_run
from evals.steering.sweep import Generation
from evals.tasks import register_task
from evals.tasks.base import Task


@dataclass
class SteerConfig:
    pipeline: str = option("shapes-diffusion", help="the pipeline to steer: shapes-diffusion or diffusers-text:FOLDER")
    sae: str = option("", help="SAE run folder trained on one of the pipeline's text-encoder hook points (required)")
    out: str = option("", help="output folder; empty unless overwrite (required)")
    prompt: str = option("a large red circle", help="prompt to steer")
    feature: str = option("", help="what to steer toward: ATTRIBUTE=VALUE (colour=blue) or latent indices (17 or 17,40)")
    mode: str = option("add", help="add | clamp | ablate | concept")
    strength: list[float] = option(None, factory=lambda: [0.0, 1.0, 2.0, 4.0],
                                   help="strengths, in units of each latent's usual activation (concept: lambda)")
    seeds: int = option(8, help="images per strength (image k of every strength starts from the same noise)")
    discover: str = option("", help="instead of steering, discover the latents of this attribute: colour, shape or size")
    hook: str = option("", help="hook point to steer at (default: the one the SAE was trained on)")
    prompts: str = option("", help="prompt file, one a line, for latent statistics and discovery "
                                   "(default: ShapesWorld's 'a [size] COLOUR SHAPE' prompts)")
    per_value: int = option(3, help="latents per attribute value (the most selective ones)")
    passes: str = option("", help="where edits go under guidance: cond | both | cfg (default: cfg for add and "
                                  "concept, cond for clamp and ablate)")
    positions: str = option("all", help="token positions to edit: all | prompt | words | end | indices like 2,3")
    concept: str = option("", help="concept prompt of --mode concept (default: the feature's value)")
    values: list[str] = option(None, factory=list, help="discovery: only these values of the attribute (default: all)")
    judges: list[str] = option(None, factory=lambda: list(JUDGES), help="judges of the images: clip, cnn, pixel")
    judge: str = option("clip", help="discovery: the judge whose reading ranks the latents by flips")
    candidates: int = option(3, help="discovery: most selective latents per value tried by steering")
    neutral: int = option(4, help="discovery: neutral prompts (not naming the value) per candidate")
    flip_strength: float = option(4.0, help="discovery: strength each candidate is added at")
    flip_seeds: int = option(2, help="discovery: images per neutral prompt")
    steps: int = option(20, help="denoising steps")
    guidance_scale: float = option(4.0, help="classifier-free guidance scale")
    seed: int = option(0, help="noise seed of the first image")
    device: str = option("cpu", help="device: auto, cpu, cuda or cuda:N")
    overwrite: bool = option(False, help="replace a non-empty out folder")
    progress: bool = option(True, help="print progress lines")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


@register_task("steer")
class SteerTask(Task):
    summary = "steer image generation through text-encoder SAE latents (grid, flip rates) or discover attribute latents"
    config_class = SteerConfig

    @classmethod
    def run(cls, config: SteerConfig) -> dict[str, Any]:
        if not config.sae:
            raise VlsaeError("--sae is required: an SAE run folder trained on the pipeline's text encoder")
        if not config.out:
            raise VlsaeError("--out is required")
        if bool(config.feature) == bool(config.discover):
            raise VlsaeError("give --feature (steer) or --discover ATTRIBUTE (discovery), one of the two")
        if config.mode not in MODES:
            raise VlsaeError(f"unknown --mode '{config.mode}'; choose from {', '.join(MODES)}")
        feature = parse_feature(config.feature) if config.feature else None
        positions = parse_positions(config.positions)
        generation = Generation(seed=config.seed, steps=config.steps, guidance_scale=config.guidance_scale)
        check_out(config.out, config.overwrite)
        setup = prepare(config.pipeline, config.sae, hook=config.hook, prompts=config.prompts, device=config.device)
        if feature is not None:
            check_steer(setup, feature, config.mode, config.per_value, config.passes or None, positions, config.concept)
        elif config.judges and config.judge not in config.judges:
            raise VlsaeError(f"--judge {config.judge} is not among --judges {','.join(config.judges)}")
        panel = JudgePanel.load(config.judges, seed=config.seed) if config.judges else None
        if feature is None:
            flips = FlipSettings(strength=config.flip_strength, seeds=config.flip_seeds, seed=config.seed,
                                 steps=config.steps, guidance_scale=config.guidance_scale)
            return discover_run(setup, config.out, config.discover, panel, judge=config.judge,
                                candidates=config.candidates, neutral=config.neutral, flips=flips, values=config.values,
                                overwrite=config.overwrite, progress=config.progress)
        return steer_run(setup, config.out, config.prompt, feature, config.mode, config.strength, config.seeds, panel,
                         generation, per_value=config.per_value, passes=config.passes or None, positions=positions,
                         concept=config.concept, overwrite=config.overwrite)

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        if "table" in result:
            lines = [f"{result['attribute']} latents ({result['prompts']} prompts, judge {result['judge'] or 'none'}):"]
            for entry in result["table"]:
                best = ", ".join(f"{d['latent']} (flip {_percent(d['flip_rate'])}, sel {d['selectivity']:.3f})"
                                 for d in entry["latents"])
                lines.append(f"  {entry['value']:<9} {best}")
            lines.append(f"report: {result['index']}")
            return lines
        lines = [f"{result['prompt']!r} -> {result['feature']} ({result['mode']}), {result['seeds']} seeds:"]
        for row in result["strengths"]:
            parts = []
            for judge, rates in row["judges"].items():
                flip = f"target {rates['flip']:.0%}" if "flip" in rates else f"gone {rates.get('gone', 0):.0%}"
                kept = ", ".join(f"{a} {v:.0%}" for a, v in rates.get("preserve", {}).items())
                parts.append(f"{judge}: {flip}" + (f", kept {kept}" if kept else ""))
            lines.append(f"  strength {row['strength']:>5g}  change {row['change']:.3f}  " + "; ".join(parts))
        lines.append(f"grid: {result['out']}/grid.png   report: {result['index']}")
        return lines
