"""Task ``zeroshot``: plain vs concept-enhanced zero-shot classification (``vlsae zeroshot``, ``vlsae eval zeroshot``).

The work is :func:`evals.zeroshot.run.run_zeroshot`: a CLIP-style model's
zero-shot accuracy per attribute (or per ``--classes`` class), and the same
with the VL-SAE's concept term mixed in at a validation-chosen λ, reported on
a separate test split with a bootstrap interval of the gain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multimodal.pairs import DEFAULT_MAX_SKIPPED
from vlsae.config import option

from evals.tasks import register_task
from evals.tasks.base import Task
from evals.zeroshot.protocol import DEFAULT_LAMBDAS
from evals.zeroshot.run import describe, run_zeroshot


@dataclass
class ZeroShotConfig:
    sae: str = option(help="trained SAE run folder (a VL-SAE on the model's final image and text embeddings)")
    model: str = option(help="CLIP-style adapter spec the SAE was trained on, e.g. shapes-clip or open_clip:ARCH:WEIGHTS")
    data: str = option(help="labelled pair shards, e.g. 'DIR/{000000..000009}.tar' or a folder of shards")
    out: str = option(help="report folder (results.json, predictions.csv, index.html); empty unless overwrite")
    attribute: str = option("all", help="ShapesWorld attributes to classify: shape, colour, size, position, comma-separated, or all")
    classes: str = option("", help="a JSON/YAML file of class names and prompt templates (real data); replaces --attribute")
    acts: str = option("", help="activation cache of the model's final embeddings of data (skips extracting the images)")
    lambdas: list[float] = option(factory=lambda: list(DEFAULT_LAMBDAS), help="weights of the concept term to try (must include 0)")
    variant: str = option("both", help="concept (cosine of the codes), decoder (text decoded as an image) or both")
    val_fraction: float = option(0.5, help="fraction of the labelled records λ is chosen on (the rest is the test split)")
    seed: int = option(0, help="seed of the validation/test split and of the bootstrap")
    resamples: int = option(1000, help="bootstrap resamples of the gain's interval")
    limit: int | None = option(None, help="use only the first N labelled records (None: all)")
    batch_size: int = option(128, help="images per forward pass when extracting")
    device: str = option("auto", help="device for the model: auto, cpu, cuda or cuda:N")
    max_skipped: float = option(DEFAULT_MAX_SKIPPED, help="largest fraction of the pairs damaged shards may lose before the run fails")
    overwrite: bool = option(False, help="replace a non-empty out folder")
    progress: bool = option(True, help="progress bars")


@register_task("zeroshot")
class ZeroShotTask(Task):
    summary = "zero-shot accuracy plain vs with VL-SAE concept alignment (validation-chosen λ, test gain with CI)"
    config_class = ZeroShotConfig

    @classmethod
    def run(cls, config: ZeroShotConfig) -> dict[str, Any]:
        return run_zeroshot(config.sae, config.model, config.data, config.out, attributes=config.attribute,
                            classes=config.classes or None, acts=config.acts or None, lambdas=config.lambdas,
                            variant=config.variant, val_fraction=config.val_fraction, seed=config.seed,
                            resamples=config.resamples, limit=config.limit, batch_size=config.batch_size,
                            device=config.device, max_skipped=config.max_skipped, overwrite=config.overwrite,
                            progress=config.progress)

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        return describe(result)
