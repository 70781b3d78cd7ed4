"""A rank's slice of a batch stream: what each process of a data-parallel run reads.

Kept apart from :mod:`vlsae.training` (whose package imports the trainer) so that the alignment stage's
projected source can forward a slice without importing the trainer.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator, Union

import torch

Batch = Union[torch.Tensor, dict[str, torch.Tensor]]


def reads_part_batches(source: Any, batch_size: int, seed: int, start: int = 0,
                       part: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """Rank ``part[0]``'s contiguous slice of every batch of ``source``'s stream, cut in ``part[1]``: read
    alone where the source's ``batches`` takes ``part`` (a tensor, the activation cache, a projection of
    either), else the whole batch read and sliced. The same rows either way."""
    rank, world = part
    if world <= 1:
        return source.batches(batch_size, seed=seed, start=start)
    if "part" in inspect.signature(source.batches).parameters:
        return source.batches(batch_size, seed=seed, start=start, part=part)
    return (slice_rows(batch, rank, world) for batch in source.batches(batch_size, seed=seed, start=start))


def slice_rows(batch: Batch, rank: int, world: int) -> Batch:
    """Rank ``rank``'s contiguous part of a batch split in ``world`` (sizes differ by at most one row)."""
    if isinstance(batch, dict):
        return {m: t.tensor_split(world)[rank] for m, t in batch.items()}
    return batch.tensor_split(world)[rank]
