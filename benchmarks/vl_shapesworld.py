"""Do image and caption of a planted ShapesWorld concept land on the same latent?

    python benchmarks/vl_shapesworld.py --model shapes-clip
    python benchmarks/vl_shapesworld.py --model shapes-llava --hook layers.2 --tokens mean --align-steps 1500

For each architecture (default vl, vl-split, vl-shared): encode ShapesWorld
pairs with the model adapter, train the SAE on the training pairs (with the
contrastive alignment stage first when ``--align-steps`` > 0), then on held-out
pairs find, for every planted attribute value, the latent with the best AUROC on
images and the one with the best AUROC on captions. Prints how often they are
the same index and the AUROCs (targets for ``vl``: same index >= 80%, AUROC >= 0.9).
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from evals.concepts_report import collect_pair_activations, planted_probe
from multimodal.adapters import create_adapter
from multimodal.shapesworld import ShapesWorldConfig, render_sample
from vlsae import create_sae
from vlsae.training import TensorSource, TrainConfig, train


def records(config: ShapesWorldConfig, start: int, n: int):
    from multimodal.pairs import PairRecord
    for i in range(start, start + n):
        s = render_sample(config, i)
        yield PairRecord(key=s.key, image=s.image, caption=s.caption, meta=s.meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--hook", default="final")
    parser.add_argument("--tokens", default="cls")
    parser.add_argument("--archs", default="vl,vl-split,vl-shared")
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--latents", type=int, default=256)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--align-steps", type=int, default=0, help="train the contrastive alignment stage first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    world = ShapesWorldConfig(seed=1000 + args.seed)
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

    rows = []
    for arch in args.archs.split(","):
        torch.manual_seed(args.seed)
        sae = create_sae(arch, d_in=d_in, n_latents=args.latents, k=args.k)
        result = train(sae, source, TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                                 progress=False, tensorboard=False))
        trained = result.sae if projector is None else AlignedSAE(result.sae, projector)
        probe = planted_probe(trained, test_pairs)
        s = probe["summary"]
        rows.append((arch, result.summary, s))
        print(f"{arch}: same index {s['same_index_rate']:.2f}, AUROC images {s['image_auroc']:.3f}, captions {s['text_auroc']:.3f}")

    table = Table(title=f"planted ShapesWorld values through {args.model} ({args.hook}); {args.latents} latents, k={args.k}, "
                        f"{args.steps} steps; {args.n_test} held-out pairs")
    for col in ("arch", "FVU image", "FVU text", "values", "same index", "AUROC img", "AUROC txt", "both >= 0.9"):
        table.add_column(col, justify="right")
    for arch, summary, s in rows:
        table.add_row(arch, f"{summary.get('fvu_image', float('nan')):.3f}", f"{summary.get('fvu_text', float('nan')):.3f}",
                      str(s["values"]), f"{s['same_index_rate']:.2f}", f"{s['image_auroc']:.3f}", f"{s['text_auroc']:.3f}",
                      f"{s['both_auroc_ge_0.9']:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
