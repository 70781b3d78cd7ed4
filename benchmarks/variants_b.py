"""Part B of ``benchmarks/variants.py``: the claims of g-SAE, ITDA and dark matter (see that script's docstring).

Imported by ``variants.py``, which runs them; each function registers itself in
the shared claim registry (``_variants_common.CLAIMS``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from _variants_common import arms_table, claim, console, fit, mean_sd, table

from evals.darkmatter.analysis import dark_matter
from evals.similarity import compare
from evals.similarity.compare import ITDASettings, build_itda
from evals.similarity.measures import jaccard
from evals.synthetic import generate
from evals.synthetic import metrics as M
from evals.synthetic.leaderboard import run_suite
from evals.synthetic.score import decoder_directions, encode_decode
from multimodal.cache import ActivationCache

REPO = Path(__file__).resolve().parents[1]


@claim("gsae")
def gsae_readout(args: argparse.Namespace) -> list[dict[str, Any]]:
    """g-SAE (at each beta) vs TopK at k = 3 on 64 planted features (d = 64, 64 latents), a linear readout along
    feature 0 whose codes are shrunk by ``scale`` (the leaderboard's planted readout)."""
    keys = [("readout_cos", "readout |cos|"), ("readout_cos_live", "same, live latents"), ("mmcs", "MMCS"),
            ("frr_0.9", "FRR@0.9"), ("fvu", "FVU"), ("readout_fvu", "readout FVU")]
    out = []
    for scale in args.gsae_scales:
        runs: dict[str, list[dict[str, Any]]] = {"topk": [], **{f"gsae beta={b:g}": [] for b in args.gsae_betas}}
        for seed in range(args.seed, args.seed + args.seeds):
            for i, beta in enumerate(args.gsae_betas):
                rows = run_suite("independent", ["topk", "gsae"] if i == 0 else ["gsae"], n_latents=64, k=3,
                                 steps=args.steps, seed=seed, options={"n_features": 64, "d": 64},
                                 arch_options={"gsae": {"beta": beta}}, readout={"feature": 0, "scale": scale}, show=False)
                for row in rows:
                    runs["topk" if row["arch"] == "topk" else f"gsae beta={beta:g}"].append(row)
        out += [{"scale": scale, **r} for r in arms_table(
            f"g-SAE: readout along planted feature 0 with its codes x {scale}; 64 features, d=64, 64 latents, k=3, "
            f"{args.steps} steps", runs, keys)]
    return out


@claim("itda")
def itda_recovery_and_rotation(args: argparse.Namespace) -> list[dict[str, Any]]:
    """ITDA's atoms against the planted features, and its Jaccard similarity under a random rotation."""
    rows, out = [], []
    for l0 in args.itda_l0:
        for threshold in args.itda_thresholds:
            settings = ITDASettings(k=8, threshold=threshold, capacity=8192)
            recovery, atoms, rotated, other = [], [], [], []
            for seed in range(args.seed, args.seed + args.seeds):
                data = generate("independent", preset="light", seed=seed, n_train=20_000, n_test=1_000, expected_l0=l0)
                x = data.train
                itda = build_itda(x, settings)
                recovery.append(M.recovery_rate(data.directions, decoder_directions(itda), 0.9))
                atoms.append(float(itda.n_atoms))
                q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=torch.Generator().manual_seed(seed + 7)))
                rotated.append(jaccard(itda.atom_labels(), build_itda(x @ q, settings).atom_labels()))
                fresh = generate("independent", preset="light", seed=seed + 1000, n_train=20_000, n_test=1, expected_l0=l0)
                other.append(jaccard(itda.atom_labels(), build_itda(fresh.train, settings).atom_labels()))
            rows.append([f"{l0:g}", f"{threshold:g}", mean_sd(atoms), mean_sd(recovery), mean_sd(rotated), mean_sd(other)])
            out.append({"expected_l0": l0, "threshold": threshold, "atoms": atoms, "frr_0.9": recovery,
                        "jaccard_rotated": rotated, "jaccard_other_stream": other})
    table("ITDA (k=8) on the independent light suite (512 features, d=64, 20,000 rows): atoms, planted features "
          "with an atom at |cos| > 0.9, Jaccard with the same stream through a random rotation and with another "
          "stream of the suite", ["E[L0]", "threshold", "atoms", "FRR@0.9", "Jaccard, rotated", "Jaccard, other stream"], rows)
    return out


def _vlsae(*argv: str, cache: str | None = None) -> None:
    env = dict(os.environ)
    if cache:
        env["VLSAE_CACHE"] = cache
    subprocess.run([sys.executable, "-m", "vlsae", *argv], check=True, env=env, cwd=REPO)


@claim("itda_layers")
def itda_layer_matching(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Layer matching between the shipped shapes-clip and one of another seed: ITDA Jaccard vs linear CKA."""
    if not args.second_clip:
        console.print("[dim]itda_layers: no --second-clip; skipped[/dim]")
        return []
    work = Path(args.work) / "itda_layers"
    world = work / "world"
    if not (world / "world.json").exists():
        _vlsae("world", "--out", str(world), "--n", str(args.layer_pairs), "--shard-size", "2000", "--overwrite", "--quiet")
    hooks = args.layer_hooks.split(",")
    stacks: dict[str, list[str]] = {"a": [], "b": []}
    for side, cache in (("a", None), ("b", args.second_clip)):
        for hook in hooks:
            folder = work / f"{side}-{hook}"
            manifest = folder / "manifest.json"
            if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
                _vlsae("extract", "--model", "shapes-clip", "--data", str(world), "--hook", hook, "--tokens", "cls",
                       "--out", str(folder), "--overwrite", "--no-progress", cache=cache)
            stacks[side].append(str(folder))
    modality = "image" if all(h.startswith("visual") for h in hooks) else "text" if all(h.startswith("text") for h in hooks) else None
    result = compare(stacks["a"], stacks["b"], modality=modality, settings=ITDASettings(capacity=8192))
    matching = result["layer_matching"]
    rows = [[name, f"{m['accuracy']:.3f}", f"{m['a_to_b']:.3f}", f"{m['b_to_a']:.3f}"] for name, m in matching.items()]
    table(f"Layer matching, shapes-clip (shipped) vs shapes-clip seed 1 ({args.second_clip}), hooks {', '.join(hooks)}, "
          f"{args.layer_pairs} pairs: fraction of layers whose best match is the same layer",
          ["measure", "accuracy", "a -> b", "b -> a"], rows)
    return [{"hooks": hooks, "layer_matching": matching, "jaccard": result["jaccard"], "cka": result["cka"]}]


def _shapes_clip_rows(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """shapes-clip final image and text embeddings of a fresh world (extracted once into --work)."""
    work = Path(args.work) / "darkmatter"
    world, acts = work / "world", work / "acts"
    if not (world / "world.json").exists():
        _vlsae("world", "--out", str(world), "--n", "8000", "--shard-size", "4000", "--seed", "3", "--overwrite", "--quiet")
    manifest = acts / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("complete")):
        _vlsae("extract", "--model", "shapes-clip", "--data", str(world), "--hook", "final", "--out", str(acts),
               "--overwrite", "--no-progress")
    rows = ActivationCache(acts).read_all()
    assert isinstance(rows, dict)
    return rows


@claim("darkmatter")
def darkmatter_predictability(args: argparse.Namespace) -> list[dict[str, Any]]:
    """How much of the SAE error a ridge regression on the input predicts (held-out R²)."""
    keys = [("error_r2", "error R² (per dim)"), ("norm_r2", "‖error‖² R²"), ("fvu", "FVU"),
            ("nonlinear_fvu", "FVU after the linear part")]
    runs: dict[str, list[dict[str, Any]]] = {}

    def add(label: str, x: torch.Tensor, recon: torch.Tensor, seed: int) -> None:
        runs.setdefault(label, []).append(dark_matter(x, recon, seed=seed))

    for seed in range(args.seed, args.seed + args.seeds):
        data = generate("independent", preset="light", seed=seed, n_train=20_000, n_test=10_000)
        clean = data.codes_test @ data.directions
        noisy = clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + 3))
        add("perfect dictionary + white noise (σ 0.05)", noisy, clean, seed)
        add("perfect dictionary, codes x 0.8 (shrinkage)", clean, 0.8 * clean, seed)
        for arch, kw in (("topk", {"k": 5}), ("relu", {})):
            sae, _ = fit(arch, data.train, 512, seed, args.steps, 512, **kw)
            _, recon = encode_decode(sae, data.test)
            add(f"{arch} on the planted suite", data.test, recon, seed)
    rows = _shapes_clip_rows(args)
    n = rows["image"].shape[0] // 2
    for seed in range(args.seed, args.seed + args.seeds):
        sae, _ = fit("topk", rows["image"][:n], 256, seed, args.steps, 256, k=8)
        _, recon = encode_decode(sae, rows["image"][n:])
        add("topk (256, k 8) on shapes-clip images", rows["image"][n:], recon, seed)
        vl, _ = fit("vl", {m: r[:n] for m, r in rows.items()}, 64, seed, args.steps, 256, k=16)  # type: ignore[arg-type]
        for m in ("image", "text"):
            _, recon = encode_decode(vl, rows[m][n:], m)
            add(f"vl (64, k 16) on shapes-clip {m}s", rows[m][n:], recon, seed)
    return arms_table(f"Dark matter: ridge from the input to the SAE error, held-out half ({args.steps} steps)",
                      runs, keys)
