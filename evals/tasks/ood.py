"""Task ``ood``: OOD detection from SAE concepts against raw-embedding baselines (``vlsae ood``, ``vlsae eval ood``).

The work is :func:`evals.ood.run_ood`; the settings are :class:`evals.ood.OODConfig`.
"""
from __future__ import annotations

from typing import Any

from evals.ood import OODConfig, run_ood
from evals.ood.report import verdict_lines
from evals.tasks import register_task
from evals.tasks.base import Task


@register_task("ood")
class OODTask(Task):
    summary = "OOD detection: SAE scores and raw-embedding baselines, AUROC/FPR95/AUPR with intervals (HTML report)"
    config_class = OODConfig
    output_fields = ("out", "cache")

    @classmethod
    def run(cls, config: OODConfig) -> dict[str, Any]:
        return run_ood(config)

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        sets = result["sets"]
        lines = [f"{len(result['scores'])} scores, {sets['id']['rows']} ID rows against "
                 + ", ".join(f"{name} ({s['rows']})" for name, s in sets.items() if name not in ("fit", "id"))
                 + f"; fit statistics from {sets['fit']['rows']} rows; {result['seconds']['total']:.1f} s "
                 f"(CPU {result['cpu_seconds']['total']:.1f} s)"]
        lines += verdict_lines(result)
        lines.append(f"report: {result['index']}")
        return lines
