"""Do image and caption of a planted ShapesWorld concept land on the same latent?

    python benchmarks/vl_shapesworld.py --model shapes-clip
    python benchmarks/vl_shapesworld.py --model shapes-llava --hook layers.2 --tokens mean --align-steps 1500

For each architecture (default vl, vl-split, vl-shared): encode ShapesWorld
pairs with the model adapter, train the SAE on the training pairs (with the
contrastive alignment stage first when ``--align-steps`` > 0), then on held-out
pairs find, for every planted attribute value, the latent with the best AUROC on
images and the one with the best AUROC on captions. Prints how often they are
the same index and the AUROCs (targets for ``vl``: same index >= 80%, AUROC >= 0.9).

Next to them, per attribute, the *ceiling*: the held-out AUROC of a supervised
logistic-regression probe per value on the same activations. No single latent
can beat it, so a value the model itself does not encode (ceiling < 0.9) cannot
meet the target whatever the SAE; the last line counts the target on the
values whose ceiling allows it. ``--world max_objects=1`` and the like change
the ShapesWorld the pairs come from.

The last line is a second, supervised reference: ``vl``'s own code (k nearest
concept directions) with one concept per planted value, set to the value's
class-mean direction (``evals.planted.class_mean_concepts``), untrained. It is
what the architecture gives if training found the planted concepts, so a gap
between it and the ceiling is the nearest-concept code's limit, and a gap
between the trained rows and it is the training objective's.

Defaults: 32 latents (about the 32 planted object values) and k=16, half
of them active: a scene plants up to 3 objects x 4 attributes + a texture = 13
values, and with half the concepts active each latent acts as a "nearer than
the median concept" test, which separates a value better than a sparser cut
(measured on shapes-clip's final embeddings, 5 seeds each: 32 / 16 gives same
index 0.84 +- 0.10, 40 / 20 gives 0.80 +- 0.07; 64 latents / k=16 gave 0.69).
With the wide, very sparse setting of the released code's scale (256 latents,
k=8) the nearest-concept encoder learns whole-scene prototypes instead of
attributes. One seed's same-index rate moves by about 0.1, so the summary
table reports the mean and spread over ``--seeds`` SAE seeds.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from evals.concepts import extract_pair_activations as collect_pair_activations, planted_labels, planted_probe
from evals.planted import class_mean_vl_sae, linear_probe_auroc, summarize_by_attribute
from multimodal.adapters import create_adapter
from multimodal.shapesworld import ShapesWorldConfig, render_sample
from vlsae import create_sae
from vlsae.training import TensorSource, TrainConfig, train


def records(config: ShapesWorldConfig, start: int, n: int):
    from multimodal.pairs import PairRecord
    for i in range(start, start + n):
        s = render_sample(config, i)
        yield PairRecord(key=s.key, image=s.image, caption=s.caption, meta=s.meta)


def spread(values: list[float], digits: int = 2) -> str:
    return f"{np.mean(values):.{digits}f} +- {np.std(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--hook", default="final")
    parser.add_argument("--tokens", default="cls")
    parser.add_argument("--archs", default="vl,vl-split,vl-shared")
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--latents", type=int, default=32)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--align-steps", type=int, default=0, help="train the contrastive alignment stage first")
    parser.add_argument("--seed", type=int, default=0, help="first seed (pairs of the world and SAE init)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="SAE seeds per architecture (seed, seed+1, ...); the summary gives their mean and spread, "
                             "since one seed's same-index rate moves by +-0.1")
    parser.add_argument("--world", action="append", default=[], metavar="KEY=VALUE",
                        help="ShapesWorldConfig override for the pairs, e.g. max_objects=1 (repeatable)")
    args = parser.parse_args()

    from vlsae.config import apply_overrides, from_dict
    world = from_dict(ShapesWorldConfig, apply_overrides({"seed": 1000 + args.seed}, args.world), where="--world")
    adapter = create_adapter(args.model, device="auto")
    started = time.perf_counter()
    train_pairs = collect_pair_activations(adapter, records(world, 0, args.n_train), hook=args.hook, tokens=args.tokens,
                                           batch_size=128, limit=args.n_train)
    test_pairs = collect_pair_activations(adapter, records(world, 10_000_000, args.n_test), hook=args.hook,
                                          tokens=args.tokens, batch_size=128, limit=args.n_test)
    print(f"encoded {args.n_train} + {args.n_test} pairs with {args.model} ({args.hook}, {args.tokens}) "
          f"in {time.perf_counter() - started:.0f} s")
    source = TensorSource(train_pairs.acts)
    projector = None
    if args.align_steps:
        from vlsae.alignment import AlignedSAE, ProjectedSource, ProjectorTrainConfig, train_projector
        projector, summary = train_projector(source, ProjectorTrainConfig(steps=args.align_steps, batch_size=512, seed=args.seed))
        print(f"alignment stage: in-batch retrieval {summary['retrieval_acc_before']:.3f} -> {summary['retrieval_acc_after']:.3f}")
        source = ProjectedSource(source, projector)
    widths = set(source.d_in.values())
    if len(widths) != 1:
        raise SystemExit(f"modalities have different widths {source.d_in}; pass --align-steps")
    d_in = widths.pop()

    train_image_labels, train_text_labels = planted_labels(train_pairs.metas)
    test_image_labels, test_text_labels = planted_labels(test_pairs.metas)
    ceiling = {
        "image": linear_probe_auroc(train_pairs.acts["image"], train_image_labels, test_pairs.acts["image"], test_image_labels),
        "text": linear_probe_auroc(train_pairs.acts["text"], train_text_labels, test_pairs.acts["text"], test_text_labels),
    }
    reachable = sorted(v for v in ceiling["image"] if min(ceiling["image"][v], ceiling["text"].get(v, 0.0)) >= 0.9)
    reference = class_mean_reference(train_pairs, test_pairs, projector, args.k)

    runs = []
    for arch in args.archs.split(","):
        for seed in range(args.seed, args.seed + args.seeds):
            torch.manual_seed(seed)
            sae = create_sae(arch, d_in=d_in, n_latents=args.latents, k=args.k)
            result = train(sae, source, TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                                                     progress=False, tensorboard=False))
            trained = result.sae if projector is None else AlignedSAE(result.sae, projector)
            probe = planted_probe(trained, test_pairs)
            s = probe["summary"]
            runs.append((arch, seed, result.summary, probe))
            print(f"{arch} seed {seed}: same index {s['same_index_rate']:.2f}, AUROC images {s['image_auroc']:.3f}, "
                  f"captions {s['text_auroc']:.3f}, both >= 0.9 {s['both_auroc_ge_0.9']:.2f}")

    title = (f"planted ShapesWorld values through {args.model} ({args.hook}); {args.latents} latents, k={args.k}, "
             f"{args.steps} steps; {args.n_test} held-out pairs; seed {args.seed}")
    table = Table(title=title)
    rows = [(arch, summary, probe) for arch, seed, summary, probe in runs if seed == args.seed]
    for col in ("arch", "attribute", "values", "same index", "AUROC img", "AUROC txt", "both >= 0.9",
                "ceiling img", "ceiling txt"):
        table.add_column(col, justify="right")
    for arch, summary, probe in rows:
        by_attribute = {"all": probe["summary"], **summarize_by_attribute(probe["matches"])}
        for attr, s in by_attribute.items():
            values = [m.value for m in probe["matches"] if attr == "all" or m.value.startswith(attr + "=")]
            ceil_img = sum(ceiling["image"].get(v, float("nan")) for v in values) / max(len(values), 1)
            ceil_txt = sum(ceiling["text"].get(v, float("nan")) for v in values) / max(len(values), 1)
            table.add_row(arch if attr == "all" else "", attr, str(s["values"]), f"{s['same_index_rate']:.2f}",
                          f"{s['image_auroc']:.3f}", f"{s['text_auroc']:.3f}", f"{s['both_auroc_ge_0.9']:.2f}",
                          f"{ceil_img:.3f}", f"{ceil_txt:.3f}")
        table.add_section()
    Console(width=150).print(table)
    print(f"{len(reachable)} of {len(ceiling['image'])} values have a probe ceiling >= 0.9 on both sides "
          f"({', '.join(reachable) or 'none'})")
    seeds_table = Table(title=f"over {args.seeds} SAE seeds (mean +- sd); 'encodable': the {len(reachable)} values "
                              "whose probe ceiling is >= 0.9 on both sides")
    for col in ("arch", "same index (all)", "same + both >= 0.9 (all)", "same index (encodable)",
                "same + both >= 0.9 (encodable)", "FVU img", "FVU txt"):
        seeds_table.add_column(col, justify="right")
    for arch in args.archs.split(","):
        mine = [(summary, probe) for a, _, summary, probe in runs if a == arch]
        stats = {"same": [], "both": [], "same_enc": [], "both_enc": [], "fvu_image": [], "fvu_text": []}
        for summary, probe in mine:
            hits = [m for m in probe["matches"] if m.value in reachable]
            stats["same"].append(probe["summary"]["same_index_rate"])
            stats["both"].append(sum(m.shared_and_separated for m in probe["matches"]))
            stats["same_enc"].append(sum(m.same for m in hits))
            stats["both_enc"].append(sum(m.shared_and_separated for m in hits))
            for m in ("image", "text"):
                stats[f"fvu_{m}"].append(summary.get(f"fvu_{m}", float("nan")))
        n_all, n_enc = len(mine[0][1]["matches"]), len(reachable)
        seeds_table.add_row(arch, spread(stats["same"]), f"{spread(stats['both'], 1)} of {n_all}",
                            f"{spread(stats['same_enc'], 1)} of {n_enc}", f"{spread(stats['both_enc'], 1)} of {n_enc}",
                            spread(stats["fvu_image"], 3), spread(stats["fvu_text"], 3))
    Console(width=150).print(seeds_table)
    s, enc = reference["summary"], [m for m in reference["matches"] if m.value in reachable]
    print(f"reference, not trained: vl's code with one class-mean concept per planted value (supervised; k={args.k}): "
          f"same index {s['same_index_rate']:.2f}, same + both >= 0.9 "
          f"{sum(m.shared_and_separated for m in reference['matches'])} of "
          f"{len(reference['matches'])} ({sum(m.shared_and_separated for m in enc)} of "
          f"{len(reachable)} encodable), AUROC images {s['image_auroc']:.3f}, captions {s['text_auroc']:.3f}")


def class_mean_reference(train_pairs, test_pairs, projector, k: int) -> dict:
    """planted_probe of a vl SAE whose concepts are the values' class-mean directions (in the shared
    space when an alignment stage is used): what the nearest-concept code gives with the planted concepts."""
    acts = train_pairs.acts
    if projector is not None:
        with torch.no_grad():
            acts = {m: projector.to_shared(x, m) for m, x in acts.items()}
    image_labels, text_labels = planted_labels(train_pairs.metas)
    sae = class_mean_vl_sae(acts, image_labels, text_labels, k)
    if projector is not None:
        from vlsae.alignment import AlignedSAE
        sae = AlignedSAE(sae, projector)
    return planted_probe(sae, test_pairs)


if __name__ == "__main__":
    main()
