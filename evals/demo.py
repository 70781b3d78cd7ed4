"""``vlsae demo``: the whole pipeline on the embedded default, in one command.

1. the planted-feature leaderboard (hierarchical suite: does each SAE recover a known tree?);
2. a small ShapesWorld (image-caption pairs with planted concepts);
3. shapes-clip (an open_clip CLIP trained on ShapesWorld; trained once, then cached);
4. activation extraction into a cache (final image and text embeddings, paired by key);
5. a TopK SAE on the image embeddings and a VL-SAE on the image-text pairs;
6. the VL-SAE concept report (HTML).

Every step writes into one folder and reuses what a previous run of the demo
already finished there, so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vlsae.errors import VlsaeError


def _step(name: str, progress: bool) -> float:
    if progress:
        print(f"\n== {name}", flush=True)
    return time.perf_counter()


def _train_or_reuse(out: Path, arch: str, sae: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int,
                    progress: bool) -> dict[str, Any]:
    from vlsae.training.run import load_run_config, run_training
    if (out / "training.json").exists():
        return json.loads((out / "training.json").read_text())["summary"]
    resume = (out / "checkpoint").is_dir()
    run = load_run_config(None, base={"arch": arch, "sae": sae, "data": data, "out": str(out),
                                      "train": {"steps": steps, "batch_size": batch_size, "lr": 2e-3,
                                                "checkpoint_every": max(1, steps // 4), "progress": progress,
                                                "eval_rows": 2048}})
    return run_training(run, resume=resume).summary


def run_demo(out: str | Path = "runs/demo", pairs: int = 4000, steps: int = 1500, synth: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Run every stage; returns the figures of each (also written to ``out/demo.json``)."""
    from multimodal.extract import ExtractConfig, extract
    from multimodal.shapesworld import ShapesWorldConfig, write_world
    from multimodal.zoo import load_model
    from vlsae.files import atomic_write_text
    from vlsae.training.log import print_summary

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlsaeError(f"{out} is a file; give a folder for the demo")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}

    if synth:
        t = _step("1/6 planted-feature leaderboard (hierarchical suite)", progress)
        from evals.synthetic.leaderboard import run_suite
        rows = run_suite("hierarchical", None, seed=0, out=out / "leaderboard.json", overwrite=True, show=progress)
        results["leaderboard"] = rows
        timings["leaderboard"] = time.perf_counter() - t

    t = _step("2/6 ShapesWorld pairs", progress)
    world = out / "world"
    if not (world / "world.json").exists():
        write_world(ShapesWorldConfig(seed=0), world, n=pairs, shard_size=1000, overwrite=True, progress=progress)
    timings["world"] = time.perf_counter() - t

    t = _step("3/6 shapes-clip (trained on first use, then cached)", progress)
    load_model("shapes-clip")
    timings["shapes-clip"] = time.perf_counter() - t

    t = _step("4/6 extract final CLIP embeddings (image and text, paired by key)", progress)
    acts = out / "acts"
    if not (acts / "manifest.json").exists() or not json.loads((acts / "manifest.json").read_text()).get("complete"):
        extract(ExtractConfig(model="shapes-clip", data=str(world), hook="final", out=str(acts), batch_size=128,
                              progress=progress))
    timings["extract"] = time.perf_counter() - t

    t = _step("5/6 train a TopK SAE (image embeddings) and a VL-SAE (image-text pairs)", progress)
    results["topk"] = _train_or_reuse(out / "topk-image", "topk", {"n_latents": 256, "k": 8},
                                      {"acts": str(acts), "modality": "image"}, steps, 256, progress)
    # 40 concepts, half of them active: a little above ShapesWorld's 36 planted values; wider and sparser,
    # the nearest-concept encoder learns whole scenes instead of attributes (benchmarks/vl_shapesworld.py)
    results["vl"] = _train_or_reuse(out / "vl", "vl", {"n_latents": 40, "k": 20}, {"acts": str(acts)}, steps, 256, progress)
    timings["train"] = time.perf_counter() - t

    t = _step("6/6 concept report of the VL-SAE", progress)
    from evals.concepts import concepts_report
    report = concepts_report(out / "vl", str(world), "shapes-clip", out / "concepts", limit=min(pairs, 2000),
                             overwrite=True, progress=progress)
    results["concepts"] = {k: v for k, v in report.items() if k != "planted_matches"}
    timings["concepts"] = time.perf_counter() - t
    results["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_text(out / "demo.json", json.dumps(results, indent=2, default=str))

    if progress:
        planted = report.get("planted") or {}
        print_summary({
            "TopK (image) FVU / L0": f"{results['topk']['fvu']:.3f} / {results['topk']['l0']:.1f}",
            "VL-SAE FVU image / text": f"{results['vl']['fvu_image']:.3f} / {results['vl']['fvu_text']:.3f}",
            "VL-SAE multimodal latents": f"{report['multimodal_fraction']:.0%}",
            "planted values: same latent img/txt": f"{planted.get('same_index_rate', float('nan')):.0%}",
            "concept report": report["index"],
            "total seconds": round(sum(timings.values()), 1),
        }, title=f"vlsae demo -> {out}")
    return results
