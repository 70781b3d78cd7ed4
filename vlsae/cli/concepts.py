"""``vlsae concepts``: encode a dataset with a trained SAE and write the concept report."""
from __future__ import annotations

import argparse

HELP = "what each latent means: concept cards, modality scores, planted-concept matrix (HTML report)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", required=True, help="trained SAE run folder")
    parser.add_argument("--data", required=True, help="pair shards, e.g. 'DIR/{000000..000009}.tar', or a folder of shards")
    parser.add_argument("--model", required=True, help="adapter spec the SAE was trained on, e.g. shapes-clip")
    parser.add_argument("--out", required=True, help="report folder (index.html inside)")
    parser.add_argument("--hook", default="final", help="hook point the SAE was trained on")
    parser.add_argument("--tokens", default="cls", help="token selection: cls or mean (one row per pair)")
    parser.add_argument("--limit", type=int, default=2000, help="pairs to analyse")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cards", type=int, default=24, help="concept cards in the report")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from evals.concepts_report import concepts_report

    result = concepts_report(args.sae, args.data, args.model, args.out, hook=args.hook, tokens=args.tokens,
                             limit=args.limit, batch_size=args.batch_size, device=args.device, n_cards=args.cards,
                             overwrite=args.overwrite, progress=not args.quiet)
    fvu = ", ".join(f"{m} {v:.3f}" for m, v in result["fvu"].items())
    print(f"{result['pairs']} pairs, FVU {fvu}, {result['multimodal_fraction']:.0%} multimodal latents")
    planted = result.get("planted") or {}
    if planted:
        print(f"planted values: same latent on images and captions for {planted['same_index_rate']:.0%}; "
              f"mean AUROC images {planted['image_auroc']:.3f}, captions {planted['text_auroc']:.3f}")
    print(f"report: {result['index']}")
    return 0
