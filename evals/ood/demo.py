"""The small OOD pass of ``vlsae demo``: its SAEs scored on held-out scenes against far and near OOD sets.

:func:`run_demo_ood` reads the demo's artifacts (``world/`` for the ShapesWorld
settings, ``acts/`` as the fit set: the in-distribution rows the SAEs were
trained on, ``vl/`` and ``topk-image/``), writes its own small sets (held-out
in-distribution scenes of the same world under another seed, noise, textures,
photographs when scikit-image is installed, and greyscale scenes as a near-OOD
covariate shift), runs :func:`evals.ood.run_ood` for each SAE with one shared
cache (so the sets are extracted and the zero-shot head embedded once) and
writes an ``index.html`` linking both reports.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from multimodal.cache_format import read_manifest
from multimodal.ood_data import write_ood_set
from multimodal.shapesworld import ShapesWorldConfig, write_world
from vlsae.config import from_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_text, check_writable_dir

from evals.ood.config import OODConfig
from evals.ood.run import run_ood

DEMO_SAES = ("vl", "topk-image")


def _photos_available() -> bool:
    try:
        import skimage  # noqa: F401
    except ImportError:
        return False
    return True


def _summary_n(path: Path, key: str) -> int | None:
    """The size an earlier call recorded in ``path`` (None when there is none)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record["summary"]["n"] if key == "world" else record["n"]


def _write_sets(demo: Path, data: Path, n_id: int, n_ood: int, progress: bool) -> dict[str, str]:
    """The ID and OOD shard folders (reused when an earlier call wrote the same sizes)."""
    settings = json.loads((demo / "world" / "world.json").read_text())["config"]
    seed = int(settings["seed"])
    id_dir = data / "id"
    if _summary_n(id_dir / "world.json", "world") != n_id:  # the same world, other records: held out by its seed
        write_world(from_dict(ShapesWorldConfig, {**settings, "seed": seed + 1}), id_dir, n=n_id, shard_size=n_id,
                    overwrite=True, progress=progress)
    kinds = ["noise", "texture"] + (["photo"] if _photos_available() else []) + ["greyscale"]
    grey_world = from_dict(ShapesWorldConfig, {**settings, "seed": seed + 2})
    ood = {}
    for kind in kinds:
        folder = data / kind
        if _summary_n(folder / "ood.json", "ood") != n_ood:
            write_ood_set(kind, folder, n=n_ood, shard_size=n_ood, image_size=grey_world.image_size, seed=seed,
                          world=grey_world, overwrite=True)
        ood[kind] = str(folder)
    return {"id": str(id_dir), **ood}


def run_demo_ood(demo: str | Path = "runs/demo", out: str | Path | None = None, n_id: int = 500, n_ood: int = 250,
                 bootstrap: int = 200, progress: bool = False) -> dict[str, Any]:
    """Score the demo's SAEs for OOD detection; returns headline figures and the path of ``index.html``.

    demo: the ``vlsae demo`` folder; out: where to write (default ``demo/ood``); n_id, n_ood: rows of
    the held-out ID set and of each OOD set; bootstrap: resamples of the intervals.
    """
    started, cpu = time.perf_counter(), time.process_time()
    demo = Path(demo)
    missing = [p for p in ("world/world.json", "acts/manifest.json", *(f"{s}/config.json" for s in DEMO_SAES))
               if not (demo / p).exists()]
    if missing:
        raise VlsaeError(f"{demo} lacks {missing[0]}; run vlsae demo --out {demo} first")
    out = check_writable_dir(Path(out) if out else demo / "ood")
    sets = _write_sets(demo, out / "data", n_id, n_ood, progress)
    model = read_manifest(demo / "acts")["source"]
    reports: dict[str, dict[str, Any]] = {}
    for sae in DEMO_SAES:
        reports[sae] = run_ood(OODConfig(sae=str(demo / sae), model=model, fit=str(demo / "acts"), id=sets["id"],
                                         ood={k: v for k, v in sets.items() if k != "id"}, out=str(out / sae),
                                         cache=str(out / "acts"), bootstrap=bootstrap, overwrite=True,
                                         progress=progress))
    headline = {sae: {name: {key: entry.get(key) for key in ("score", "auroc", "best_sae", "best_sae_auroc",
                                                             "best_baseline", "best_baseline_auroc", "verdict")}
                          for name, entry in report["best"].items()}
                for sae, report in reports.items()}
    seconds, cpu_seconds = round(time.perf_counter() - started, 1), round(time.process_time() - cpu, 1)
    atomic_write_text(out / "index.html", _index_page(headline, reports, seconds))
    return {"index": str(out / "index.html"), "best": headline, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "reports": {sae: report["index"] for sae, report in reports.items()},
            "rows": {name: s["rows"] for name, s in reports[DEMO_SAES[0]]["sets"].items()}}


def _index_page(headline: dict[str, dict[str, dict[str, Any]]], reports: dict[str, dict[str, Any]], seconds: float) -> str:
    rows = []
    for sae, by_set in headline.items():
        for name, entry in by_set.items():
            rows.append(f"<tr><td>{html.escape(sae)}</td><td>{html.escape(name)}</td>"
                        f"<td>{html.escape(str(entry['best_sae']))} {entry['best_sae_auroc']:.3f}</td>"
                        f"<td>{html.escape(str(entry['best_baseline']))} {entry['best_baseline_auroc']:.3f}</td>"
                        f"<td>{html.escape(str(entry['verdict']))}</td></tr>")
    links = "".join(f'<li><a href="{html.escape(sae)}/index.html">{html.escape(sae)}</a></li>' for sae in reports)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vlsae demo: OOD detection</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.3em .8em;border-bottom:1px solid #ddd}}</style>
</head><body><h1>OOD detection on the demo's SAEs</h1>
<p>Held-out ShapesWorld scenes (in-distribution) against each OOD set, AUROC of the best SAE score and of the
best raw-embedding baseline; the verdict comes from a paired bootstrap of their difference (tie: the interval holds 0).</p>
<table><tr><th>SAE</th><th>OOD set</th><th>best SAE score</th><th>best baseline</th><th>verdict</th></tr>{''.join(rows)}</table>
<p>Full reports:</p><ul>{links}</ul><p>{seconds:.0f} s.</p></body></html>
"""
