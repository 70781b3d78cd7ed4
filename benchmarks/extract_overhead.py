"""Extraction overhead: the adapter's bare forward pass vs ``vlsae extract`` end to end.

For each hook, the script times (1) ``adapter.forward`` alone on already
prepared batches (the model plus token selection and the copy to the CPU), and
(2) the whole extraction: reading webdataset shards, decoding, transforms and
tokenising in background threads, the forward pass, and writing safetensors
shards. Overhead = end-to-end time per batch / bare forward time per batch - 1;
the target is at most 10 %, i.e. reading, preprocessing and writing hide behind
the forward pass.

    python benchmarks/extract_overhead.py                       # shapes-clip on ShapesWorld, CPU
    python benchmarks/extract_overhead.py --model open_clip:ViT-B-32:random --pairs 2048 --device cuda

The data are ShapesWorld pairs written to a temporary folder unless --data is given.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multimodal.adapters import create_adapter  # noqa: E402
from multimodal.extract import ExtractConfig, extract  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(adapter, pairs, hook: str, tokens: str, batch_size: int, repeats: int) -> float:
    """Median seconds of one forward pass over a prepared batch."""
    modalities = list(adapter.parse_hook(hook))
    prepared = adapter.prepare(pairs[:batch_size], modalities=modalities)
    adapter.forward(prepared, hook, tokens)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(adapter.device)
        tick = time.perf_counter()
        adapter.forward(prepared, hook, tokens)
        _sync(adapter.device)
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def prepare_time(adapter, pairs, hook: str, batch_size: int) -> float:
    modalities = list(adapter.parse_hook(hook))
    tick = time.perf_counter()
    adapter.prepare(pairs[:batch_size], modalities=modalities)
    return time.perf_counter() - tick


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--hooks", default="final;visual.blocks.1;text.blocks.1",
                        help="hooks to time, separated by ';' (a hook may itself be comma-joined)")
    parser.add_argument("--tokens", default="cls")
    parser.add_argument("--data", default=None, help="pair shards (default: write ShapesWorld pairs to a temp folder)")
    parser.add_argument("--pairs", type=int, default=2048, help="pairs to extract per hook")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reader-process", action="store_true", help="read and prepare in a forked reader process")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from multimodal.pairs import iter_pairs
    from rich.console import Console
    from rich.table import Table

    adapter = create_adapter(args.model, device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory(prefix="vlsae-bench-") as tmp:
        data = args.data
        if data is None:
            from multimodal.shapesworld import ShapesWorldConfig, write_world

            data = write_world(ShapesWorldConfig(), Path(tmp) / "world", n=args.pairs, shard_size=1000,
                               progress=False)["pattern"]
        pairs = [p for _, p in zip(range(args.batch_size), iter_pairs(data))]

        table = Table(title=f"extraction overhead: {args.model} on {adapter.device} ({args.dtype}), "
                            f"batch {args.batch_size}, {args.workers} prepare threads{' in a reader process' if args.reader_process else ''}, torch threads {torch.get_num_threads()}")
        for column in ("hook", "tokens", "bare forward ms/batch", "prepare ms/batch (1 thread)",
                       "forward ms/batch inside extract", "extract ms/batch", "overhead", "pairs/s"):
            table.add_column(column, justify="right" if column not in ("hook", "tokens") else "left")
        for hook in [h for h in args.hooks.split(";") if h.strip()]:
            tokens = "cls" if hook.endswith("final") else args.tokens
            bare = bare_forward(adapter, pairs, hook, tokens, args.batch_size, args.repeats)
            prep = prepare_time(adapter, pairs, hook, args.batch_size)
            config = ExtractConfig(model=args.model, data=data, out=str(Path(tmp) / f"acts-{hook}"), hook=hook,
                                   tokens=tokens, batch_size=args.batch_size, dtype=args.dtype, limit=args.pairs,
                                   workers=args.workers, reader_process=args.reader_process, progress=False)
            result = extract(config, adapter=adapter)
            per_batch = result.seconds / max(result.batches, 1)
            inside = result.forward_seconds / max(result.batches, 1)
            table.add_row(hook, tokens, f"{bare * 1e3:.1f}", f"{prep * 1e3:.1f}", f"{inside * 1e3:.1f}", f"{per_batch * 1e3:.1f}",
                          f"{per_batch / bare - 1:+.0%}", f"{result.pairs_per_second:.0f}")
        Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
