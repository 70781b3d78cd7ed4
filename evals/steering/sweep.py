"""One steering run: a prompt, a feature, a mode, a row of strengths, a few seeds, judged and saved.

Every strength is generated from the same noise as the unsteered images (the
same prompt list and seed, so image k of each strength starts from the same
latent), which is what makes "image change vs unsteered" and the grid's
columns comparable. The unsteered images are plain generation (no hooks at
all); strength 0 of ``add``, ``ablate`` and ``concept`` equals them bit for bit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from torch import Tensor

from multimodal.generation import generate
from steering.hooks import steered_generate
from steering.interventions import Intervention

from evals.steering.judging import JudgePanel, Readings, image_change, steering_rates


@dataclass
class Generation:
    """Settings every image of a run shares."""

    seed: int = 0
    steps: int = 20
    guidance_scale: float = 4.0
    batch_size: int = 256

    def kwargs(self) -> dict[str, Any]:
        return {"seed": self.seed, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "batch_size": self.batch_size}


@dataclass
class Sweep:
    """The images and readings of one run: ``base`` unsteered, ``steered[i]`` at ``strengths[i]``."""

    prompt: str
    strengths: list[float]
    base: Tensor
    steered: list[Tensor]
    base_readings: Readings
    readings: list[Readings]
    interventions: list[list[dict[str, Any]]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_sweep(pipe: Any, prompt: str, build: Callable[[float], list[Intervention]], strengths: Sequence[float],
              seeds: int, panel: JudgePanel | None, generation: Generation) -> Sweep:
    """Generate ``seeds`` images of ``prompt`` unsteered and at each strength (``build(strength)`` gives the
    interventions), and read them all with ``panel`` (None: no judging)."""
    prompts = [prompt] * seeds
    start = time.perf_counter()
    base = generate(pipe, prompts, **generation.kwargs())
    plain = time.perf_counter() - start
    steered, described = [], []
    start = time.perf_counter()
    for strength in strengths:
        interventions = build(float(strength))
        described.append([i.describe() for i in interventions])
        steered.append(steered_generate(pipe, prompts, interventions, **generation.kwargs()))
    steered_seconds = time.perf_counter() - start
    start = time.perf_counter()
    base_readings = panel.read(base) if panel else {}
    readings = [panel.read(images) if panel else {} for images in steered]
    return Sweep(prompt, [float(s) for s in strengths], base, steered, base_readings, readings, described,
                 {"unsteered_generation": round(plain, 3),
                  "steered_generation_per_strength": round(steered_seconds / max(1, len(strengths)), 3),
                  "judging": round(time.perf_counter() - start, 3)})


def sweep_results(sweep: Sweep, asked: dict[str, str], target: tuple[str, str] | None,
                  steered_attribute: str | None = None) -> list[dict[str, Any]]:
    """Per strength: the judges' rates (:func:`~evals.steering.judging.steering_rates`; ``target`` None and
    ``steered_attribute`` set for a removal) and the image change."""
    rows = []
    for strength, images, readings, interventions in zip(sweep.strengths, sweep.steered, sweep.readings,
                                                         sweep.interventions or [[]] * len(sweep.strengths)):
        rates = (steering_rates(readings, sweep.base_readings, [asked] * images.shape[0], target, steered_attribute)
                 if readings else {})
        rows.append({"strength": strength, "change": round(image_change(images, sweep.base), 4),
                     "judges": rates, "interventions": interventions})
    return rows


def image_name(strength: float | None, seed: int) -> str:
    """``unsteered_seed0.png`` or ``strength2_seed0.png`` (``strength-0.5_seed1.png``)."""
    if strength is None:
        return f"unsteered_seed{seed}.png"
    return f"strength{strength:g}_seed{seed}.png"


def save_images(sweep: Sweep, folder: Path) -> list[str]:
    """One PNG per strength and seed (and the unsteered ones) in ``folder``; returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for strength, images in [(None, sweep.base)] + list(zip(sweep.strengths, sweep.steered)):
        for seed, image in enumerate(images):
            name = image_name(strength, seed)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
            names.append(name)
    return names


def grid_figure(sweep: Sweep, path: Path, title: str = "") -> None:
    """``path``: the grid PNG, strengths across (unsteered first), seeds down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("unsteered", sweep.base)] + [(f"strength {s:g}", im) for s, im in zip(sweep.strengths, sweep.steered)]
    rows = sweep.base.shape[0]
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.3 * len(columns), 1.3 * rows + 0.5), squeeze=False)
    for c, (label, images) in enumerate(columns):
        for r in range(rows):
            ax = axes[r][c]
            ax.imshow(images[r].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"seed {r}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["Generation", "Sweep", "run_sweep", "sweep_results", "image_name", "save_images", "grid_figure"]
