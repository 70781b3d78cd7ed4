"""``vlsae concepts``: encode a dataset with a trained SAE and write the concept report.

The work is the ``concepts`` task (:mod:`evals.tasks.concepts`, around
:func:`evals.concepts.concepts_report`), which checks ``--out`` before loading
anything; this module parses the flags and prints the headline.
"""
from __future__ import annotations

import argparse

from evals.tasks import run_task
from multimodal.pairs import DEFAULT_MAX_SKIPPED
from evals.tasks.concepts import ConceptsConfig, ConceptsTask

HELP = "what each latent means: concept cards, modality scores, planted-concept matrix (HTML report)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", required=True, help="trained SAE run folder (required)")
    parser.add_argument("--data", required=True,
                        help="pair shards, e.g. 'DIR/{000000..000009}.tar', or a folder of shards (required)")
    parser.add_argument("--model", required=True, help="adapter spec the SAE was trained on, e.g. shapes-clip (required)")
    parser.add_argument("--out", required=True,
                        help="report folder to write, index.html inside; must be writable and empty unless --overwrite (required)")
    parser.add_argument("--hook", default="final", help="hook point the SAE was trained on (default: final)")
    parser.add_argument("--tokens", default="cls", choices=["cls", "mean"],
                        help="token selection, one row per pair and modality: cls or mean (default: cls)")
    parser.add_argument("--limit", type=int, default=2000, help="pairs to analyse, the first ones of --data (default: 2000)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass of the model (default: 64)")
    parser.add_argument("--device", default="auto", help="device for the model: auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--cards", type=int, default=24, help="concept cards in the report (default: 24)")
    parser.add_argument("--max-skipped", type=float, default=DEFAULT_MAX_SKIPPED, metavar="FRACTION",
                        help=f"largest fraction of the pairs damaged shards may lose before the report refuses (default: {DEFAULT_MAX_SKIPPED})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (default: off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: off, bars shown)")


def run(args: argparse.Namespace) -> int:
    config = ConceptsConfig(sae=args.sae, data=args.data, model=args.model, out=args.out, hook=args.hook,
                            tokens=args.tokens, limit=args.limit, batch_size=args.batch_size, device=args.device,
                            cards=args.cards, overwrite=args.overwrite, progress=not args.quiet,
                            max_skipped=args.max_skipped)
    for line in ConceptsTask.describe(run_task("concepts", config)):
        print(line)
    return 0
