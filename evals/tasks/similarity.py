"""Task ``similarity``: ITDA Jaccard (and linear CKA) between runs or activation caches (``vlsae similarity``).

The work is :func:`evals.similarity.compare`; this module adds the config, the
JSON output and the printed table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_text

from evals.similarity import ITDASettings, compare
from evals.tasks import register_task
from evals.tasks.base import Task


@dataclass
class SimilarityConfig:
    a: list[str] = option(help="ITDA runs or activation caches of model a (several: its layers, in order)")
    b: list[str] = option(help="ITDA runs or activation caches of model b (several: its layers, in the same order as a)")
    modality: str | None = option(None, help="modality of paired caches (image or text); needed when a cache holds both")
    k: int = option(8, help="matching-pursuit steps of the ITDAs built on caches")
    threshold: float = option(0.1, help="fraction of a row's squared norm left unexplained above which it becomes an atom")
    capacity: int = option(4096, help="largest dictionary of the ITDAs built on caches")
    max_rows: int | None = option(None, help="read only the first N rows of every cache (default: all)")
    cka: bool = option(True, help="also compute linear CKA (caches only)")
    out: str | None = option(None, help="write the result as JSON to this file")
    overwrite: bool = option(False, help="replace an existing out file")


@register_task("similarity")
class SimilarityTask(Task):
    summary = "ITDA Jaccard similarity (and linear CKA) between models or layers, with layer matching"
    config_class = SimilarityConfig
    output_fields = ()
    output_file_fields = ("out",)

    @classmethod
    def run(cls, config: SimilarityConfig) -> dict[str, Any]:
        if config.out and Path(config.out).exists() and not config.overwrite:
            raise VlsaeError(f"{config.out} exists; pass another --out or --overwrite to replace it")
        settings = ITDASettings(k=config.k, threshold=config.threshold, capacity=config.capacity)
        result = compare(config.a, config.b, modality=config.modality, settings=settings, max_rows=config.max_rows,
                         cka=config.cka)
        if config.out:
            atomic_write_text(config.out, json.dumps(result, indent=2) + "\n")
            result["out"] = config.out
        return result

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        lines = [f"{result['kind']}: {result['rows']} rows; atoms a {result['atoms']['a']}, b {result['atoms']['b']}"]
        for name in ("jaccard", "cka"):
            matrix = result.get(name)
            if matrix is None:
                continue
            lines.append(f"{'ITDA Jaccard' if name == 'jaccard' else 'linear CKA'} (rows: a, columns: b)")
            lines += ["  " + " ".join(f"{v:.3f}" for v in row) for row in matrix]
        for measure, scores in (result.get("layer_matching") or {}).items():
            lines.append(f"layer matching ({'ITDA' if measure == 'itda' else 'CKA'}): {scores['accuracy']:.2f} "
                         f"(a->b {scores['a_to_b']:.2f}, b->a {scores['b_to_a']:.2f})")
        if result.get("out"):
            lines.append(f"wrote {result['out']}")
        return lines
