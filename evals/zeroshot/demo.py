"""The demo's zero-shot pass: a small ``vlsae zeroshot`` run and the downstream fidelity of its SAEs.

:func:`demo_zeroshot` runs on the artifacts ``vlsae demo`` leaves in its folder:
``world/`` (the labels of its single-object scenes), ``acts/`` (their cached
shapes-clip final image embeddings, so no image is run through the model
again), ``vl/`` (the VL-SAE whose concept term is mixed in) and
``topk-image/`` (a single-stream SAE on the image embeddings, whose fidelity
is measured with images spliced only). The prompts are embedded once and
shared by both parts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from multimodal.adapters import create_adapter
from vlsae.checkpoint import load_sae
from vlsae.files import atomic_write_text

from evals.zeroshot.data import cached_images, read_labels
from evals.zeroshot.fidelity import mean_recovered, spliced_accuracy, spliced_modalities
from evals.zeroshot.head import shapesworld_head
from evals.zeroshot.run import run_zeroshot

DEMO_MODEL = "shapes-clip"


def demo_zeroshot(demo: str | Path, out: str | Path, model: str = DEMO_MODEL, resamples: int = 500) -> dict[str, Any]:
    """Zero-shot plain vs enhanced with ``demo/vl`` on the single-object scenes of ``demo/world``,
    plus the zero-shot fidelity of ``demo/vl`` and ``demo/topk-image``; writes ``out`` (index.html,
    results.json, predictions.csv, fidelity.json). Returns the headline figures and ``index``."""
    started = time.perf_counter()
    demo = Path(demo)
    adapter = create_adapter(model, device="cpu")
    head = shapesworld_head(adapter)
    result = run_zeroshot(demo / "vl", model, str(demo / "world"), out, acts=str(demo / "acts"), resamples=resamples,
                          overwrite=True, progress=False, adapter=adapter, head=head)
    keys, labels, _ = read_labels(str(demo / "world"), head.classes)
    image = cached_images(demo / "acts", keys, model)
    fidelity = {}
    for name in ("vl", "topk-image"):
        if (demo / name).is_dir():
            sae = load_sae(demo / name).eval()
            modalities = spliced_modalities(sae, demo / name)
            spliced = spliced_accuracy(head, sae, image, labels, modalities)
            fidelity[name] = {"spliced": list(modalities), "attributes": spliced,
                              "mean_recovered": mean_recovered(spliced, "both" if len(modalities) == 2 else modalities[0])}
    atomic_write_text(Path(out) / "fidelity.json", json.dumps(fidelity, indent=2))
    by_attribute = {r["attribute"]: r for r in result["attributes"]}
    return {
        "index": result["index"],
        "records": result["records"],
        "plain_test": {a: r["plain_test"] for a, r in by_attribute.items()},
        "enhanced_test": {a: r["enhanced_test"] for a, r in by_attribute.items()},
        "chosen": {a: f"{r['variant']} λ={r['lam']:g}" for a, r in by_attribute.items()},
        "mean_gain": result["mean_gain"],
        "fidelity_recovered": {name: f["mean_recovered"] for name, f in fidelity.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
