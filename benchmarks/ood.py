"""OOD detection on the embedded default: SAE scores against raw-embedding baselines, near and far OOD.

    python benchmarks/ood.py                                   # shapes-clip and shapes-clip-minilm, vl / topk / vl-split
    python benchmarks/ood.py --models shapes-clip --archs topk --out /tmp/ood-bench

In-distribution is a ShapesWorld with held-out values (a shape, a colour, a
shape+colour combination): the SAEs and every reference statistic see only its
``--n-fit`` training scenes; ``--n-id`` further scenes of the same world (other
seed) are the held-out ID rows. Near-OOD: scenes whose first object holds the
held-out shape, the held-out colour, or the held-out combination
(``holdout_only``; the scene's other objects avoid that rule only, so a few hold
another held-out value). Far-OOD: noise, textures and crops of scikit-image's
bundled photographs (:mod:`multimodal.ood_data`). Everything goes through
``vlsae ood``'s Python entry (:func:`evals.ood.run_ood`), so the sets are
extracted once per model into OUT/MODEL/acts and every later run only scores.

SAEs (trained here on the fit rows' final embeddings, ``--steps`` steps):
``vl`` (64 latents, k 16, on image-caption pairs), ``topk`` (256 latents, k 8,
on images), ``vl-split`` (64, k 16, pairs). Prints, per model, arch and OOD set,
the best SAE score against the best baseline with the paired bootstrap interval
of their AUROC difference and the set's probe ceiling (a supervised logistic
probe telling the set from the ID rows on the raw embeddings, two-fold: what the
embedding holds), then the AUROC of every score; writes OUT/summary.json and
OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from multimodal.adapters import create_adapter
from multimodal.cache import ActivationCache
from multimodal.ood_data import write_ood_set
from multimodal.shapesworld import ShapesWorldConfig, write_world
from vlsae.training.run import load_run_config, run_training

from evals.concepts.probes import two_fold_probe_ceiling
from evals.ood import OODConfig, run_ood
from evals.ood.data import load_set

HOLDOUT = ("shape=heart", "colour=pink", "shape=square+colour=red")
NEAR = {"held-out-shape": "shape=heart", "held-out-colour": "colour=pink", "held-out-combo": "shape=square+colour=red"}
FAR = ("noise", "texture", "photo")
SAES = {"vl": ({"n_latents": 64, "k": 16}, None), "topk": ({"n_latents": 256, "k": 8}, "image"),
        "vl-split": ({"n_latents": 64, "k": 16}, None)}


def write_data(root: Path, n_fit: int, n_id: int, n_ood: int) -> dict[str, str]:
    """Every set's shard folder (kept when it already holds the same number of records)."""
    def fresh(folder: Path, record: str, n: int) -> bool:
        path = folder / record
        if not path.exists():
            return True
        data = json.loads(path.read_text())
        return (data["summary"]["n"] if record == "world.json" else data["n"]) != n

    sets: dict[str, str] = {}
    worlds = {"fit": (ShapesWorldConfig(seed=10, holdout=HOLDOUT), n_fit),
              "id": (ShapesWorldConfig(seed=11, holdout=HOLDOUT), n_id)}
    for i, (name, rule) in enumerate(NEAR.items()):
        worlds[name] = (ShapesWorldConfig(seed=12 + i, holdout=(rule,), holdout_only=True), n_ood)
    for name, (config, n) in worlds.items():
        if fresh(root / name, "world.json", n):
            write_world(config, root / name, n=n, shard_size=min(n, 5000), overwrite=True, progress=False)
        sets[name] = str(root / name)
    for kind in FAR:
        if fresh(root / kind, "ood.json", n_ood):
            write_ood_set(kind, root / kind, n=n_ood, shard_size=min(n_ood, 5000), seed=20)
        sets[kind] = str(root / kind)
    return sets


def train_sae(out: Path, arch: str, acts: str, steps: int) -> None:
    sae, modality = SAES[arch]
    if (out / "training.json").exists():
        return
    data = {"acts": acts, **({"modality": modality} if modality else {})}
    run = load_run_config(None, base={"arch": arch, "sae": sae, "data": data, "out": str(out),
                                      "train": {"steps": steps, "batch_size": 256, "lr": 2e-3, "progress": False,
                                                "checkpoint_every": steps, "eval_rows": 1024}})
    run_training(run, resume=(out / "checkpoint").is_dir())


def probe_ceilings(acts: Path, names: list[str]) -> dict[str, float]:
    """Per OOD set, the held-out AUROC of a supervised logistic probe telling it from the ID rows on the
    raw embeddings: what the embedding holds, and so what no unsupervised score can beat by much."""
    held_out = ActivationCache(acts / "id", modality="image").read_all()
    out = {}
    for name in names:
        ood = ActivationCache(acts / name, modality="image").read_all()
        is_id = np.concatenate([np.ones(len(held_out), bool), np.zeros(len(ood), bool)])
        out[name] = round(two_fold_probe_ceiling(torch.cat([held_out, ood]), {"id": is_id})["id"], 4)
    return out


def _interval(ci: list[float] | None, signed: bool = False) -> str:
    if not ci:
        return ""
    return f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shapes-clip,shapes-clip-minilm", help="comma-separated adapter specs")
    parser.add_argument("--archs", default="vl,topk,vl-split", help=f"comma-separated SAEs of {', '.join(SAES)}")
    parser.add_argument("--out", default="runs/bench-ood", help="folder for data, caches, SAEs and reports")
    parser.add_argument("--n-fit", type=int, default=3000, help="in-distribution training rows (SAEs and statistics)")
    parser.add_argument("--n-id", type=int, default=1000, help="held-out in-distribution rows scored")
    parser.add_argument("--n-ood", type=int, default=1000, help="rows of each OOD set")
    parser.add_argument("--steps", type=int, default=1500, help="SAE training steps")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the intervals")
    args = parser.parse_args()

    out = Path(args.out)
    started = time.perf_counter()
    sets = write_data(out / "data", args.n_fit, args.n_id, args.n_ood)
    print(f"data: {', '.join(sets)} in {time.perf_counter() - started:.0f} s", flush=True)
    summary: dict[str, dict[str, dict]] = {}
    lines = ["| model | SAE | OOD set | best SAE score | best baseline | SAE - baseline [95 % CI] | verdict | probe ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for model in args.models.split(","):
        root = out / model
        tick = time.perf_counter()
        adapter = create_adapter(model, device="auto")
        load_set("fit", sets["fit"], "--fit", adapter, model, root / "acts", progress=False)  # the SAEs' training data
        print(f"{model}: fit cache in {time.perf_counter() - tick:.0f} s", flush=True)
        ood_names = [k for k in sets if k not in ("fit", "id")]
        summary[model] = {}
        ceilings: dict[str, float] = {}
        for arch in args.archs.split(","):
            tick = time.perf_counter()
            train_sae(root / "sae" / arch, arch, str(root / "acts" / "fit"), args.steps)
            trained = time.perf_counter() - tick
            result = run_ood(OODConfig(sae=str(root / "sae" / arch), model=model, fit=sets["fit"], id=sets["id"],
                                       ood={k: v for k, v in sets.items() if k not in ("fit", "id")},
                                       out=str(root / "report" / arch), cache=str(root / "acts"),
                                       bootstrap=args.bootstrap, overwrite=True, progress=False))
            ceilings = ceilings or probe_ceilings(root / "acts", ood_names)
            summary[model][arch] = {"best": result["best"], "probe_ceiling": ceilings, "seconds": result["seconds"], "train_seconds": round(trained, 1),
                                    "auroc": {s: {n: round(m["auroc"], 4) for n, m in by.items()}
                                              for s, by in result["metrics"].items()},
                                    "auroc_ci": {s: {n: m.get("auroc_ci") for n, m in by.items()}
                                                 for s, by in result["metrics"].items()},
                                    "index": result["index"]}
            print(f"\n{model} / {arch} (trained {trained:.0f} s; run {result['seconds']['total']:.1f} s: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items() if k != "total") + ")")
            for name, entry in result["best"].items():
                base_ci = result["metrics"][name][entry["best_baseline"]].get("auroc_ci")
                sae_ci = result["metrics"][name][entry["best_sae"]].get("auroc_ci")
                print(f"  {name:16s} SAE {entry['best_sae']:14s} {entry['best_sae_auroc']:.3f}{_interval(sae_ci)}   "
                      f"baseline {entry['best_baseline']:13s} {entry['best_baseline_auroc']:.3f}{_interval(base_ci)}   "
                      f"diff {entry['sae_minus_baseline']:+.3f}{_interval(entry['sae_minus_baseline_ci'], True)} {entry['verdict']}"
                      f"   probe ceiling {ceilings[name]:.3f}")
                lines.append(f"| {model} | {arch} | {name} | {entry['best_sae']} {entry['best_sae_auroc']:.3f}{_interval(sae_ci)} "
                             f"| {entry['best_baseline']} {entry['best_baseline_auroc']:.3f}{_interval(base_ci)} "
                             f"| {entry['sae_minus_baseline']:+.3f}{_interval(entry['sae_minus_baseline_ci'], True)} "
                             f"| {entry['verdict']} | {ceilings[name]:.3f} |")
            names = list(next(iter(result["metrics"].values())))
            print("  AUROC " + " ".join(f"{n[:13]:>13s}" for n in names))
            for name, by in result["metrics"].items():
                print(f"  {name[:16]:16s}" + " ".join(f"{by[n]['auroc']:13.3f}" for n in names))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nsummary: {out / 'summary.json'}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
