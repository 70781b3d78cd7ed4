"""The claims of the seed SAE variants (issue 15), one section per claim, each printing a table.

    python benchmarks/variants.py                       # every claim
    python benchmarks/variants.py --claims gba,topafa --seeds 2 --out /tmp/variants.json
    python benchmarks/variants.py --claims itda_layers --second-clip /tmp/zoo-seed1   # ITDA vs CKA layer matching

Part A's claims (mc/fc, gba, vsae, topafa):

* ``gba``: Group Bias Adaptation on the imbalanced planted set (128 features, half
  the samples with 3 active and half with 20, every feature at frequency ~0.09),
  512 latents, at d = 42 (the paper's, via a secondary summary) and d = 96, against
  TopK at k = 20 and k = 30; GBA with its default frequency coverage (0.5 -> 1e-4)
  and with one around the features' frequency (0.1 -> 1e-3). Target: FRR@0.9 >= 95 %
  without choosing k, above TopK at a mis-set k.
* ``fc``: Feature Choice with Zipf capacities on a Zipfian spectrum (f_i ~ 1/i):
  dead latents, and recovery of the rare features (f < 1e-3), against TopK (with
  and without AuxK) and Mutual Choice.
* ``topafa``: top-AFA's per-input k* against the true number of active features
  on exactly orthonormal features with s ~ U{1..20}. Target: Spearman > 0.8.
* ``vsae``: the variational SAE against TopK at the same k (negative control:
  more dead latents, lower recovery).
* ``gba_shapesworld``: gba against topk on shapes-clip image embeddings, the best
  latent's AUROC per planted ShapesWorld value beside the value's probe ceiling
  (no target: GBA's claim is recovery of monosemantic features, which this measures).

Part B's claims (gsae, itda, dark matter; in ``benchmarks/variants_b.py``):

* ``gsae``: g-SAE against TopK at the same tight k with a planted readout along a
  shrunk feature (the leaderboard's ``readout``). Target: the readout feature
  recovered (best decoder |cos| > 0.9) where TopK drops it.
* ``itda``: ITDA's atoms against the planted features (target: |cos| > 0.9 for
  >= 90 %), and the Jaccard similarity of two ITDAs built on one stream seen
  through a random rotation (target >= 0.95), against one built on another stream.
* ``itda_layers``: layer matching between two shapes-clip models of different
  seeds (the shipped one and ``--second-clip``, a zoo cache folder that
  ``VLSAE_CACHE=FOLDER vlsae zoo train shapes-clip --set seed=1`` wrote), ITDA
  Jaccard against linear CKA (the paper: 0.88 vs 0.69 on GPT-2).
* ``darkmatter``: the linear predictability of the SAE error: a perfect dictionary
  with white noise (target R² ≈ 0), a ReLU + L1 SAE (large), and topk / vl on
  shapes-clip embeddings.

Every SAE trains through ``vlsae.training.train`` with the leaderboard's per-arch
defaults (``evals.synthetic.leaderboard.ARCH_DEFAULTS``) and is scored by
``evals.synthetic.score``; each claim is one function registered in ``CLAIMS``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from _variants_common import CLAIMS, arms_table, claim, console, fit, mean_sd, table
import variants_b  # noqa: F401  (registers part B's claims)

from evals.concepts import extract_pair_activations, planted_labels
from evals.planted import auroc_matrix, linear_probe_auroc
from evals.synthetic import generate
from evals.synthetic import metrics as M
from evals.synthetic.generators import PlantedData
from evals.synthetic.score import decoder_directions, encode_decode, score_sae
from multimodal.adapters import create_adapter
from multimodal.pairs import PairRecord
from multimodal.shapesworld import ShapesWorldConfig, render_sample
from vlsae.concepts import latent_activations


# ----------------------------------------------------------------- the claims
@claim("gba")
def gba_imbalanced(args: argparse.Namespace) -> list[dict[str, Any]]:
    """GBA vs TopK at a mis-set k on the imbalanced set, at d = 42 and d = 96."""
    arms: list[tuple[str, str, dict[str, Any]]] = [
        ("topk k=20", "topk", {"k": 20}), ("topk k=30", "topk", {"k": 30}),
        ("gba (0.5 -> 1e-4, default)", "gba", {}),
        ("gba (0.1 -> 1e-3)", "gba", {"high_freq": 0.1, "low_freq": 1e-3}),
    ]
    keys = [("frr_0.8", "FRR@0.8"), ("frr_0.9", "FRR@0.9"), ("mmcs", "MMCS"), ("l0", "L0"), ("fvu", "FVU"),
            ("dead_fraction", "dead"), ("freq_match_error", "|log p/f|")]
    out = []
    for d in args.gba_dims:
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in arms}
        for seed in range(args.seed, args.seed + args.seeds):
            data = generate("independent", preset="gba", seed=seed, n_train=20_000, n_test=5_000, d=d)
            for label, arch, kw in arms:
                sae, _ = fit(arch, data.train, 512, seed, args.steps, 512, **kw)
                runs[label].append(score_sae(sae, data))
        rows = arms_table(f"GBA, imbalanced set: 128 features, d={d}, 512 latents, {args.steps} steps", runs, keys)
        out += [{"d": d, **r} for r in rows]
    return out


def rare_recovery(sae: Any, data: PlantedData, rare: torch.Tensor) -> dict[str, float]:
    D = decoder_directions(sae)
    return {"frr_0.9_rare": M.recovery_rate(data.directions[rare], D, 0.9),
            "frr_0.9_common": M.recovery_rate(data.directions[~rare], D, 0.9)}


@claim("fc")
def fc_zipf(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Feature Choice with Zipf capacities on a Zipfian spectrum: dead latents and rare features."""
    options = dict(spectrum="zipf", expected_l0=2.0)
    arms: list[tuple[str, str, dict[str, Any]]] = [
        ("topk", "topk", {"k": 2}), ("topk, no AuxK", "topk", {"k": 2, "aux_coef": 0.0}),
        ("mc", "mc", {"k": 2}), ("fc zipf", "fc", {"k": 2}), ("fc zipf + aux_zipf", "fc", {"k": 2, "aux": "zipf"}),
        ("fc uniform", "fc", {"k": 2, "capacity": "uniform"}),
    ]
    keys = [("train_dead", "dead (training)"), ("dead_fraction", "never fired (test)"), ("frr_0.9", "FRR@0.9"),
            ("frr_0.9_rare", "FRR@0.9 f<1e-3"), ("frr_0.9_common", "FRR@0.9 f>=1e-3"), ("l0", "L0"), ("fvu", "FVU")]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in arms}
    for seed in range(args.seed, args.seed + args.seeds):
        data = generate("independent", preset="light", seed=seed, n_train=100_000, n_test=20_000, **options)
        rare = data.meta["frequencies"] < 1e-3
        for label, arch, kw in arms:
            sae, summary = fit(arch, data.train, 512, seed, args.steps, 512, **kw)
            runs[label].append({**score_sae(sae, data), **rare_recovery(sae, data, rare),
                                "train_dead": summary["dead_fraction"]})
    n_rare = int((generate("independent", preset="light", seed=args.seed, n_train=1, n_test=1, **options)
                  .meta["frequencies"] < 1e-3).sum())
    return arms_table(f"FC, Zipf spectrum (f_i ~ 1/i, E[L0] = 2): 512 features ({n_rare} with f < 1e-3), d=64, "
                      f"512 latents, k=2, 100k training rows, {args.steps} steps", runs, keys)


def orthonormal_support_data(seed: int, n: int = 48, d: int = 64, s_max: int = 20,
                             rows: int = 20_000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, test x, test s, directions): exactly orthonormal features, s ~ U{1..s_max} active per row."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, n, generator=g))
    V = q.t().contiguous()

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.randint(1, s_max + 1, (m,), generator=g)
        ranks = torch.rand(m, n, generator=g).argsort(dim=1).argsort(dim=1)
        return ((ranks < s[:, None]) * (0.5 + torch.rand(m, n, generator=g))) @ V, s

    x_train, _ = draw(rows)
    x_test, s_test = draw(5_000)
    return x_train, x_test, s_test, V


@claim("topafa")
def topafa_tracks_support(args: argparse.Namespace) -> list[dict[str, Any]]:
    """top-AFA's chosen k* against the true number of active features, orthonormal features."""
    arms = [("topafa, 64 latents", "topafa", 64, {}), ("topafa, 128 latents", "topafa", 128, {}),
            ("batchtopk k=10, 64 latents", "batchtopk", 64, {"k": 10})]
    keys = [("spearman", "Spearman(L0, s)"), ("fvu", "FVU"), ("l0", "mean L0"), ("frr_0.9", "FRR@0.9")]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in arms}
    for seed in range(args.seed, args.seed + args.seeds):
        x_train, x_test, s_test, V = orthonormal_support_data(seed)
        for label, arch, width, kw in arms:
            sae, _ = fit(arch, x_train, width, seed, args.steps, 512, **kw)
            Z, recon = encode_decode(sae, x_test)
            l0 = (Z != 0).sum(dim=1).float()
            runs[label].append({"spearman": float(spearmanr(s_test.numpy(), l0.numpy()).statistic),
                                "fvu": M.fvu(x_test, recon), "l0": float(l0.mean()),
                                "frr_0.9": M.recovery_rate(V, decoder_directions(sae), 0.9)})
    return arms_table(f"top-AFA: 48 orthonormal features in d=64, s ~ U{{1..20}} active per row, {args.steps} steps",
                      runs, keys)


@claim("vsae")
def vsae_control(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The variational SAE against TopK at the same k (the paper's negative result)."""
    settings = [("light (512 features, d=64)", "light", 5), ("heavy (1024 features, d=24)", "heavy", 5)]
    arms = [("topk", "topk", {}), ("vsae (sigma = 1)", "vsae", {}), ("vsae (learned sigma)", "vsae", {"learned_variance": True})]
    keys = [("dead_fraction", "never fired (test)"), ("train_dead", "dead (training)"), ("frr_0.9", "FRR@0.9"),
            ("mmcs", "MMCS"), ("fvu", "FVU"), ("mcc", "MCC")]
    out = []
    for name, preset, k in settings:
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in arms}
        for seed in range(args.seed, args.seed + args.seeds):
            data = generate("independent", preset=preset, seed=seed, n_train=20_000, n_test=5_000)
            width = data.directions.shape[0]
            for label, arch, kw in arms:
                sae, summary = fit(arch, data.train, width, seed, args.steps, 512, k=k, **kw)
                runs[label].append({**score_sae(sae, data), "train_dead": summary["dead_fraction"]})
        out += [{"setting": name, **r} for r in
                arms_table(f"vSAE vs TopK, independent {name}, k={k}, width = features, {args.steps} steps", runs, keys)]
    return out


@claim("gba_shapesworld")
def gba_shapesworld(args: argparse.Namespace) -> list[dict[str, Any]]:
    """gba vs topk on shapes-clip image embeddings: best-latent AUROC per planted value, beside the probe ceiling."""
    world = ShapesWorldConfig(seed=1000 + args.seed)

    def records(start: int, n: int):
        for i in range(start, start + n):
            s = render_sample(world, i)
            yield PairRecord(key=s.key, image=s.image, caption=s.caption, meta=s.meta)

    adapter = create_adapter("shapes-clip", device="cpu")
    train_pairs = extract_pair_activations(adapter, records(0, args.world_train), limit=args.world_train, progress=False)
    test_pairs = extract_pair_activations(adapter, records(10_000_000, 2_000), limit=2_000, progress=False)
    x_train, x_test = train_pairs.acts["image"], test_pairs.acts["image"]
    train_labels, _ = planted_labels(train_pairs.metas)
    test_labels, _ = planted_labels(test_pairs.metas)
    ceiling = linear_probe_auroc(x_train, train_labels, x_test, test_labels)
    values = sorted(ceiling)
    arms = [("topk k=8", "topk", {"k": 8}), ("gba", "gba", {})]
    best: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in arms}
    summaries: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in arms}
    for seed in range(args.seed, args.seed + args.seeds):
        for label, arch, kw in arms:
            sae, summary = fit(arch, x_train, 64, seed, args.steps, 256, **kw)
            auroc = auroc_matrix(latent_activations(sae, x_test, "image"), test_labels)
            best[label].append({v: float(np.max(auroc[v])) for v in values if v in auroc})
            summaries[label].append(summary)
    rows, out = [], []
    for v in values:
        rows.append([v, f"{ceiling[v]:.3f}", *[mean_sd([b[v] for b in best[label]]) for label, *_ in arms]])
    for label, *_ in arms:
        means = [float(np.mean([b[v] for v in values])) for b in best[label]]
        hits = [float(sum(b[v] >= 0.9 for v in values)) for b in best[label]]
        fvu = [s["fvu"] for s in summaries[label]]
        l0 = [s["l0"] for s in summaries[label]]
        out.append({"arm": label, "mean_best_auroc": means, "values_ge_0.9": hits, "fvu": fvu, "l0": l0})
    rows.append(["mean", f"{np.mean([ceiling[v] for v in values]):.3f}",
                 *[mean_sd(r["mean_best_auroc"]) for r in out]])
    rows.append(["values >= 0.9", str(sum(ceiling[v] >= 0.9 for v in values)), *[mean_sd(r["values_ge_0.9"]) for r in out]])
    rows.append(["FVU / L0", "", *[f"{np.mean(r['fvu']):.3f} / {np.mean(r['l0']):.1f}" for r in out]])
    table(f"shapes-clip image embeddings ({args.world_train} training pairs, 2,000 held out), 64 latents, "
          f"{args.steps} steps: best latent's AUROC per planted value", ["value", "probe ceiling", *[a[0] for a in arms]], rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", default=",".join(CLAIMS), help=f"comma-separated, of: {', '.join(CLAIMS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per arm (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of every SAE (default 1500)")
    parser.add_argument("--gba-dims", type=lambda s: [int(v) for v in s.split(",")], default=[42, 96],
                        help="input widths of the GBA imbalanced set (default 42,96)")
    parser.add_argument("--world-train", type=int, default=6000, help="training pairs for gba_shapesworld (default 6000)")
    parser.add_argument("--gsae-scales", type=lambda s: [float(v) for v in s.split(",")], default=[0.2, 0.5],
                        help="gsae: factors on the readout feature's codes (default 0.2,0.5)")
    parser.add_argument("--gsae-betas", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 4.0],
                        help="gsae: weights of the downstream-effect term (default 1,4)")
    parser.add_argument("--itda-l0", type=lambda s: [float(v) for v in s.split(",")], default=[1.0, 5.0],
                        help="itda: expected active features per row of the suites (default 1,5)")
    parser.add_argument("--itda-thresholds", type=lambda s: [float(v) for v in s.split(",")], default=[0.1, 0.02],
                        help="itda: unexplained fractions above which a row becomes an atom (default 0.1,0.02)")
    parser.add_argument("--work", default="/tmp/vlsae-variants", help="folder for worlds and caches (default /tmp/vlsae-variants)")
    parser.add_argument("--layer-pairs", type=int, default=4000, help="itda_layers: pairs extracted (default 4000)")
    parser.add_argument("--layer-hooks", default="visual.blocks.0,visual.blocks.1,visual.blocks.2,visual.blocks.3",
                        help="itda_layers: hooks compared (default visual.blocks.0..3)")
    parser.add_argument("--second-clip", default="", help="itda_layers: zoo cache folder holding a shapes-clip of "
                        "another seed (default: none, the claim is skipped)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", help="write every claim's rows as JSON here (default: none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [c for c in args.claims.split(",") if c not in CLAIMS]
    if unknown:
        parser.error(f"unknown claim '{unknown[0]}'; choose from {', '.join(CLAIMS)}")
    results: dict[str, Any] = {}
    for name in args.claims.split(","):
        started = time.perf_counter()
        results[name] = CLAIMS[name](args)
        console.print(f"[dim]{name}: {time.perf_counter() - started:.0f} s[/dim]")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
