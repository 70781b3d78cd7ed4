"""``vlsae similarity``: ITDA Jaccard similarity (and linear CKA) between models or layers.

The work is the ``similarity`` task (:mod:`evals.tasks.similarity`, around
:func:`evals.similarity.compare`); this module parses the flags and prints the result.
"""
from __future__ import annotations

import argparse

from evals.tasks import run_task
from evals.tasks.similarity import SimilarityConfig, SimilarityTask

HELP = "ITDA Jaccard similarity (and linear CKA) between ITDA runs or activation caches; layer matching for lists"
_D = SimilarityConfig(a=[], b=[])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", nargs="+", required=True, metavar="RUN_OR_ACTS",
                        help="ITDA run folders or activation caches of model a; several are its layers, in order (required)")
    parser.add_argument("--b", nargs="+", required=True, metavar="RUN_OR_ACTS",
                        help="the same for model b, layers in the same order as --a (required)")
    parser.add_argument("--modality", help="modality of paired caches, image or text (default: the cache's only one)")
    parser.add_argument("--k", type=int, default=_D.k, help=f"matching-pursuit steps of ITDAs built on caches (default: {_D.k})")
    parser.add_argument("--threshold", type=float, default=_D.threshold,
                        help=f"a row becomes an atom when this fraction of its squared norm is left unexplained "
                             f"(default: {_D.threshold})")
    parser.add_argument("--capacity", type=int, default=_D.capacity,
                        help=f"largest dictionary of ITDAs built on caches (default: {_D.capacity})")
    parser.add_argument("--max-rows", type=int, default=None, help="read only the first N rows of each cache (default: all)")
    parser.add_argument("--no-cka", action="store_true", help="skip linear CKA (default: computed for caches)")
    parser.add_argument("--out", help="write the result as JSON to this file (default: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: off)")


def run(args: argparse.Namespace) -> int:
    config = SimilarityConfig(a=args.a, b=args.b, modality=args.modality, k=args.k, threshold=args.threshold,
                              capacity=args.capacity, max_rows=args.max_rows, cka=not args.no_cka, out=args.out,
                              overwrite=args.overwrite)
    for line in SimilarityTask.describe(run_task("similarity", config)):
        print(line)
    return 0
