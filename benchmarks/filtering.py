"""The SAE-V filtering experiment and the filter's speed, as tables.

    python benchmarks/filtering.py --out runs/filtering                  # detection + alignment, both regimes
    python benchmarks/filtering.py --out /tmp/f --pairs 2000 --no-arms   # detection only, small
    python benchmarks/filtering.py --speed-only                          # throughput and scoring overhead

The experiment is :func:`evals.filtering.experiment.run_experiment` (see its
docstring: a noisy ShapesWorld, every scorer through ``vlsae filter``'s code,
shapes-clip's recipe trained on each kept half, a pretrained and a bootstrap
regime); it resumes from ``--out``. The speed table times, on prepared batches,
the model's bare forward pass against forward + SAE encode + score (target:
at most +10 % for ``open_clip:ViT-B-32:random``: the SAE part is a sparse
encode of one embedding per pair and modality). Torch runs one thread per
process here: on a shared 2-core machine two threads per process measured
several times slower than one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.filtering.alignment import mean_interval  # noqa: E402
from evals.filtering.experiment import ExperimentConfig, run_experiment  # noqa: E402
from multimodal.adapters import create_adapter  # noqa: E402
from multimodal.filtering import PairBatch, create_scorer  # noqa: E402
from multimodal.pairs import iter_pairs  # noqa: E402
from multimodal.shapesworld import ShapesWorldConfig, write_world  # noqa: E402
from vlsae.saes import create_sae  # noqa: E402


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def detection_table(found) -> None:
    rows = []
    for regime, scorers in found.detection.items():
        for scorer, d in scorers.items():
            timing = found.filters[regime][scorer]["timing"]
            rows.append([f"{regime} {scorer}" if scorer != "random" else "random", "–" if d.get("auroc") is None
                         else f"{d['auroc']:.3f}", _pct(d.get("precision")), _pct(d.get("recall")),
                         f"{timing.get('pairs_per_second') or '–'}"])
    _table("detection of corrupted captions (clean = positive); kept = the best half", ["scorer", "AUROC",
           "kept precision", "kept recall", "scoring pairs/s"], rows)


def alignment_table(found) -> None:
    full = found.arms.get("full")
    rows = []
    for name, arm in found.arms.items():
        z = arm.zero_shot
        ratio = f"{arm.mean_zero_shot / full.mean_zero_shot:.1%}" if full else "–"
        rows.append([name, str(arm.pairs), *(f"{z[a]:.1%}" for a in ("shape", "colour", "size", "position")),
                     f"{arm.mean_zero_shot:.1%} ± {mean_interval(z, 1000):.1%}", ratio,
                     f"{arm.retrieval['image_to_text']:.1%}", f"{arm.retrieval['text_to_image']:.1%}",
                     f"{arm.seconds:.0f}"])
    _table("alignment: shapes-clip recipe trained on each arm's pairs (same seed, steps, batch), clean held-out scenes",
           ["arm", "pairs", "shape", "colour", "size", "position", "mean zero-shot", "vs full", "R@1 i→t", "R@1 t→i",
            "s"], rows)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def speed(model: str, pairs: int, batch_size: int, repeats: int, latents: int, k: int) -> list[list[str]]:
    """Bare forward vs forward + SAE encode + score on one prepared batch (median of repeats)."""
    adapter = create_adapter(model, device="cpu")
    with tempfile.TemporaryDirectory(prefix="vlsae-filter-bench-") as tmp:
        size = 224 if model.startswith("open_clip:ViT") else 64
        data = write_world(ShapesWorldConfig(image_size=size), Path(tmp) / "w", n=pairs, shard_size=pairs,
                           progress=False)["pattern"]
        records = list(itertools.islice(iter_pairs(data), batch_size))
    hook, tokens = ("layers.1", "all") if "llava" in model else ("final", "cls")
    prepared = adapter.prepare(records, modalities=["image", "text"])
    width = adapter.widths(hook)["image"]
    vl = create_sae("vl", d_in=width, n_latents=latents, k=k, modalities=["image", "text"]).eval()
    token = create_sae("batchtopk", d_in=width, n_latents=latents, k=k).eval()
    bare = _median_seconds(lambda: adapter.forward(prepared, hook, tokens), repeats)
    rows = [[model, "bare forward", f"{bare * 1e3:.1f}", "", f"{batch_size / bare:.0f}"]]
    scorers = ["clipscore", "vl-overlap", "cooc-l0"] if "llava" not in model else ["saev", "l0", "cooc-l0"]
    for name in scorers:
        scorer = create_scorer(name)
        sae = None if name == "clipscore" else (token if "llava" in model else vl)
        if name == "saev":
            scorer.load_state({"weights": torch.rand(latents, dtype=torch.float64),
                               "weighted": torch.ones(latents, dtype=torch.uint8)})

        def run() -> None:
            out = adapter.forward(prepared, hook, tokens)
            with torch.no_grad():
                scorer.score(PairBatch(keys=[r.key for r in records], acts=out.acts, pair_index=out.pair_index, sae=sae))

        seconds = _median_seconds(run, repeats)
        rows.append([model, name, f"{seconds * 1e3:.1f}", f"{seconds / bare - 1:+.1%}", f"{batch_size / seconds:.0f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/filtering", help="experiment folder (default: runs/filtering)")
    parser.add_argument("--pairs", type=int, default=20_000, help="pairs of the noisy world (default: 20000)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of every arm (default: 400)")
    parser.add_argument("--regimes", default="pretrained,bootstrap", help="comma-separated (default: both)")
    parser.add_argument("--no-arms", action="store_true", help="detection only, no alignment arms")
    parser.add_argument("--speed-only", action="store_true", help="only the speed table")
    parser.add_argument("--no-speed", action="store_true", help="no speed table")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if not args.speed_only:
        config = ExperimentConfig(out=args.out, pairs=args.pairs, regimes=args.regimes.split(","),
                                  arm={"steps": args.steps, "threads": args.threads}, train_arms=not args.no_arms,
                                  progress=not args.quiet)
        started = time.perf_counter()
        found = run_experiment(config, log=lambda line: print(f"[{time.perf_counter() - started:7.0f} s] {line}",
                                                               flush=True))
        detection_table(found)
        if found.arms:
            alignment_table(found)
    if not args.no_speed:
        rows = []
        for model in ("shapes-clip", "shapes-llava", "open_clip:ViT-B-32:random"):
            rows += speed(model, pairs=64, batch_size=64, repeats=5, latents=4096 if "ViT" in model else 256,
                          k=32 if "ViT" in model else 8)
        _table(f"scoring speed, one prepared batch of 64 pairs, CPU, {torch.get_num_threads()} torch thread(s)",
               ["model", "scorer", "ms/batch", "over bare forward", "pairs/s"], rows)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "speed.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
