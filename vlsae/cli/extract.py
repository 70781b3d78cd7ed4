"""``vlsae extract``: run a model adapter over pair shards into an activation cache.

All the work is :func:`multimodal.extract.extract`; this module parses the
arguments into an :class:`~multimodal.extract.ExtractConfig` and prints the
result. ``--list-hooks`` prints the hook points of ``--model`` with their
modalities and widths instead.
"""
from __future__ import annotations

import argparse

from vlsae.config import field_help

HELP = "extract activations of a model (CLIP, timm, ...) on image-caption shards into an activation cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from multimodal.extract import ExtractConfig

    h = field_help(ExtractConfig)
    parser.add_argument("--model", default="shapes-clip", metavar="SPEC", help=h["model"] + " (default: shapes-clip)")
    parser.add_argument("--data", default="", help=h["data"])
    parser.add_argument("--out", default="", metavar="ACTS", help=h["out"])
    parser.add_argument("--hook", default="final", help=h["hook"] + " (default: final)")
    parser.add_argument("--tokens", default="cls", choices=["cls", "patch", "all", "mean"], help=h["tokens"])
    parser.add_argument("--batch-size", type=int, default=64, help=h["batch_size"] + " (default: 64)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help=h["dtype"])
    parser.add_argument("--device", default="auto", help=h["device"])
    parser.add_argument("--shard-rows", type=int, default=50_000, help=h["shard_rows"] + " (default: 50000)")
    parser.add_argument("--limit", type=int, default=None, help=h["limit"])
    parser.add_argument("--workers", type=int, default=2, help=h["workers"] + " (default: 2)")
    parser.add_argument("--reader-process", action="store_true", help=h["reader_process"])
    parser.add_argument("--overwrite", action="store_true", help=h["overwrite"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list-hooks", action="store_true", help="print the hook points of --model and exit")


def run(args: argparse.Namespace) -> int:
    from multimodal.adapters import create_adapter
    from multimodal.extract import ExtractConfig, extract

    if args.list_hooks:
        adapter = create_adapter(args.model, device=args.device, dtype=args.dtype)
        print(f"hook points of {args.model} (join one per modality with a comma):")
        points = adapter.hook_points()
        column = max((len(p) for p in points), default=0) + 2  # long names (text_encoder.embeddings) stay aligned
        for point in points:
            widths = adapter.widths(point)
            print(f"  {point:<{column}}" + ", ".join(f"{m} {w}" for m, w in widths.items()))
        return 0
    config = ExtractConfig(model=args.model, data=args.data, out=args.out, hook=args.hook, tokens=args.tokens,
                           batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                           shard_rows=args.shard_rows, limit=args.limit, workers=args.workers,
                           reader_process=args.reader_process, overwrite=args.overwrite, progress=not args.no_progress)
    result = extract(config)
    resumed = f", resumed after {result.resumed_from}" if result.resumed_from else ""
    rows = ", ".join(f"{m} {n} x {result.width[m]}" for m, n in result.rows.items())
    print(f"wrote {result.path}: {result.n_pairs} pairs ({rows}){resumed}; "
          f"{result.seconds:.1f} s, {result.pairs_per_second:.0f} pairs/s")
    return 0
