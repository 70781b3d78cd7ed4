"""How separable each planted ShapesWorld value is from the pixels themselves.

A small CNN is trained with labels (multi-label: does the scene hold a red
object, a star, a small object, something top-left?) on rendered ShapesWorld
images, and its held-out AUROC per value is printed. It answers whether a
value that a model's embedding fails to encode (``benchmarks/vl_shapesworld.py``
prints those probe ceilings) is hard in the world or lost by the model.

    python benchmarks/shapesworld_ceiling.py                     # default world, 1-3 objects
    python benchmarks/shapesworld_ceiling.py --world max_objects=1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.concepts import planted_labels  # noqa: E402
from evals.planted import auroc_matrix  # noqa: E402


def conv_block(c_in: int, c_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU(),
                               torch.nn.Conv2d(c_out, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU())


def classifier(n_out: int, width: int = 24) -> torch.nn.Module:
    """Four conv blocks, max-pooled over the image (a value anywhere in the scene counts)."""
    w = [width, 2 * width, 4 * width, 4 * width]
    return torch.nn.Sequential(conv_block(3, w[0]), torch.nn.MaxPool2d(2), conv_block(w[0], w[1]), torch.nn.MaxPool2d(2),
                               conv_block(w[1], w[2]), torch.nn.MaxPool2d(2), conv_block(w[2], w[3]),
                               torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(w[3], n_out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=2_000)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1000, help="world seed (as in vl_shapesworld.py)")
    parser.add_argument("--world", action="append", default=[], metavar="KEY=VALUE", help="ShapesWorldConfig override")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from multimodal.shapesworld import ShapesWorldConfig, render_tensors
    from vlsae.config import apply_overrides, from_dict

    world = from_dict(ShapesWorldConfig, apply_overrides({"seed": args.seed}, args.world), where="--world")
    started = time.perf_counter()
    train_x, _, train_meta = render_tensors(world, range(args.n_train))
    test_x, _, test_meta = render_tensors(world, range(10_000_000, 10_000_000 + args.n_test))
    train_labels, _ = planted_labels(train_meta)
    test_labels, _ = planted_labels(test_meta)
    names = sorted(test_labels)
    targets = torch.tensor(np.stack([train_labels[n] for n in names], 1)).float()

    torch.manual_seed(0)
    net = classifier(len(names))
    optimizer = torch.optim.AdamW(net.parameters(), 2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=args.steps)
    generator = torch.Generator().manual_seed(0)
    from tqdm.auto import tqdm

    for _ in tqdm(range(args.steps), desc="train CNN", unit="step", disable=None, leave=False):
        rows = torch.randint(0, args.n_train, (args.batch_size,), generator=generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(train_x[rows].float() / 255 - 0.5), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        scores = torch.cat([net(test_x[i: i + 500].float() / 255 - 0.5) for i in range(0, args.n_test, 500)])
    auroc = {n: auroc_matrix(scores[:, j: j + 1], {n: test_labels[n]})[n][0] for j, n in enumerate(names)}

    table = Table(title=f"planted values separable from pixels: a CNN trained with labels ({args.n_train} images, "
                        f"{args.steps} steps, {time.perf_counter() - started:.0f} s); held-out AUROC")
    for column in ("attribute", "values", "mean AUROC", "min AUROC", "values >= 0.9"):
        table.add_column(column, justify="left" if column == "attribute" else "right")
    for attribute in ("colour", "shape", "size", "position"):
        values = [auroc[n] for n in names if n.startswith(attribute + "=")]
        table.add_row(attribute, str(len(values)), f"{np.mean(values):.3f}", f"{np.min(values):.3f}",
                      str(sum(v >= 0.9 for v in values)))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
