"""The demo's steering step: a small text-encoder SAE for shapes-diffusion, trained on the demo's captions, and
one prompt steered with it.

1. extract ``text_encoder.blocks.1`` of shapes-diffusion (its text encoder is shapes-clip's 3-block tower;
   the second-to-last block, as Concept Steerers take block 9 of SD 1.4's 12) on the captions of the demo's
   ``world/`` (the images are not read), every token of each caption;
2. train a TopK SAE on those token states;
3. steer "a large red circle" toward ``colour=blue`` by clamping (the colour set to blue, the other colours'
   latents to 0) at a row of strengths, 4 seeds, judged by the pixel colour check and shapes-clip.

Each step reuses what a previous run finished in ``out``, as the rest of the demo does.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vlsae.files import check_writable_dir
from vlsae.training.run import load_run_config, run_training

from multimodal.extract import ExtractConfig, extract
from steering.features import parse_feature

from evals.steering.judging import JudgePanel
from evals.steering.run import prepare, steer_run
from evals.steering.sweep import Generation

HOOK = "text_encoder.blocks.1"


def _complete(acts: Path) -> bool:
    manifest = acts / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


def run_demo_steering(demo: str | Path, out: str | Path, pairs: int = 2000, steps: int = 600,
                      strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0), seeds: int = 4,
                      progress: bool = True) -> dict[str, Any]:
    """Train the text-encoder SAE on ``demo/world`` captions and steer one prompt; write ``out/index.html``.

    Returns the headline figures (pixel-judge flip rate to blue at the last strength, the best strength whose
    shape reading by shapes-clip stays within 10 points of the unsteered one, SAE FVU) and ``index``.
    """
    demo, out = Path(demo), check_writable_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    start = time.perf_counter()
    acts = out / "acts-text"
    if not _complete(acts):
        extract(ExtractConfig(model="shapes-diffusion", data=str(demo / "world"), hook=HOOK, tokens="all",
                              out=str(acts), limit=pairs, batch_size=128, progress=progress, overwrite=True))
    timing["extract"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    sae = out / "sae-text"
    if (sae / "training.json").is_file():
        summary = json.loads((sae / "training.json").read_text())["summary"]
    else:
        run = load_run_config(None, base={"arch": "topk", "sae": {"n_latents": 256, "k": 16},
                                          "data": {"acts": str(acts)}, "out": str(sae),
                                          "train": {"steps": steps, "batch_size": 1024, "lr": 2e-3,
                                                    "checkpoint_every": steps, "progress": progress,
                                                    "eval_rows": 2048}})
        summary = run_training(run, resume=(sae / "checkpoint").is_dir()).summary
    timing["train"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    setup = prepare("shapes-diffusion", str(sae))
    panel = JudgePanel.load(("pixel", "clip"))
    result = steer_run(setup, out / "steer", "a large red circle", parse_feature("colour=blue"), "clamp",
                       list(strengths), seeds, panel, Generation(), overwrite=True)
    timing["steer"] = round(time.perf_counter() - start, 1)
    rows = result["strengths"]
    unsteered_shape = rows[0]["judges"]["clip"]["preserve_unsteered"]["shape"]
    kept = [r for r in rows if r["judges"]["clip"]["preserve"]["shape"] >= unsteered_shape - 0.10]
    best = max(kept or rows, key=lambda r: r["judges"]["pixel"]["flip"])
    return {"fvu": summary.get("fvu"), "l0": summary.get("l0"), "hook": HOOK,
            "flip_rate": rows[-1]["judges"]["pixel"]["flip"], "strength": rows[-1]["strength"],
            "best_strength": best["strength"], "best_flip_rate": best["judges"]["pixel"]["flip"],
            "best_shape_kept": best["judges"]["clip"]["preserve"]["shape"], "shape_unsteered": unsteered_shape,
            "seconds": timing, "index": result["index"]}


__all__ = ["HOOK", "run_demo_steering"]
