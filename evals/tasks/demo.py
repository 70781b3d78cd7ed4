"""Task ``demo``: the whole pipeline on the embedded default, in one command (``vlsae demo``).

1. the planted-feature leaderboard (hierarchical suite: does each SAE recover a known tree?);
2. a small ShapesWorld (image-caption pairs with planted concepts);
3. shapes-clip (an open_clip CLIP trained on ShapesWorld; shipped, else trained once and cached);
4. activation extraction into a cache (final image and text embeddings, paired by key);
5. a TopK SAE on the image embeddings and a VL-SAE on the image-text pairs;
6. the VL-SAE concept report (HTML);
7. OOD detection with both SAEs against the raw-embedding baselines (near- and far-OOD sets);
8. zero-shot classification, plain and with the VL-SAE's concept-level matching;
9. data filtering of a noisy world with the VL-SAE scorer and CLIPScore;
10. diffusion steering: a TopK SAE on shapes-diffusion's text encoder, one prompt steered toward blue.

It is a task like the others, composed of them: the leaderboard is the
``synth`` task's work, the report the ``concepts`` task's. Every step writes
into one folder and reuses what an earlier run of the demo finished there, so
an interrupted demo continues where it stopped. ``out/index.html`` links every
result; each application joins the demo as one more step and one more link.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from multimodal.extract import ExtractConfig, extract
from multimodal.shapesworld import ShapesWorldConfig, write_world
from multimodal.zoo import load_model
from vlsae.config import option
from vlsae.files import atomic_write_json, atomic_write_text, check_writable_dir
from vlsae.training.log import print_summary
from vlsae.training.run import load_run_config, run_training

from evals.concepts import concepts_report
from evals.filtering.demo import filter_demo
from evals.ood.demo import run_demo_ood
from evals.steering.demo import run_demo_steering
from evals.zeroshot.demo import demo_zeroshot
from evals.synthetic.leaderboard import run_suite
from evals.tasks import register_task
from evals.tasks.base import Task


# The demo's leaderboard: the classic single-stream family, a fixed list so that a newly registered
# architecture does not lengthen the demo (`vlsae synth --suite hierarchical` runs every one).
LEADERBOARD_ARCHS = ("topk", "batchtopk", "relu", "jumprelu", "abstopk", "mp", "matryoshka")


@dataclass
class DemoConfig:
    out: str = option("runs/demo", help="demo folder, reused and continued if it exists")
    pairs: int = option(4000, help="ShapesWorld pairs to generate")
    steps: int = option(1500, help="training steps per SAE")
    synth: bool = option(True, help="run the planted-feature leaderboard first")
    applications: bool = option(True, help="run the applications on the demo's SAEs (OOD, zero-shot, filtering, steering)")
    progress: bool = option(True, help="progress bars, step headers and the summary table")


def _step(name: str, progress: bool) -> float:
    if progress:
        print(f"\n== {name}", flush=True)
    return time.perf_counter()


def _train_or_reuse(out: Path, arch: str, sae: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int,
                    progress: bool) -> dict[str, Any]:
    if (out / "training.json").exists():
        return json.loads((out / "training.json").read_text())["summary"]
    resume = (out / "checkpoint").is_dir()
    run = load_run_config(None, base={"arch": arch, "sae": sae, "data": data, "out": str(out),
                                      "train": {"steps": steps, "batch_size": batch_size, "lr": 2e-3,
                                                "checkpoint_every": max(1, steps // 4), "progress": progress,
                                                "eval_rows": 2048}})
    return run_training(run, resume=resume).summary


def _extraction_complete(acts: Path) -> bool:
    manifest = acts / "manifest.json"
    return manifest.exists() and bool(json.loads(manifest.read_text()).get("complete"))


def run_demo(out: str | Path = "runs/demo", pairs: int = 4000, steps: int = 1500, synth: bool = True,
             progress: bool = True, applications: bool = True) -> dict[str, Any]:
    """Run every stage; returns the figures of each (also written to ``out/demo.json``)."""
    out = check_writable_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    links: list[tuple[str, str, str]] = []  # (title, relative path, one-line figure)

    if synth:
        t = _step("1/10 planted-feature leaderboard (hierarchical suite)", progress)
        rows = run_suite("hierarchical", list(LEADERBOARD_ARCHS), seed=0, out=out / "leaderboard.json", overwrite=True,
                         show=progress)
        results["leaderboard"] = rows
        timings["leaderboard"] = time.perf_counter() - t
        links.append(("planted-feature leaderboard", "leaderboard.json", f"{len(rows)} architectures scored"))

    t = _step("2/10 ShapesWorld pairs", progress)
    world = out / "world"
    if not (world / "world.json").exists():
        write_world(ShapesWorldConfig(seed=0), world, n=pairs, shard_size=1000, overwrite=True, progress=progress)
    timings["world"] = time.perf_counter() - t
    links.append(("ShapesWorld pairs", "world/world.json", f"{pairs} image-caption pairs"))

    t = _step("3/10 shapes-clip (trained on first use, then cached)", progress)
    load_model("shapes-clip")
    timings["shapes-clip"] = time.perf_counter() - t

    t = _step("4/10 extract final CLIP embeddings (image and text, paired by key)", progress)
    acts = out / "acts"
    if not _extraction_complete(acts):
        extract(ExtractConfig(model="shapes-clip", data=str(world), hook="final", out=str(acts), batch_size=128,
                              progress=progress))
    timings["extract"] = time.perf_counter() - t
    links.append(("activation cache", "acts/manifest.json", "shapes-clip final embeddings"))

    t = _step("5/10 train a TopK SAE (image embeddings) and a VL-SAE (image-text pairs)", progress)
    results["topk"] = _train_or_reuse(out / "topk-image", "topk", {"n_latents": 256, "k": 8},
                                      {"acts": str(acts), "modality": "image"}, steps, 256, progress)
    # 40 concepts, half of them active: a little above ShapesWorld's 36 planted values; wider and sparser,
    # the nearest-concept encoder learns whole scenes instead of attributes (benchmarks/vl_shapesworld.py)
    results["vl"] = _train_or_reuse(out / "vl", "vl", {"n_latents": 40, "k": 20}, {"acts": str(acts)}, steps, 256, progress)
    timings["train"] = time.perf_counter() - t
    links.append(("TopK SAE on image embeddings", "topk-image/training.json",
                  f"FVU {results['topk']['fvu']:.3f}, L0 {results['topk']['l0']:.1f}"))
    links.append(("VL-SAE on image-caption pairs", "vl/training.json",
                  f"FVU image {results['vl']['fvu_image']:.3f}, text {results['vl']['fvu_text']:.3f}"))

    t = _step("6/10 concept report of the VL-SAE", progress)
    report = concepts_report(out / "vl", str(world), "shapes-clip", out / "concepts", limit=min(pairs, 2000),
                             overwrite=True, progress=progress)
    results["concepts"] = {k: v for k, v in report.items() if k != "planted_matches"}
    timings["concepts"] = time.perf_counter() - t
    planted = report.get("planted") or {}
    links.append(("VL-SAE concept report", "concepts/index.html",
                  f"{report['multimodal_fraction']:.0%} multimodal latents; planted values on one latent in both "
                  f"modalities: {planted.get('same_index_rate', float('nan')):.0%} "
                  f"({planted.get('exclusive_same_index_rate', float('nan')):.0%} exclusively)"))

    if applications:
        t = _step("7/10 OOD detection: SAE scores against raw-embedding baselines", progress)
        ood = run_demo_ood(out, out / "ood", progress=progress)
        results["ood"] = {k: v for k, v in ood.items() if k != "reports"}
        timings["ood"] = time.perf_counter() - t
        links.append(("OOD detection", "ood/index.html", _ood_headline(ood)))

        t = _step("8/10 zero-shot classification, plain and with concept-level matching", progress)
        zeroshot = demo_zeroshot(out, out / "zeroshot")
        results["zeroshot"] = zeroshot
        timings["zeroshot"] = time.perf_counter() - t
        links.append(("zero-shot enhancement", "zeroshot/index.html",
                      f"mean test gain {100 * zeroshot['mean_gain']:+.1f} points over the plain protocol"))

        t = _step("9/10 filtering a noisy world: VL-SAE scorer and CLIPScore", progress)
        filtering = filter_demo(out, out / "filter", progress=progress)
        results["filter"] = filtering
        timings["filter"] = time.perf_counter() - t
        links.append(("data filtering", "filter/index.html",
                      "detection AUROC " + ", ".join(f"{s} {a:.2f}" for s, a in filtering["auroc"].items())))

        t = _step("10/10 steering shapes-diffusion through a text-encoder SAE", progress)
        steer = run_demo_steering(out, out / "steer", progress=progress)
        results["steer"] = steer
        timings["steer"] = time.perf_counter() - t
        page = Path(steer["index"])
        links.append(("diffusion steering", str(page.relative_to(out)) if page.is_relative_to(out) else str(page),
                      f"'a large red circle' toward blue: pixel flip {steer['best_flip_rate']:.0%} at strength "
                      f"{steer['best_strength']:g}, shape kept {steer['best_shape_kept']:.0%} "
                      f"(unsteered {steer['shape_unsteered']:.0%})"))

    results["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_json(out / "demo.json", results)
    atomic_write_text(out / "index.html", _index_page(links, results["seconds"]))

    if progress:
        print_summary({
            "TopK (image) FVU / L0": f"{results['topk']['fvu']:.3f} / {results['topk']['l0']:.1f}",
            "VL-SAE FVU image / text": f"{results['vl']['fvu_image']:.3f} / {results['vl']['fvu_text']:.3f}",
            "VL-SAE multimodal latents": f"{report['multimodal_fraction']:.0%}",
            "planted values: same latent img/txt": f"{planted.get('same_index_rate', float('nan')):.0%}",
            "  ... exclusively (no catch-all)": f"{planted.get('exclusive_same_index_rate', float('nan')):.0%}",
            "demo report": str(out / "index.html"),
            "total seconds": round(sum(timings.values()), 1),
        }, title=f"vlsae demo -> {out}")
    return results


def _ood_headline(ood: dict[str, Any]) -> str:
    """One line: per SAE, on how many OOD sets its best score is ahead of, tied with or behind the best baseline."""
    parts = []
    for sae, sets in ood["best"].items():
        verdicts = [entry.get("verdict") for entry in sets.values()]
        parts.append(f"{sae}: SAE ahead on {verdicts.count('sae')}, tie on {verdicts.count('tie')}, "
                     f"baseline ahead on {verdicts.count('baseline')} of {len(verdicts)} sets")
    return "; ".join(parts)


def _index_page(links: list[tuple[str, str, str]], seconds: dict[str, float]) -> str:
    """One offline page linking every result of the demo, with its headline figure."""
    rows = "\n".join(f'<tr><td><a href="{html.escape(path)}">{html.escape(title)}</a></td><td>{html.escape(figure)}</td></tr>'
                     for title, path, figure in links)
    timing = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vlsae demo</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:.3em 1em;border-bottom:1px solid #ddd}}</style>
</head><body>
<h1>vlsae demo</h1>
<p>The whole pipeline on the embedded default (ShapesWorld + shapes-clip). Every result, with its headline figure:</p>
<table>{rows}</table>
<p>Time per step: {html.escape(timing)}; total {sum(seconds.values()):.0f} s.</p>
</body></html>
"""


@register_task("demo")
class DemoTask(Task):
    summary = ("the whole pipeline offline: leaderboard, ShapesWorld, shapes-clip, extraction, TopK + VL-SAE, concept report, "
               "OOD detection, zero-shot, filtering, steering")
    config_class = DemoConfig

    @classmethod
    def run(cls, config: DemoConfig) -> dict[str, Any]:
        results = run_demo(config.out, pairs=config.pairs, steps=config.steps, synth=config.synth,
                           progress=config.progress, applications=config.applications)
        return {**results, "index": str(Path(config.out) / "index.html")}

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        folder = Path(result["index"]).parent
        return [f"demo finished: {folder / 'demo.json'}, report in {result['index']}"]
