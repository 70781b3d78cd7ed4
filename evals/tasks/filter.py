"""Task ``filter``: score image-text pairs, keep the best, write the cleaner dataset and its report.

The work is :func:`multimodal.filtering.filter_dataset` (scores spilled per
shard, the keep decision, byte-identical shards, atomic output, resume), split
over the processes under torchrun (:func:`multimodal.filtering.filter_distributed`;
in one process it is ``filter_dataset``); this task adds the report page
(:func:`evals.filtering.write_filter_report`) to the output folder before it is
moved into place (on rank 0). ``vlsae filter`` and ``vlsae eval filter`` both run it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from multimodal.filtering import FilterConfig, FilterResult, filter_distributed

from evals.filtering import write_filter_report
from evals.tasks import register_task
from evals.tasks.base import Task


def run_filter(config: FilterConfig) -> dict[str, Any]:
    """Filter with the report page; returns filter.json's summary plus ``index`` and ``detection``."""
    found: dict[str, Any] = {}

    def finish(folder: Path, result: FilterResult) -> None:
        found.update(write_filter_report(folder, result))

    result = filter_distributed(config, finish=finish)
    if not result.complete:
        return result.summary
    return {**result.summary, "index": str(Path(result.out) / "index.html"), "detection": found}


@register_task("filter")
class FilterTask(Task):
    summary = "score image-text pairs (SAE-V, VL-SAE overlap, CLIPScore, ...), keep the best, write shards + report"
    config_class = FilterConfig

    @classmethod
    def run(cls, config: FilterConfig) -> dict[str, Any]:
        return run_filter(config)

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        if "counts" not in result:
            return [f"scored shards {result['scored_shards']} (reused {result['reused_shards']}) into {result['staging']}; "
                    f"run again without --shards to merge the scores and write the output"]
        counts = result["counts"]
        lines = [f"{result['scorer']}: kept {counts['kept']} of {counts['pairs_scored']} pairs "
                 f"({counts['kept_fraction']:.1%}; threshold score {result['threshold']:.6g}), lost {counts['lost']}"]
        timing = result.get("timing", {})
        if timing.get("pairs"):
            lines.append(f"scored {timing['pairs']} pairs at {timing['pairs_per_second']} pairs/s "
                         f"(reused the scores of {timing['reused_shards']} shards)")
        elif timing.get("reused_shards"):
            lines.append(f"reused the scores of all {timing['reused_shards']} shards")
        detection = result.get("detection") or {}
        if detection.get("auroc") is not None:
            lines.append(f"ground truth (ShapesWorld flags): AUROC {detection['auroc']:.3f}, kept precision "
                         f"{detection['precision']:.1%}, recall {detection['recall']:.1%}")
        lines.append(f"report: {result['index']}")
        return lines
