"""``vlsae world``: write a ShapesWorld dataset as webdataset shards."""
from __future__ import annotations

import argparse

from multimodal.shapesworld import ShapesWorldConfig, write_world

HELP = "generate ShapesWorld image-caption pairs with planted concepts as webdataset shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for the shards, must be empty unless --overwrite (required)")
    parser.add_argument("--n", type=int, default=50_000, help="number of pairs (default: 50000)")
    parser.add_argument("--shard-size", type=int, default=5_000, help="pairs per shard (default: 5000)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--holdout", action="append", default=[], metavar="RULE",
                        help="leave out objects matching RULE, e.g. shape=star or shape=circle+colour=blue (repeatable; default: none)")
    parser.add_argument("--holdout-only", action="store_true", help="invert: every image shows a held-out object (OOD split)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="fraction of pairs with a corrupted caption, flagged in the json (default: 0)")
    parser.add_argument("--max-objects", type=int, default=3, help="most objects per image, 1-3 (default: 3)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default: 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table


    config = ShapesWorldConfig(seed=args.seed, image_size=args.image_size, holdout=tuple(args.holdout),
                               holdout_only=args.holdout_only, noise=args.noise, max_objects=args.max_objects,
                               min_objects=min(1, args.max_objects))
    summary = write_world(config, args.out, n=args.n, shard_size=args.shard_size, overwrite=args.overwrite,
                          workers=args.workers, progress=not args.quiet)
    if not args.quiet:
        table = Table(title=f"ShapesWorld: {summary['n']} pairs in {summary['shards']} shards")
        table.add_column("attribute")
        table.add_column("counts")
        for attr, counts in summary["counts"].items():
            if counts:
                table.add_row(attr, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        Console().print(table)
    print(f"wrote {summary['pattern']}")
    return 0
