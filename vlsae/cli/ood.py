"""``vlsae ood``: OOD detection from SAE concepts, measured against raw-embedding baselines.

    vlsae ood --sae runs/vl --model shapes-clip --fit data/fit --id data/id \\
        --ood noise=data/ood/noise --ood photo=data/ood/photo --out reports/ood

The work is the ``ood`` task (:func:`evals.ood.run_ood`), which checks every
set and the SAE's width before extracting anything; this module parses the
flags and prints the verdict per OOD set.

Data-parallel: under ``torchrun --nproc-per-node N -m vlsae ood ...`` each set's
extraction is split across the processes and process 0 scores, writes the
report and prints (:func:`evals.ood.run_ood`).
"""
from __future__ import annotations

import argparse

from evals.ood import OODConfig, list_scores
from evals.tasks import run_task
from evals.tasks.ood import OODTask
from multimodal.pairs import DEFAULT_MAX_SKIPPED
from multimodal.ranks import Ranks

DATA_PARALLEL = True  # torchrun splits each set's extraction across processes
HELP = "OOD detection: SAE scores vs raw-embedding baselines, AUROC/FPR95/AUPR with intervals (HTML report)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", required=True, help="trained SAE run folder, trained on the model's final embeddings (required)")
    parser.add_argument("--model", required=True, help="adapter spec of the model, e.g. shapes-clip (required)")
    parser.add_argument("--fit", required=True,
                        help="in-distribution training data for the reference statistics (KNN banks, class means, "
                             "covariance, class profiles): pair shards or an activation cache (required)")
    parser.add_argument("--id", required=True,
                        help="held-out in-distribution pairs to score, neither --fit nor the SAE's training rows: "
                             "shards or an activation cache (required)")
    parser.add_argument("--ood", action="append", required=True, metavar="NAME=DATA",
                        help="an OOD set to score: a name and its shards or activation cache (required; repeat for more sets)")
    parser.add_argument("--out", required=True,
                        help="report folder: scores.csv, results.json, index.html, and the extracted caches (required)")
    parser.add_argument("--scores", default=None,
                        help=f"comma-separated scores to compute, of {', '.join(list_scores())} "
                             f"(default: every score the inputs allow)")
    parser.add_argument("--classes", default=None,
                        help="a classes file (JSON/YAML: classes, templates) for the zero-shot head "
                             "(default: every ShapesWorld object description)")
    parser.add_argument("--attribute", default=None,
                        help="head attribute whose predicted class conditions the class scores (default: the head's first, shape on ShapesWorld)")
    parser.add_argument("--k", type=int, default=10, help="KNN scores use the distance to the k-th nearest fit row (default: 10)")
    parser.add_argument("--lam", type=float, default=0.5,
                        help="concept-MCM's weight of the SAE concept similarity; 0 gives plain MCM (default: 0.5)")
    parser.add_argument("--temperature", type=float, default=1.0, help="MCM's softmax temperature on cosines (default: 1.0)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples of the 95 %% intervals, 0 for none (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    parser.add_argument("--cache", default=None,
                        help="folder for the extracted activation caches and the zero-shot head (default: OUT/acts)")
    parser.add_argument("--batch-size", type=int, default=128, help="pairs per forward pass when extracting (default: 128)")
    parser.add_argument("--device", default="auto", help="device for the model: auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--max-skipped", type=float, default=DEFAULT_MAX_SKIPPED, metavar="FRACTION",
                        help=f"largest fraction of pairs damaged shards may lose before extraction refuses (default: {DEFAULT_MAX_SKIPPED})")
    parser.add_argument("--no-figures", action="store_true", help="skip the ROC and histogram PNGs (default: off, drawn)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report of an earlier run in --out, reusing its caches (default: off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: off, bars shown)")


def run(args: argparse.Namespace) -> int:
    config = OODConfig(sae=args.sae, model=args.model, fit=args.fit, id=args.id, out=args.out, ood=list(args.ood),
                       scores=[s.strip() for s in args.scores.split(",") if s.strip()] if args.scores else None,
                       classes=args.classes, attribute=args.attribute, k=args.k, lam=args.lam,
                       temperature=args.temperature, bootstrap=args.bootstrap, seed=args.seed, cache=args.cache,
                       batch_size=args.batch_size, device=args.device, max_skipped=args.max_skipped,
                       figures=not args.no_figures, overwrite=args.overwrite, progress=not args.quiet)
    result = run_task("ood", config)
    if not Ranks.from_env().is_main:
        return 0
    for line in OODTask.describe(result):
        print(line)
    return 0
