"""``vlsae filter``: score image-text pairs, keep the best, write the cleaner dataset.

The work is the ``filter`` task (:mod:`evals.tasks.filter`, around
:func:`multimodal.filtering.filter_dataset`), which checks every flag before a
model loads; this module parses the flags and prints the outcome.

Data-parallel: under ``torchrun --nproc-per-node N -m vlsae filter ...`` the
shards are scored across the processes, rank 0 fitting the scorer first and
deciding and writing last (:func:`multimodal.filtering.filter_distributed`);
process 0 prints.
"""
from __future__ import annotations

import argparse

from evals.tasks import run_task
from evals.tasks.filter import FilterTask
from multimodal.filtering import FilterConfig, SCORERS
from multimodal.pairs import DEFAULT_MAX_SKIPPED
from multimodal.ranks import Ranks

DATA_PARALLEL = True  # torchrun splits the scoring across processes
HELP = "score image-text pairs by SAE concepts (SAE-V, VL-SAE) or CLIPScore, keep the best, write shards + report"
_DEFAULTS = FilterConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorer", required=True, metavar="NAME",
                        help=f"pair scorer, higher = keep: {SCORERS.listing()} (required)")
    parser.add_argument("--data", required=True,
                        help="webdataset pair shards, e.g. 'DIR/{000000..000009}.tar', or a folder of shards (required)")
    parser.add_argument("--out", required=True,
                        help="folder for the kept shards, scores.csv, filter.json and index.html; must be empty unless "
                             "--overwrite (required)")
    parser.add_argument("--model", default="", help="model adapter spec, e.g. shapes-clip or shapes-llava "
                                                    "(default: none; needed by every scorer but random)")
    parser.add_argument("--sae", default="", help="trained SAE run folder (default: none; needed by saev, vl-overlap, "
                                                  "vl-jaccard, l0, cooc-l0)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--keep", type=float, metavar="FRACTION",
                      help="keep this fraction of the pairs, the highest-scoring, in (0, 1] (default: none; give it or "
                           "--threshold)")
    rule.add_argument("--threshold", type=float, metavar="T", help="keep every pair scoring at least T (default: none)")
    parser.add_argument("--hook", default="", help="hook point (default: the one the SAE was trained on, else final)")
    parser.add_argument("--tokens", default="", choices=["", "cls", "patch", "all", "mean"],
                        help="token selection (default: the SAE's, else cls)")
    parser.add_argument("--theta", type=float, default=_DEFAULTS.theta,
                        help=f"a latent is active on a side when its largest value there exceeds this (default: {_DEFAULTS.theta})")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=f"seed of the random scorer (default: {_DEFAULTS.seed})")
    parser.add_argument("--probe", default="", help="pair shards for SAE-V's cross-modal weights (default: --data)")
    parser.add_argument("--probe-pairs", type=int, default=_DEFAULTS.probe_pairs,
                        help=f"probe pairs SAE-V's weights are computed on (default: {_DEFAULTS.probe_pairs})")
    parser.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size,
                        help=f"pairs per forward pass (default: {_DEFAULTS.batch_size})")
    parser.add_argument("--device", default=_DEFAULTS.device, help=f"auto, cpu, cuda or cuda:N (default: {_DEFAULTS.device})")
    parser.add_argument("--shards", default="", metavar="I/N",
                        help="score only shards j with j %% N == I and write no output; rerun without it to merge "
                             "(default: all shards, and write the output)")
    parser.add_argument("--max-skipped", type=float, default=DEFAULT_MAX_SKIPPED, metavar="FRACTION",
                        help=f"largest fraction of the pairs damaged shards may lose before the run fails (default: {DEFAULT_MAX_SKIPPED})")
    parser.add_argument("--cards", type=int, default=_DEFAULTS.extremes,
                        help=f"highest- and lowest-scoring pairs shown in the report (default: {_DEFAULTS.extremes})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: off, bar shown)")


def run(args: argparse.Namespace) -> int:
    config = FilterConfig(scorer=args.scorer, data=args.data, out=args.out, model=args.model, sae=args.sae,
                          keep=args.keep, threshold=args.threshold, hook=args.hook, tokens=args.tokens, theta=args.theta,
                          seed=args.seed, probe=args.probe, probe_pairs=args.probe_pairs, batch_size=args.batch_size,
                          device=args.device, shards=args.shards, max_skipped=args.max_skipped, extremes=args.cards,
                          overwrite=args.overwrite, progress=not args.quiet)
    result = run_task("filter", config)
    if not Ranks.from_env().is_main:
        return 0
    for line in FilterTask.describe(result):
        print(line)
    return 0
