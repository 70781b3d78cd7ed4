"""``vlsae extract``: run a model adapter over pair shards into an activation cache.

All the work is :func:`multimodal.extract.extract`; this module parses the
arguments into an :class:`~multimodal.extract.ExtractConfig` and prints the
result. ``--list-hooks`` prints the hook points of ``--model`` with their
modalities and widths instead. Every flag's default is the config field's
default, and its help says what it is.

Data-parallel: under ``torchrun --nproc-per-node N -m vlsae extract ...`` the
shards are split across the processes
(:func:`multimodal.extract_distributed.extract_distributed`) and process 0 prints.
"""
from __future__ import annotations

import argparse
import dataclasses

from vlsae.config import field_help
from vlsae.errors import VlsaeError

from multimodal.adapters import create_adapter, get_adapter_class, list_adapters
from multimodal.extract import ExtractConfig, ExtractResult, check_extract_config
from multimodal.extract_hooks import extract_hooks, split_hooks
from multimodal.extract_distributed import Ranks, extract_distributed

DATA_PARALLEL = True  # torchrun splits the shards across processes
HELP = "extract activations of a model (CLIP, timm, ...) on image-caption shards into an activation cache"


def model_kinds() -> str:
    """Every registered adapter's spec form, for the --model help."""
    return ", ".join(get_adapter_class(name)[0].usage for name in list_adapters())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    h = field_help(ExtractConfig)
    default = {f.name: f.default for f in dataclasses.fields(ExtractConfig)}

    def add(flag: str, name: str, shown: str | None = None, **kw: object) -> None:
        """A flag whose default is the config's, stated at the end of its help."""
        text = shown if shown is not None else str(default[name])
        help_text = f"{h[name]} (default: {text})".replace("%", "%%")  # argparse formats help with %
        parser.add_argument(flag, default=default[name], help=help_text, **kw)

    parser.add_argument("--model", default=default["model"], metavar="SPEC",
                        help=f"{h['model']}; one of: {model_kinds()} (default: {default['model']})")
    add("--data", "data", shown="none, required")
    add("--out", "out", shown="none, required", metavar="ACTS")
    parser.add_argument("--hook", action="append", default=None, metavar="HOOK",
                        help=f"{h['hook']}; several hooks from one pass: a comma list naming a modality twice "
                             "(visual.blocks.3,visual.blocks.6) or --hook repeated, one cache each under --out "
                             f"(default: {default['hook']})")
    add("--tokens", "tokens", choices=["cls", "patch", "all", "mean"])
    add("--batch-size", "batch_size", type=int)
    add("--dtype", "dtype", choices=["fp32", "bf16", "fp16"])
    add("--device", "device")
    add("--shard-rows", "shard_rows", type=int)
    add("--limit", "limit", shown="None", type=int)
    add("--max-skipped", "max_skipped", shown=f"{default['max_skipped']:g}, 1 %", type=float, metavar="FRACTION")
    add("--workers", "workers", type=int)
    add("--reader-process", "reader_process", shown="off: threads", action="store_true")
    add("--overwrite", "overwrite", shown="off", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: off, a bar is shown)")
    parser.add_argument("--list-hooks", action="store_true",
                        help="print the hook points of --model and exit (default: off)")


def run(args: argparse.Namespace) -> int:
    main_process = Ranks.from_env().is_main
    if args.list_hooks:
        if not main_process:
            return 0
        adapter = create_adapter(args.model, device=args.device, dtype=args.dtype)
        print(f"hook points of {args.model} (join one per modality with a comma):")
        points = adapter.hook_points()
        column = max((len(p) for p in points), default=0) + 2  # long names (text_encoder.embeddings) stay aligned
        for point in points:
            widths = adapter.widths(point)
            print(f"  {point:<{column}}" + ", ".join(f"{m} {w}" for m, w in widths.items()))
        return 0
    values = args.hook or [ExtractConfig().hook]
    config = ExtractConfig(model=args.model, data=args.data, out=args.out, hook=",".join(values), tokens=args.tokens,
                           batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                           shard_rows=args.shard_rows, limit=args.limit, workers=args.workers,
                           reader_process=args.reader_process, max_skipped=args.max_skipped,
                           overwrite=args.overwrite, progress=not args.no_progress)
    several = len(values) > 1 or "," in values[0]  # a comma list may be one hook with a point per modality
    if several and Ranks.from_env().world > 1:
        if len(values) > 1:
            raise VlsaeError("several hooks do not split over torchrun's processes yet; extract them as one "
                             "process, or one hook per torchrun launch")
    elif several:
        return _several_hooks(config, values)
    result = extract_distributed(config)
    if not main_process:
        return 0
    return _print_one(result)


def _print_one(result: ExtractResult) -> int:
    resumed = f", resumed after {result.resumed_from}" if result.resumed_from else ""
    rows = ", ".join(f"{m} {n} x {result.width[m]}" for m, n in result.rows.items())
    skipped = result.skipped or {}
    lost = (f"; skipped {'at least ' if skipped.get('lower_bound') else ''}{skipped['pairs']} pairs "
            f"({skipped['fraction']:.1%}) of damaged shards") if skipped.get("pairs") else ""
    print(f"wrote {result.path}: {result.n_pairs} pairs ({rows}){resumed}; "
          f"{result.seconds:.1f} s, {result.pairs_per_second:.0f} pairs/s{lost}")
    return 0


def _several_hooks(config: ExtractConfig, values: list[str]) -> int:
    """One pass, one cache per hook (:mod:`multimodal.extract_hooks`), or a one-hook run when that is all they name."""
    check_extract_config(config)
    adapter = create_adapter(config.model, device=config.device, dtype=config.dtype)
    hooks = split_hooks(adapter, values)
    if len(hooks) == 1:  # e.g. visual.blocks.3,text.blocks.3: one point per modality, one cache
        config.hook = hooks[0]
        return _print_one(extract_distributed(config, adapter=adapter))
    results = extract_hooks(config, hooks, adapter=adapter)
    for hook, result in results.items():
        rows = ", ".join(f"{m} {n} x {result.width[m]}" for m, n in result.rows.items())
        print(f"  {hook:<24} {result.path}: {result.n_pairs} pairs ({rows})")
    first = next(iter(results.values()))
    print(f"wrote {len(results)} caches from one pass into {config.out} (hooks.json); {first.seconds:.1f} s, "
          f"{first.pairs_per_second:.0f} pairs/s")
    return 0
