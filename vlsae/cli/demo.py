"""``vlsae demo``: the whole pipeline on the embedded default (ShapesWorld + shapes-clip)."""
from __future__ import annotations

import argparse

from evals.tasks import run_task
from evals.tasks.demo import DemoConfig, DemoTask

HELP = ("run the whole pipeline offline: leaderboard, ShapesWorld, shapes-clip, extraction, TopK + VL-SAE, concept report, "
        "OOD detection, zero-shot, filtering, steering")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="demo folder, reused and continued if it exists (default: runs/demo)")
    parser.add_argument("--pairs", type=int, default=4000, help="ShapesWorld pairs to generate (default: 4000)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per SAE (default: 1500)")
    parser.add_argument("--no-synth", action="store_true", help="skip the planted-feature leaderboard")
    parser.add_argument("--no-apps", action="store_true", help="skip the applications (OOD detection, zero-shot, filtering, steering)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or tables")


def run(args: argparse.Namespace) -> int:
    config = DemoConfig(out=args.out, pairs=args.pairs, steps=args.steps, synth=not args.no_synth, progress=not args.quiet,
                        applications=not args.no_apps)
    for line in DemoTask.describe(run_task("demo", config)):
        print(line)
    return 0
