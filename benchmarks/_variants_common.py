"""What every claim of ``benchmarks/variants.py`` shares: the claim registry, training as the leaderboard
trains, and the tables (one row per arm, mean ± sd over seeds)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.synthetic.leaderboard import ARCH_DEFAULTS  # noqa: E402
from vlsae import create_sae  # noqa: E402
from vlsae.training import TensorSource, TrainConfig, init_seed, train  # noqa: E402

CLAIMS: dict[str, Callable[[argparse.Namespace], list[dict[str, Any]]]] = {}
console = Console(width=200)


def claim(name: str) -> Callable:
    """Register a claim's function under ``name`` (the order of registration is the run order)."""
    def wrap(fn: Callable) -> Callable:
        CLAIMS[name] = fn
        return fn
    return wrap


# ------------------------------------------------------------------ helpers
def fit(arch: str, x: torch.Tensor | dict[str, torch.Tensor], width: int, seed: int, steps: int, batch_size: int, **sae_kw: Any) -> Any:
    """Train one SAE as the leaderboard does (its per-arch defaults, then ``sae_kw``, initial weights
    from :func:`vlsae.training.init_seed`, never the data's stream); returns (sae, summary)."""
    torch.manual_seed(init_seed(seed))
    kw = {**ARCH_DEFAULTS.get(arch, {}), **sae_kw}
    d_in = next(iter(x.values())).shape[1] if isinstance(x, dict) else x.shape[1]
    sae = create_sae(arch, d_in=d_in, n_latents=width, **kw)
    result = train(sae, TensorSource(x), TrainConfig(steps=steps, batch_size=batch_size, seed=seed, progress=False,
                                                     tensorboard=False, eval_rows=2048))
    return result.sae.cpu(), result.summary


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*r)
    console.print(t)


def arms_table(title: str, runs: dict[str, list[dict[str, Any]]], keys: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One row per arm: mean ± sd over its seeds of every key; returns the rows for the JSON."""
    rows, out = [], []
    for arm, seeds in runs.items():
        rows.append([arm, *[mean_sd([float(s[k]) for s in seeds]) for k, _ in keys], str(len(seeds))])
        out.append({"arm": arm, **{k: [float(s[k]) for s in seeds] for k, _ in keys}})
    table(title, ["arm", *[label for _, label in keys], "seeds"], rows)
    return out


