"""Wall time of a 3-SAE sweep (one read of the stream) vs 3 separate runs vs 1 run.

    python benchmarks/sweep.py                                   # 300k x 512 fp32 tensor file, k = 8, 16, 32
    python benchmarks/sweep.py --rows 1000000 --steps 200 --dir /tmp/vlsae-sweep-bench

Every row is a `vlsae train` command run as a user would run it (a fresh process: interpreter, imports,
reading the data, training, evaluation, writing the run), on a .safetensors tensor file written once to
--dir, so its pages are in the OS cache for every row alike (each process still reads and copies the
whole file: the cost of reading a large activation file). Rows: one SAE (k = the first value); the three
SAEs as three separate runs, one after the other; the three as one `--sweep sae.k=...`. The target: the
sweep costs at most 1.5x one run. "read s" is the sweep's own record of the time spent reading
(sweep.json's read_seconds; opening the file is not in it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file


def command(data: Path, out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlsae", "train", "--data", str(data), "--latents", str(args.latents),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--device", "cpu", "--quiet",
            "--checkpoint-every", "0", "--set", "train.tensorboard=false", "--out", str(out), *extra]


def timed(cmd: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="rows of the tensor file (default 300000)")
    parser.add_argument("--d", type=int, default=512, help="activation width (default 512)")
    parser.add_argument("--latents", type=int, default=1024, help="SAE latents (default 1024)")
    parser.add_argument("--ks", default="8,16,32", help="the sweep's three k values (default 8,16,32)")
    parser.add_argument("--steps", type=int, default=40, help="steps per SAE (default 40)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per batch (default 1024)")
    parser.add_argument("--dir", default="/tmp/vlsae-sweep-bench", help="scratch folder, emptied first (default /tmp/vlsae-sweep-bench)")
    args = parser.parse_args()
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data = root / "acts.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"acts": torch.randn(args.rows, args.d, generator=g) * (1 + torch.rand(args.d, generator=g))}, data)
    ks = args.ks.split(",")
    timed(command(data, root / "warm", args, "--k", ks[0]))  # the file's pages and the interpreter's files cached

    one = timed(command(data, root / "one", args, "--k", ks[0]))
    separate = sum(timed(command(data, root / f"k{k}", args, "--k", k)) for k in ks)
    swept = timed(command(data, root / "sweep", args, "--sweep", f"sae.k={args.ks}"))
    record = json.loads((root / "sweep" / "sweep.json").read_text())

    table = Table(title=f"{args.rows:,} x {args.d} fp32 file ({data.stat().st_size / 2**20:,.0f} MiB), {args.latents} latents, "
                        f"{args.steps} steps of {args.batch_size}, {platform.processor() or platform.machine()}, "
                        f"{os.cpu_count()} cores")
    for column in ("run", "SAEs", "wall s", "x one run"):
        table.add_column(column, justify="right" if column != "run" else "left")
    table.add_row(f"one run (k={ks[0]})", "1", f"{one:.1f}", "1.00")
    table.add_row("separate runs", str(len(ks)), f"{separate:.1f}", f"{separate / one:.2f}")
    table.add_row(f"sweep sae.k={args.ks}", str(len(ks)), f"{swept:.1f}", f"{swept / one:.2f}")
    Console().print(table)
    print(f"sweep.json: {record['seconds']} s inside run_sweep, {record['read_seconds']} s of it reading; per arm: "
          + ", ".join(f"{a['name']} {a['seconds']} s (fvu {a['fvu']:.3f})" for a in record["arms"]))


if __name__ == "__main__":
    main()
