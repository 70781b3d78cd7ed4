"""``vlsae info``: what a trained SAE is and how its training went.

With ``--zeroshot DATA --model SPEC`` it also measures the SAE's downstream
fidelity on a CLIP: zero-shot accuracy on the single-object ShapesWorld pairs
of DATA with the image and prompt embeddings replaced by their reconstructions
(:func:`evals.zeroshot.fidelity.fidelity_of_run`), the vision-language analogue
of a language SAE's loss recovered, shown beside FVU.
"""
from __future__ import annotations

import argparse
import json

from evals.zeroshot.fidelity import describe_fidelity, fidelity_of_run
from vlsae.training.log import format_value
from vlsae.training.run import describe_run

HELP = "show a run's architecture, sizes, training summary and metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (finished or interrupted) or SAE checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--zeroshot", default="", metavar="DATA",
                        help="also measure zero-shot accuracy with the SAE's reconstructions spliced in, on the "
                             "single-object ShapesWorld pairs of these shards (default: off)")
    parser.add_argument("--model", default="shapes-clip",
                        help="CLIP-style adapter spec the SAE was trained on, for --zeroshot (default: shapes-clip)")
    parser.add_argument("--acts", default="", help="activation cache of --model's final embeddings of the --zeroshot "
                                                   "shards, to skip extracting images (default: none)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only the first N single-object pairs for --zeroshot (default: all)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table


    info = describe_run(args.run)
    if args.zeroshot:
        info["zero_shot_fidelity"] = fidelity_of_run(args.run, args.model, args.zeroshot, acts=args.acts or None,
                                                     limit=args.limit)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    table = Table(title=f"{info['arch']} SAE at {info['path']}", show_header=False)
    table.add_column("key")
    table.add_column("value", justify="right")
    table.add_row("status", info["status"])
    table.add_row("architecture", info["arch"])
    table.add_row("d_in x n_latents", f"{info['d_in']} x {info['n_latents']}")
    table.add_row("parameters", f"{info['parameters']:,}")
    for key, value in info["config"].items():
        if key not in ("d_in", "n_latents"):
            table.add_row(f"sae.{key}", format_value(value))
    table.add_row("alignment stage", "yes" if info["alignment_stage"] else "no")
    training = info.get("training", {})
    for key, value in training.get("summary", {}).items():
        if key not in ("arch", "d_in", "n_latents"):
            table.add_row(key, format_value(value))
    if "training" not in info and "last_logged" in info:
        for key, value in info["last_logged"].items():
            table.add_row(f"last logged {key}", format_value(value))
    train_config = training.get("train_config", {})
    for key in ("batch_size", "seed", "b_dec_init"):
        if key in train_config:
            table.add_row(f"train.{key}", format_value(train_config[key]))
    fidelity = info.get("zero_shot_fidelity")
    if fidelity:
        recovered = fidelity["mean_recovered"]
        table.add_row("zero-shot recovered", "n/a" if recovered is None else f"{recovered:.3f} "
                      f"({'+'.join(fidelity['spliced'])} spliced, {fidelity['records']} pairs)")
    Console().print(table)
    if fidelity:
        print(f"zero-shot accuracy (%) with the reconstructions spliced in, {fidelity['model']} on {fidelity['data']}:")
        for line in describe_fidelity(fidelity["attributes"]):
            print(f"  {line}")
    return 0
