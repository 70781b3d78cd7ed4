"""Task ``darkmatter``: the linear predictability of SAE errors (``vlsae darkmatter``, ``vlsae eval darkmatter``).

The work is :func:`evals.darkmatter.run_darkmatter`: error R^2 (vector and squared norm) of ridge fits on
held-out rows, nonlinear FVU, the error-norm agreement of two SAE sizes, and the report page.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlsae.config import option

from evals.darkmatter import run_darkmatter
from evals.tasks import register_task
from evals.tasks.base import Task


@dataclass
class DarkMatterConfig:
    sae: list[str] = option(help="trained SAE run folders (two or more sizes add the error-norm agreement)")
    data: str = option(help="activations: an activation cache folder or a .safetensors/.npy tensor file")
    out: str = option(help="report folder (index.html, results.json, PNGs); empty unless overwrite")
    modality: str | None = option(None, help="modality of paired data a single-stream SAE is analysed on (default: "
                                             "the one its run was trained on, else the data's only one)")
    max_rows: int = option(20_000, help="analyse the first N rows of each modality")
    held_out: float = option(0.5, help="fraction of the rows the ridge fits are scored on (the rest fits them)")
    seed: int = option(0, help="seed of the fit/held-out split")
    overwrite: bool = option(False, help="write into a non-empty out folder")


@register_task("darkmatter")
class DarkMatterTask(Task):
    summary = "dark matter of SAE errors: error and error-norm R² from the input, nonlinear FVU, size agreement (report)"
    config_class = DarkMatterConfig

    @classmethod
    def run(cls, config: DarkMatterConfig) -> dict[str, Any]:
        return run_darkmatter(config.sae, config.data, config.out, modality=config.modality, max_rows=config.max_rows,
                              held_out=config.held_out, seed=config.seed, overwrite=config.overwrite)

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        lines = []
        for r in result["results"]:
            where = f" [{r['modality']}]" if r.get("modality") else ""
            lines.append(f"{r['sae']}{where} ({r['arch']}, {r['n_latents']} latents, L0 {r['l0']:.1f}): FVU {r['fvu']:.4f}, "
                         f"error R² {r['error_r2']:.3f}, ‖error‖² R² {r['norm_r2']:.3f}, nonlinear FVU {r['nonlinear_fvu']:.4f}")
        for a in result["agreement"]:
            lines.append(f"error norms {a['n_latents'][0]} vs {a['n_latents'][1]} latents"
                         f"{' [' + a['modality'] + ']' if a.get('modality') else ''}: Pearson {a['pearson']:.3f}, "
                         f"Spearman {a['spearman']:.3f}")
        lines.append(f"report: {result['index']}")
        return lines
