"""``vlsae darkmatter``: how much of an SAE's error is a linear function of its input, as a report page.

The work is the ``darkmatter`` task (:mod:`evals.tasks.darkmatter`, around
:func:`evals.darkmatter.run_darkmatter`); this module parses the flags and prints the figures.
"""
from __future__ import annotations

import argparse

from evals.tasks import run_task
from evals.tasks.darkmatter import DarkMatterConfig, DarkMatterTask

HELP = "dark matter of SAE errors: error and error-norm R² predicted linearly from the input, nonlinear FVU (report)"
_D = DarkMatterConfig(sae=[], data="", out="")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sae", nargs="+", required=True, metavar="RUN",
                        help="trained SAE run folders; two or more sizes add the error-norm agreement (required)")
    parser.add_argument("--data", required=True, metavar="ACTS",
                        help="activations: an activation cache folder or a .safetensors/.npy file (required)")
    parser.add_argument("--out", required=True, help="report folder: index.html, results.json, PNGs (required)")
    parser.add_argument("--modality", help="modality of paired data for a single-stream SAE (default: the one its run "
                                           "was trained on, else the data's only one)")
    parser.add_argument("--max-rows", type=int, default=_D.max_rows,
                        help=f"analyse the first N rows of each modality (default: {_D.max_rows})")
    parser.add_argument("--held-out", type=float, default=_D.held_out,
                        help=f"fraction of the rows the ridge fits are scored on (default: {_D.held_out})")
    parser.add_argument("--seed", type=int, default=_D.seed, help=f"seed of the fit/held-out split (default: {_D.seed})")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder (default: off)")


def run(args: argparse.Namespace) -> int:
    config = DarkMatterConfig(sae=args.sae, data=args.data, out=args.out, modality=args.modality,
                              max_rows=args.max_rows, held_out=args.held_out, seed=args.seed, overwrite=args.overwrite)
    for line in DarkMatterTask.describe(run_task("darkmatter", config)):
        print(line)
    return 0
