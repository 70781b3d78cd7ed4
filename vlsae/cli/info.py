"""``vlsae info``: what a trained SAE is and how its training went."""
from __future__ import annotations

import argparse
import json

from vlsae.training.log import format_value
from vlsae.training.run import describe_run

HELP = "show a run's architecture, sizes, training summary and metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (finished or interrupted) or SAE checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table


    info = describe_run(args.run)
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
    Console().print(table)
    return 0
