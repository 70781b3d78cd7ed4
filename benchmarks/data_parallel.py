"""One process vs N data-parallel processes (`vlsae train --nproc N`) on a planted suite: same SAE, and its cost.

    python benchmarks/data_parallel.py                      # independent suite, 2 ranks, 2,000 steps
    python benchmarks/data_parallel.py --nproc 2 --steps 500 --dir /tmp/vlsae-dp-bench

Both rows are the same `vlsae train --synthetic independent` command (same global batch, seed and init), run
as a user runs it (a fresh process: imports, data, training, evaluation, writing the run); the second adds
`--nproc N`, which launches torchrun (gloo on the CPU). Columns: the run's held-out FVU, the planted features
recovered (FRR at cosine 0.9, MMCS), the least cosine between a latent's decoder row in the two runs (1.0:
latent i is the same feature in both), wall seconds. The acceptance: FVU within 2 % and the same recovery.
On one 2-core machine the N processes share its cores, so the wall time says what the machinery costs, not
what N machines gain.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from evals.synthetic.generators import generate
from evals.synthetic.score import decoder_directions, score_sae
from vlsae.checkpoint import load_sae

from sweep import timed  # benchmarks/ is this script's folder


def train(out: Path, args: argparse.Namespace, nproc: int) -> float:
    suite = {"n_features": args.features, "d": args.d, "expected_l0": args.l0}
    command = [sys.executable, "-m", "vlsae", "train", "--synthetic", "independent",
               "--set", f"data.options={json.dumps(suite)}", "--set", f"data.n_train={args.rows}",
               "--set", "data.n_test=5000", "--latents", str(args.latents), "--k", str(args.k),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--quiet", "--out", str(out),
               "--checkpoint-every", "0", "--set", "train.tensorboard=false", *(["--nproc", str(nproc)] if nproc > 1 else [])]
    return timed(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the data-parallel row (default: 2)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch (default: 1024)")
    parser.add_argument("--features", type=int, default=256, help="planted features (default: 256)")
    parser.add_argument("--d", type=int, default=64, help="activation width (default: 64)")
    parser.add_argument("--l0", type=int, default=4, help="planted features active per row (default: 4)")
    parser.add_argument("--latents", type=int, default=512, help="SAE latents (default: 512)")
    parser.add_argument("--k", type=int, default=4, help="TopK k (default: 4)")
    parser.add_argument("--rows", type=int, default=200_000, help="training rows drawn (default: 200000)")
    parser.add_argument("--dir", default="/tmp/vlsae-dp-bench", help="work folder, replaced (default: /tmp/vlsae-dp-bench)")
    args = parser.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs = {1: work / "one", args.nproc: work / f"ranks{args.nproc}"}
    seconds = {n: train(out, args, n) for n, out in runs.items()}
    data = generate("independent", seed=0, n_train=args.rows, n_test=5000,
                    n_features=args.features, d=args.d, expected_l0=args.l0)
    saes = {n: load_sae(out) for n, out in runs.items()}
    directions = {n: torch.nn.functional.normalize(decoder_directions(sae), dim=1) for n, sae in saes.items()}
    same = float((directions[1] * directions[args.nproc]).sum(1).min())

    table = Table(title=f"TopK on the independent suite ({args.features} features, d={args.d}), {args.steps} steps of "
                        f"{args.batch_size} rows ({platform.machine()}, {torch.get_num_threads()} threads, torch "
                        f"{torch.__version__})")
    for column in ("processes", "held-out FVU", "FRR@0.9", "MMCS", "least cos to 1-process latent", "wall s"):
        table.add_column(column, justify="right")
    for n, out in runs.items():
        summary = json.loads((out / "training.json").read_text())["summary"]
        score = score_sae(saes[n], data)
        table.add_row(str(n), f"{summary['fvu']:.4f}", f"{score['frr_0.9']:.3f}", f"{score['mmcs']:.3f}",
                      "1.000" if n == 1 else f"{same:.3f}", f"{seconds[n]:.1f}")
    Console().print(table)
    one, many = (json.loads((out / "training.json").read_text())["summary"]["fvu"] for out in runs.values())
    print(f"FVU difference: {abs(many - one) / one:.2%} of the 1-process FVU (acceptance: within 2 %)")


if __name__ == "__main__":
    main()
