"""``vlsae info``: what a trained SAE is and how its training went."""
from __future__ import annotations

import argparse
import json

HELP = "show a run's architecture, sizes, training summary and metrics"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run or checkpoint folder")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vlsae.training.log import format_value
    from vlsae.training.run import describe_run

    info = describe_run(args.run)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    console = Console()
    table = Table(title=f"{info['arch']} SAE at {info['path']}", show_header=False)
    table.add_column("key")
    table.add_column("value", justify="right")
    table.add_row("architecture", info["arch"])
    table.add_row("d_in x n_latents", f"{info['d_in']} x {info['n_latents']}")
    for key, value in info["config"].items():
        if key not in ("d_in", "n_latents"):
            table.add_row(f"sae.{key}", format_value(value))
    table.add_row("alignment stage", "yes" if info["alignment_stage"] else "no")
    if "status" in info:
        table.add_row("status", info["status"])
    summary = info.get("training", {}).get("summary", {})
    for key, value in summary.items():
        if key not in ("arch", "d_in", "n_latents"):
            table.add_row(key, format_value(value))
    console.print(table)
    return 0
