"""What ``vlsae steer`` does, as functions: a steering run and an attribute discovery, each into a folder.

:func:`prepare` loads the pipeline, binds the SAE to its hook point (checking
both before anything is generated) and computes the latents' statistics on the
prompt set (a prompt file, or ShapesWorld's single-object prompts with every
size word). :func:`steer_run` writes ``images/``, ``grid.png``,
``results.json`` and ``index.html``; :func:`discover_run` writes
``discovery.json`` and ``index.html``.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_json, atomic_write_text, check_writable_dir

from multimodal.judges import ATTRIBUTES as JUDGED
from steering.discovery import FlipSettings, LatentStats, discover, latent_stats
from steering.features import Feature, build_interventions, feature_latents
from steering.pipelines import load_pipeline
from steering.points import HookedSAE, bind_sae, text_adapter
from steering.prompts import attribute_values, prompt_attributes, read_prompts, shapes_prompts

from evals.steering.judging import JudgePanel
from evals.steering.report import discovery_page, steer_page
from evals.steering.sweep import Generation, grid_figure, run_sweep, save_images, sweep_results

SIZE_WORDS = ("", "small", "medium", "large")


def default_prompts() -> list[str]:
    """ShapesWorld's "a [SIZE] COLOUR SHAPE" for every colour, shape and size word (400 prompts)."""
    return [p for size in SIZE_WORDS for p in shapes_prompts(size=size)[0]]


@dataclass
class Setup:
    """A loaded pipeline, the SAE bound to its hook point, and the latents' statistics on the prompt set."""

    pipeline: str
    sae_path: str
    pipe: Any
    hooked: HookedSAE
    stats: LatentStats


def prepare(pipeline: str, sae: str, hook: str = "", prompts: str = "", device: str = "cpu") -> Setup:
    """Load and check everything a run needs; one-line errors for a bad SAE, hook or pipeline."""
    if not Path(sae).exists():
        raise VlsaeError(f"SAE run folder not found: {sae}")
    prompt_set = read_prompts(prompts) if prompts else default_prompts()
    pipe = load_pipeline(pipeline, device=device)
    hooked = bind_sae(text_adapter(pipe), sae, hook or None)
    return Setup(pipeline, str(sae), pipe, hooked, latent_stats(hooked, prompt_set))


def check_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` checked writable and empty unless ``overwrite`` (nothing is removed yet): before any model loads."""
    folder = check_writable_dir(out)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise VlsaeError(f"{folder} is not empty; choose another --out or pass --overwrite to replace it")
    return folder


def prepare_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` checked (:func:`check_out`), emptied with ``overwrite``, created."""
    folder = check_out(out, overwrite)
    if folder.exists() and any(folder.iterdir()):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_steer(setup: Setup, feature: Feature, mode: str, per_value: int = 3, passes: str | None = None,
                positions: str | Sequence[int] = "all", concept: str = "") -> None:
    """Every input error of a steering run (a latent out of range, a value no prompt names, passes the mode
    does not take) as a one-line error, before judges load or any image is generated."""
    build_interventions(setup.hooked, setup.stats, feature, mode, 1.0, per_value=per_value, passes=passes,
                        positions=positions, concept_prompt=concept)


def steer_run(setup: Setup, out: str | Path, prompt: str, feature: Feature, mode: str, strengths: Sequence[float],
              seeds: int, panel: JudgePanel | None, generation: Generation, per_value: int = 3,
              passes: str | None = None, positions: str | Sequence[int] = "all", concept: str = "",
              overwrite: bool = False) -> dict[str, Any]:
    """Steer ``prompt`` toward ``feature`` at each strength; write the folder and return ``results.json``'s dict."""
    if seeds < 1 or not strengths:
        raise VlsaeError("a steering run needs at least one seed and one strength")

    def build(strength: float) -> list[Any]:
        return build_interventions(setup.hooked, setup.stats, feature, mode, strength, per_value=per_value,
                                   passes=passes, positions=positions, concept_prompt=concept)

    check_steer(setup, feature, mode, per_value, passes, positions, concept)
    folder = prepare_out(out, overwrite)
    start = time.perf_counter()
    sweep = run_sweep(setup.pipe, prompt, build, strengths, seeds, panel, generation)
    asked = {a: v for a, v in prompt_attributes(prompt).items() if a in JUDGED}
    target = (feature.attribute, feature.value) if feature.attribute and mode != "ablate" else None
    rows = sweep_results(sweep, asked, target, feature.attribute or None)
    save_images(sweep, folder / "images")
    grid_figure(sweep, folder / "grid.png", title=f"{prompt!r}: {feature.label}, {mode}")
    latents = [] if mode == "concept" else feature_latents(setup.hooked, setup.stats, feature, per_value).as_dict()["latents"]
    result = {"prompt": prompt, "feature": feature.label, "mode": mode, "target": f"{target[0]}={target[1]}" if target else "",
              "asked": asked, "seeds": seeds, "pipeline": setup.pipeline, "sae": setup.sae_path,
              "hook": setup.hooked.point, "judges": list(panel.judges) if panel else [],
              "generation": generation.kwargs(), "latents": latents, "strengths": rows,
              "seconds": {**sweep.seconds, "total": round(time.perf_counter() - start, 2)}}
    atomic_write_json(folder / "results.json", result)
    atomic_write_text(folder / "index.html", steer_page(result, "grid.png"))
    return {**result, "out": str(folder), "index": str(folder / "index.html")}


def discover_run(setup: Setup, out: str | Path, attribute: str, panel: JudgePanel | None, judge: str = "clip",
                 candidates: int = 3, neutral: int = 4, flips: FlipSettings | None = None,
                 values: Sequence[str] | None = None, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """The discovery table of ``attribute`` (see :func:`steering.discovery.discover`), judged by ``judge``."""
    attribute = "colour" if attribute == "color" else attribute
    attribute_values(attribute)
    folder = prepare_out(out, overwrite)
    read = None
    if panel is not None and attribute in JUDGED:
        if judge not in panel.reads(attribute):
            raise VlsaeError(f"judge '{judge}' does not read {attribute}; use one of {', '.join(panel.reads(attribute))}")
        read = lambda images: panel.read(images)[judge][attribute]  # noqa: E731
    flips = flips or FlipSettings()
    start = time.perf_counter()
    table = discover(setup.pipe, setup.hooked, setup.stats, attribute, read, candidates=candidates, neutral=neutral,
                     settings=flips, progress=print if progress else None, values=values or None)
    result = {"attribute": attribute, "pipeline": setup.pipeline, "sae": setup.sae_path, "hook": setup.hooked.point,
              "prompts": len(setup.stats.prompts), "judge": judge if read else None,
              "flip_settings": vars(flips), "table": [entry.as_dict() for entry in table],
              "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(folder / "discovery.json", result)
    atomic_write_text(folder / "index.html", discovery_page(result))
    return {**result, "out": str(folder), "index": str(folder / "index.html")}


__all__ = ["SIZE_WORDS", "default_prompts", "Setup", "prepare", "check_out", "prepare_out", "check_steer", "steer_run", "discover_run"]
