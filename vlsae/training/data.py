"""Activation sources: what the trainer consumes, and the in-memory one.

The trainer never asks where activations come from. Anything with this shape
plugs in: an in-memory tensor (:class:`TensorSource`), a tensor file, the
synthetic suites, and the streaming activation cache of ``multimodal``.
Batches are a pure function of (seed, position), so resuming at batch ``start``
reproduces the uninterrupted stream exactly, without replaying it.
"""
from __future__ import annotations


import sys
from pathlib import Path
from typing import Iterator, Protocol, Union, runtime_checkable

import numpy as np
import torch

from vlsae.files import read_safetensors
from vlsae.errors import VlsaeError

Batch = Union[torch.Tensor, dict[str, torch.Tensor]]


@runtime_checkable
class ActivationSource(Protocol):
    """d_in: width, or modality -> width for paired sources (rows aligned by pair)."""

    d_in: int | dict[str, int]

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Batch]:
        """Infinite deterministic stream; each epoch reshuffled with seed + epoch;
        ``start`` batches already consumed."""
        ...

    def sample(self, n: int, seed: int = 0) -> Batch:
        """Up to ``n`` rows, for initialisation and scale estimation."""
        ...


class TensorSource:
    """An in-memory tensor (rows, d), or a dict of modality -> (rows, d_m) with aligned rows."""

    def __init__(self, data: Batch):
        if isinstance(data, dict):
            if not data:
                raise VlsaeError("paired data has no modalities")
            rows = {m: t.shape[0] for m, t in data.items()}
            if len(set(rows.values())) != 1:
                raise VlsaeError(f"paired modalities must have the same number of rows (pairs), got {rows}")
            for m, t in data.items():
                _check_matrix(t, f"modality '{m}'")
            self.data: Batch = {m: _as_float(t, f"modality '{m}'") for m, t in data.items()}
            self.d_in: int | dict[str, int] = {m: int(t.shape[1]) for m, t in data.items()}
            self._rows = next(iter(rows.values()))
        else:
            _check_matrix(data, "activations")
            self.data = _as_float(data, "the activations")
            self.d_in = int(data.shape[1])
            self._rows = int(data.shape[0])
        if self._rows == 0:
            raise VlsaeError("the dataset is empty: it has 0 rows")

    def __len__(self) -> int:
        return self._rows

    def _take(self, idx: torch.Tensor) -> Batch:
        if isinstance(self.data, dict):
            return {m: t[idx] for m, t in self.data.items()}
        return self.data[idx]

    def _permutation(self, seed: int) -> torch.Tensor:
        return torch.randperm(self._rows, generator=torch.Generator().manual_seed(seed))

    def batches(self, batch_size: int, seed: int, start: int = 0, part: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        """Epoch e is a fresh permutation seeded by (seed, e), cut into rows // batch_size
        full batches (the remainder waits for a later epoch's shuffle; with fewer rows
        than batch_size each batch is the whole set). Batch ``start`` is found by
        arithmetic, so resuming costs one permutation, not a replay.

        part: (rank, world) of a data-parallel run: only that rank's contiguous slice of each
        batch is read (``tensor_split`` of the batch's rows in ``world``), the same stream cut up."""
        rank, world = part
        per_epoch = max(1, self._rows // batch_size)
        epoch, offset = divmod(start, per_epoch)
        while True:
            perm = self._permutation(seed * 1_000_003 + epoch)
            for i in range(offset, per_epoch):
                rows = perm[i * batch_size:(i + 1) * batch_size]
                yield self._take(rows.tensor_split(world)[rank] if world > 1 else rows)
            epoch, offset = epoch + 1, 0

    def sample(self, n: int, seed: int = 0) -> Batch:
        """Up to ``n`` distinct rows drawn without replacement (seeded)."""
        return self._take(self._permutation(seed + 7_919)[:n])

    def split(self, held_out: float) -> tuple["TensorSource", "TensorSource | None"]:
        """(train, held-out): the last ``held_out`` fraction of the rows is held out.

        A contiguous tail, not a random subset: no copy of the data, and rows
        stored in extraction order (tokens of one document, crops of one image)
        stay on one side, so held-out figures are not flattered by near duplicates.
        Returns (self, None) when the fraction rounds to no rows.
        """
        if not 0 <= held_out < 1:
            raise VlsaeError(f"the held-out fraction must be in [0, 1), got {held_out}")
        n_held = int(self._rows * held_out)
        if n_held == 0:
            return self, None
        cut = self._rows - n_held
        if isinstance(self.data, dict):
            return (TensorSource({m: t[:cut] for m, t in self.data.items()}),
                    TensorSource({m: t[cut:] for m, t in self.data.items()}))
        return TensorSource(self.data[:cut]), TensorSource(self.data[cut:])

    def __repr__(self) -> str:
        return f"TensorSource(rows={self._rows}, d_in={self.d_in})"


def _as_float(t: torch.Tensor, what: str) -> torch.Tensor:
    """Floating tensors as they are; integer or bool ones cast to float32 with a notice on stderr,
    because integers are rarely activations (token ids or labels saved by mistake look like this)."""
    if t.is_floating_point():
        return t
    print(f"vlsae: notice: {what} are {str(t.dtype).removeprefix('torch.')} values; training on them cast to float32 "
          "(SAEs expect float activations: integer token ids or labels are not)", file=sys.stderr)
    return t.float()


def _check_matrix(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise VlsaeError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise VlsaeError(f"{what} must be a 2-D (rows, width) tensor, got shape {tuple(t.shape)}")


def open_tensor_file(path: str | Path) -> TensorSource:
    """A TensorSource from ``.safetensors`` (one tensor, or tensors named by modality) or ``.npy``."""
    path = Path(path)
    if not path.exists():
        raise VlsaeError(f"data file not found: {path}")
    if path.is_dir():
        raise VlsaeError(f"{path} is a folder; for an activation cache use --acts {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise VlsaeError(f"{path} cannot be read without unpickling ({str(exc).splitlines()[0]}); save a plain numeric array") from None
        except (OSError, EOFError) as exc:
            raise VlsaeError(f"{path} is not a readable .npy file ({str(exc).splitlines()[0]})") from None
        if array.dtype.kind not in "fiu":
            raise VlsaeError(f"{path} holds {array.dtype} values; activations must be numeric")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return TensorSource(tensor.float() if tensor.is_floating_point() else tensor)
    if suffix != ".safetensors":
        raise VlsaeError(f"unsupported data file {path.name}: use .safetensors or .npy (pickle/.pt files are never loaded)")
    tensors = read_safetensors(path, what="data")
    if not tensors:
        raise VlsaeError(f"{path} holds no tensors")
    if len(tensors) == 1:
        return TensorSource(next(iter(tensors.values())))
    return TensorSource({name: t for name, t in sorted(tensors.items())})

