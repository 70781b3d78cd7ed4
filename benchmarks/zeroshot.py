"""Zero-shot alignment enhancement on ShapesWorld: plain vs VL-SAE concept term, and scoring speed.

    python benchmarks/zeroshot.py --models shapes-clip,shapes-clip-minilm --work /tmp/zs-bench
    python benchmarks/zeroshot.py --models shapes-clip --sae 256:8,40:20 --steps 1500 --threads 1

For each model:

1. an evaluation world (``--eval-seed``, single-object scenes, ``--n-eval``
   pairs: the validation and test splits) and a training world for the SAE
   (``--train-seed``, single-object scenes whose captions name every attribute,
   ``--n-train`` pairs); both are ShapesWorld seeds neither the zoo models nor
   each other have seen;
2. the model's final image and text embeddings of both, into activation caches;
3. a VL-SAE per ``--sae LATENTS:K`` trained by the project's trainer on the
   training cache (the "task-sized" SAEs);
4. ``vlsae zeroshot`` (:func:`evals.zeroshot.run.run_zeroshot`) on the evaluation cache: plain
   zero-shot (the zoo protocol, every description marginalised) vs the
   validation-chosen (variant, λ), reported on the test split with a paired
   bootstrap interval of the gain.

Every step reuses what an earlier run left in ``--work``. Prints one table per
model (attribute rows, SAE columns) and the scoring time of each run (the pass
over the cached embeddings, for every variant and λ).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from evals.zeroshot.run import run_zeroshot
from multimodal.extract import ExtractConfig, extract
from multimodal.shapesworld import ShapesWorldConfig, write_world
from vlsae.training.run import load_run_config, run_training


def _world(folder: Path, seed: int, n: int) -> None:
    if not (folder / "world.json").exists():
        write_world(ShapesWorldConfig(seed=seed, max_objects=1, mention_size=1.0, mention_position=1.0), folder, n=n,
                    shard_size=2000, overwrite=True, progress=False)


def _cache(model: str, world: Path, out: Path) -> None:
    manifest = out / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        extract(ExtractConfig(model=model, data=str(world), out=str(out), hook="final", batch_size=256, progress=False,
                              overwrite=True))


def _sae(acts: Path, out: Path, latents: int, k: int, steps: int, seed: int) -> dict:
    if not (out / "training.json").exists():
        run = load_run_config(None, base={"arch": "vl", "sae": {"n_latents": latents, "k": k}, "data": {"acts": str(acts)},
                                          "out": str(out), "train": {"steps": steps, "batch_size": 256, "lr": 2e-3,
                                                                     "seed": seed, "progress": False, "eval_rows": 2048,
                                                                     "tensorboard": False}})
        run_training(run)
    return json.loads((out / "training.json").read_text())["summary"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shapes-clip,shapes-clip-minilm", help="comma-separated adapter specs")
    parser.add_argument("--sae", default="256:8", help="comma-separated LATENTS:K of the VL-SAEs to train")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per SAE")
    parser.add_argument("--seed", type=int, default=0, help="SAE training seed")
    parser.add_argument("--n-eval", type=int, default=10_000, help="evaluation pairs (validation + test)")
    parser.add_argument("--n-train", type=int, default=10_000, help="SAE training pairs")
    parser.add_argument("--eval-seed", type=int, default=1, help="ShapesWorld seed of the evaluation pairs")
    parser.add_argument("--train-seed", type=int, default=2, help="ShapesWorld seed of the SAE's training pairs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's setting)")
    parser.add_argument("--work", default="/tmp/vlsae-zeroshot-bench", help="folder for worlds, caches, SAEs, reports")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    console = Console()
    _world(work / "eval_world", args.eval_seed, args.n_eval)
    _world(work / "train_world", args.train_seed, args.n_train)
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        name = model.replace(":", "_").replace("/", "_")
        _cache(model, work / "eval_world", work / name / "eval_acts")
        _cache(model, work / "train_world", work / name / "train_acts")
        runs = {}
        for spec in args.sae.split(","):
            latents, k = (int(v) for v in spec.split(":"))
            folder = work / name / f"vl-{latents}-{k}-s{args.seed}"
            summary = _sae(work / name / "train_acts", folder, latents, k, args.steps, args.seed)
            started = time.perf_counter()
            # the zeroshot task's function (run_task would import every task module, and a script run from
            # benchmarks/ has benchmarks/steering.py shadowing the steering package on sys.path)
            result = run_zeroshot(folder, model, str(work / "eval_world"), folder / "zeroshot",
                                  acts=str(work / name / "eval_acts"), overwrite=True, progress=False)
            runs[spec] = (result, summary, time.perf_counter() - started)
        table = Table(title=f"{model}: test accuracy (%) plain -> enhanced (gain [95 % CI]; variant, λ chosen on validation)")
        table.add_column("attribute")
        table.add_column("plain", justify="right")
        for spec in runs:
            table.add_column(f"vl {spec}", justify="right")
        first = next(iter(runs.values()))[0]
        for i, row in enumerate(first["attributes"]):
            cells = [row["attribute"], f"{100 * row['plain_test']:.1f}"]
            for result, _, _ in runs.values():
                r = result["attributes"][i]
                cells.append(f"{100 * r['enhanced_test']:.1f} ({100 * r['gain']:+.2f} [{100 * r['gain_low']:+.2f}, "
                             f"{100 * r['gain_high']:+.2f}]; {r['variant']}, {r['lam']:g})")
            table.add_row(*cells)
        table.add_row("mean gain", "", *[f"{100 * r['mean_gain']:+.2f}" for r, _, _ in runs.values()])
        table.add_row("SAE FVU img / txt", "", *[f"{s['fvu_image']:.3f} / {s['fvu_text']:.3f}" for _, s, _ in runs.values()])
        table.add_row("scoring s / total s", "", *[f"{r['seconds']['scoring']:.2f} / {t:.1f}" for r, _, t in runs.values()])
        table.add_row("records (val + test)", "", *[str(r["records"]) for r, _, _ in runs.values()])
        console.print(table)


if __name__ == "__main__":
    main()
