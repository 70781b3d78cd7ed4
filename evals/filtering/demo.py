"""The filtering step of ``vlsae demo``: filter a small noisy world with the demo's VL-SAE and with CLIPScore.

The demo trains a VL-SAE (``DEMO/vl``) on shapes-clip's embeddings of clean
ShapesWorld pairs. This step writes a small ShapesWorld with a ``noise``
fraction of corrupted captions (their json flags are the ground truth), keeps
the best half by the VL-SAE's image-caption concept overlap (``vl-overlap``)
and by CLIPScore, and writes one page linking both filter reports with each
scorer's detection AUROC and the kept half's precision. A rerun reuses the
world and replaces the two filter folders.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from multimodal.filtering import FilterConfig
from multimodal.shapesworld import ShapesWorldConfig, write_world
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_json, atomic_write_text, check_writable_dir

from evals.tasks.filter import run_filter

SCORERS = ("vl-overlap", "clipscore")


def filter_demo(demo: str | Path, out: str | Path | None = None, pairs: int = 600, noise: float = 0.4,
                keep: float = 0.5, progress: bool = False) -> dict[str, Any]:
    """Filter a noisy world with ``demo/vl`` and with CLIPScore; returns the headline figures and ``index``.

    ``demo``: the demo folder (its ``vl`` VL-SAE run is used); ``out``: where this step writes
    (default ``demo/filter``).
    """
    started = time.perf_counter()
    demo = Path(demo)
    if not (demo / "vl" / "config.json").is_file():
        raise VlsaeError(f"{demo / 'vl'} is not a finished VL-SAE run; run vlsae demo --out {demo} first")
    out = check_writable_dir(Path(out) if out is not None else demo / "filter")
    world = out / "world"
    if not (world / "world.json").is_file():
        write_world(ShapesWorldConfig(seed=101, noise=noise), world, n=pairs, shard_size=max(1, pairs // 2),
                    overwrite=True, progress=progress)
    found: dict[str, dict[str, Any]] = {}
    for scorer in SCORERS:
        result = run_filter(FilterConfig(scorer=scorer, model="shapes-clip", sae=str(demo / "vl") if scorer != "clipscore"
                                         else "", data=str(world), keep=keep, out=str(out / scorer), overwrite=True,
                                         progress=progress, batch_size=128))
        found[scorer] = {"detection": result["detection"], "index": f"{scorer}/index.html",
                         "kept": result["counts"]["kept"], "pairs": result["counts"]["pairs_scored"]}
    figures = {"auroc": {s: f["detection"]["auroc"] for s, f in found.items()},
               "precision": {s: f["detection"]["precision"] for s, f in found.items()},
               "recall": {s: f["detection"]["recall"] for s, f in found.items()},
               "clean_fraction": found[SCORERS[0]]["detection"]["clean_fraction"], "pairs": pairs,
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out / "index.html", _page(found, figures, keep))
    atomic_write_json(out / "filter_demo.json", {**figures, "scorers": found})
    return {**figures, "index": str(out / "index.html")}


def _page(found: dict[str, dict[str, Any]], figures: dict[str, Any], keep: float) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td><a href='{esc(f['index'])}'>{esc(s)}</a></td><td>{f['detection']['auroc']:.3f}</td>"
        f"<td>{f['detection']['precision']:.1%}</td><td>{f['detection']['recall']:.1%}</td><td>{f['kept']}</td></tr>"
        for s, f in found.items())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>filtering demo</title><style>body{{font-family:"
            f"sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.3em 1em;border-bottom:1px solid #ddd}}</style>"
            f"</head><body><h1>Filtering a noisy world</h1><p>{figures['pairs']} ShapesWorld pairs, "
            f"{1 - figures['clean_fraction']:.0%} with a corrupted caption (another image's, or one colour or shape "
            f"swapped). Each scorer keeps its best {keep:.0%}: the demo's VL-SAE by the overlap of the image's and the "
            f"caption's concepts, CLIPScore by the raw embeddings' cosine.</p><table><tr><th>scorer</th>"
            f"<th>detection AUROC</th><th>kept precision (clean)</th><th>kept recall</th><th>kept</th></tr>{rows}"
            f"</table><p>{figures['seconds']:.0f} s.</p></body></html>")
