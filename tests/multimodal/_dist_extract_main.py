"""Entry script for the split-extraction tests: ``torchrun ... _dist_extract_main.py --data D --out O [...]``.

Parses the flags the tests need into an :class:`~multimodal.extract.ExtractConfig`, runs
:func:`multimodal.extract_distributed.extract_distributed` and prints its summary as JSON (rank 0);
a one-line error goes to stderr as ``error: ...`` with exit code 2, on every rank.
"""
from __future__ import annotations

import argparse
import json
import sys

from vlsae.errors import VlsaeError

from multimodal.extract import ExtractConfig
from multimodal.extract_distributed import Ranks, extract_distributed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--hook", default="final")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--shard-rows", type=int, default=50_000)
    parser.add_argument("--max-skipped", type=float, default=0.01)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    config = ExtractConfig(model=args.model, data=args.data, out=args.out, hook=args.hook, batch_size=args.batch_size,
                           shard_rows=args.shard_rows, max_skipped=args.max_skipped, limit=args.limit,
                           overwrite=args.overwrite, device="cpu", workers=1, progress=False)
    try:
        result = extract_distributed(config)
    except VlsaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if Ranks.from_env().is_main:
        print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
