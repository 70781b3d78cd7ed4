"""Task ``concepts``: the concept report of a trained SAE (``vlsae concepts``, ``vlsae eval concepts``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multimodal.pairs import DEFAULT_MAX_SKIPPED
from vlsae.config import option

from evals.concepts import concepts_report
from evals.tasks import register_task
from evals.tasks.base import Task


@dataclass
class ConceptsConfig:
    sae: str = option(help="trained SAE run folder")
    data: str = option(help="pair shards, e.g. 'DIR/{000000..000009}.tar', or a folder of shards")
    model: str = option(help="adapter spec the SAE was trained on, e.g. shapes-clip")
    out: str = option(help="report folder (index.html inside); empty unless overwrite")
    hook: str = option("final", help="hook point the SAE was trained on")
    tokens: str = option("cls", help="token selection, one row per pair and modality: cls or mean")
    limit: int = option(2000, help="pairs to analyse, the first ones of data")
    batch_size: int = option(64, help="pairs per forward pass of the model")
    device: str = option("auto", help="device for the model: auto, cpu, cuda or cuda:N")
    cards: int = option(24, help="concept cards in the report")
    max_skipped: float = option(DEFAULT_MAX_SKIPPED, help="largest fraction of the pairs damaged shards may lose before the report refuses")
    overwrite: bool = option(False, help="replace a non-empty out folder")
    progress: bool = option(True, help="progress bars")


@register_task("concepts")
class ConceptsTask(Task):
    summary = "what each latent means: concept cards, modality scores, planted-concept matrix (HTML report)"
    config_class = ConceptsConfig

    @classmethod
    def run(cls, config: ConceptsConfig) -> dict[str, Any]:
        return concepts_report(config.sae, config.data, config.model, config.out, hook=config.hook,
                               tokens=config.tokens, limit=config.limit, batch_size=config.batch_size,
                               device=config.device, n_cards=config.cards, overwrite=config.overwrite,
                               progress=config.progress, max_skipped=config.max_skipped)

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        fvu = ", ".join(f"{m} {v:.3f}" for m, v in result["fvu"].items())
        lines = [f"{result['pairs']} pairs, FVU {fvu}, {result['multimodal_fraction']:.0%} multimodal latents"]
        planted = result.get("planted") or {}
        if planted:
            lines.append(f"planted values: same latent on images and captions for {planted['same_index_rate']:.0%}, "
                         f"exclusively for {planted['exclusive_same_index_rate']:.0%} "
                         f"({planted['catch_all_latents']} latents are the best of several values); "
                         f"mean AUROC images {planted['image_auroc']:.3f}, captions {planted['text_auroc']:.3f}")
        lines.append(f"report: {result['index']}")
        return lines
