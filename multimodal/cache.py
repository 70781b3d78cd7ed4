"""The activation cache: a folder of safetensors shards plus ``manifest.json``.

The format (layout, keys, manifest and shard reading) is
:mod:`multimodal.cache_format`; writing (:class:`ActivationWriter`, streaming
and resumable) is :mod:`multimodal.cache_writer`; both are importable from
here, as before. This module is the reader.

Reading (:class:`ActivationCache`) implements the trainer's ``ActivationSource``
protocol. Shuffling is two-level, with memory bounded by ``buffer_rows``
whatever the size of the cache: every epoch visits the shards in a new random
order; consecutive shards of that order are grouped into buffers of at least
``buffer_rows`` rows (at least one shard); rows are shuffled within a buffer.
Epoch ``e`` uses the seed ``seed + e``; batches run on across buffer and epoch
boundaries, so batch ``start`` of the stream can be found from the shard row
counts alone and ``batches(start=...)`` resumes exactly, reading only the
buffer it starts in.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal.adapters.base import DTYPES, Extracted
from multimodal.cache_format import (FORMAT, MANIFEST, SHARD_PATTERN, VERSION, decode_keys, encode_keys, read_manifest,
                                     read_shard, shard_error)
from multimodal.cache_writer import ActivationWriter

__all__ = ["DEFAULT_BUFFER_ROWS", "FORMAT", "MANIFEST", "SHARD_PATTERN", "VERSION", "ActivationCache", "ActivationWriter",
           "decode_keys", "encode_keys", "read_manifest", "read_shard"]

DEFAULT_BUFFER_ROWS = 100_000


# -- reading ----------------------------------------------------------------------

@dataclass
class _Shard:
    file: Path
    pairs: int
    rows: dict[str, int]


class ActivationCache:
    """A finished activation cache as an ``ActivationSource`` (see the module docstring).

    >>> cache = ActivationCache("acts")                    # paired: dict batches
    >>> cache.d_in, len(cache)                             # {'image': 64, 'text': 64}, pairs
    >>> next(cache.batches(256, seed=0))["image"].shape    # (256, 64), rows aligned with ["text"]
    >>> ActivationCache("acts", modality="image").d_in     # 64: plain tensor batches

    modality:    one modality: plain (rows, width) tensors, every row of that modality; modalities
                 joined by ``+`` (``image+text``) pool their rows into one stream (one width), for a
                 single-stream SAE over image and text tokens together (SAE-V).
    modalities:  a subset of modalities: dict batches (each must have one row per pair).
    dtype:       dtype of the returned batches (the cache may store bf16/fp16).
    buffer_rows: shuffle-buffer size in rows; memory is about this many rows.
    """

    def __init__(self, path: str | Path, modality: str | None = None, modalities: Sequence[str] | None = None,
                 dtype: torch.dtype = torch.float32, buffer_rows: int = DEFAULT_BUFFER_ROWS):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if not self.manifest.get("complete"):
            raise VlsaeError(f"activation cache {self.path} is unfinished ({self.manifest.get('n_pairs', 0)} pairs so far); "
                             f"re-run the same vlsae extract command to finish it")
        available = list(self.manifest["modalities"])
        if modality is not None and modalities is not None:
            raise VlsaeError("pass modality= (one, plain tensors) or modalities= (several, dict batches), not both")
        pooled = modality.split("+") if modality is not None and "+" in modality else None
        chosen = pooled or ([modality] if modality is not None else list(modalities or available))
        for m in chosen:
            if m not in available:
                raise VlsaeError(f"activation cache {self.path} has no modality '{m}'; it has {', '.join(available)}")
        if not chosen:
            raise VlsaeError("select at least one modality")
        self.modalities = chosen
        self.single = modality is not None or len(chosen) == 1
        self.pooled = pooled is not None
        if self.pooled and len({int(self.manifest["width"][m]) for m in chosen}) != 1:
            raise VlsaeError(f"modality '{modality}' pools rows of different widths ({self.manifest['width']}); "
                             f"pooled modalities must share one width")
        self.dtype = dtype
        self.buffer_rows = max(1, int(buffer_rows))
        if self.manifest["dtype"] not in DTYPES:
            raise VlsaeError(f"{self.path / MANIFEST}: unknown dtype {self.manifest['dtype']}")
        self.stored_dtype = DTYPES[self.manifest["dtype"]]
        self.shards = [_Shard(self.path / e["file"], int(e["pairs"]), {k: int(v) for k, v in e["rows"].items()})
                       for e in self.manifest["shards"]]
        if not self.shards:
            raise VlsaeError(f"activation cache {self.path} has no shards")
        missing = [s.file for s in self.shards if not s.file.is_file()]
        if missing:
            raise VlsaeError(f"activation cache shard {missing[0]} is missing; the cache is incomplete, re-run vlsae extract")
        if not self.single:
            multi = [m for m in chosen if any(s.rows[m] != s.pairs for s in self.shards)]
            if multi:
                raise VlsaeError(f"activation cache {self.path} has several {multi[0]} rows per pair (tokens="
                                 f"{self.manifest.get('tokens')}); paired batches need one row per pair, "
                                 f"so select one modality (modality='{multi[0]}')")
        self._shard_rows = [sum(s.rows[m] for m in chosen) if self.pooled else s.rows[chosen[0]] if self.single
                            else s.pairs for s in self.shards]

    # -- protocol -----------------------------------------------------------------
    @property
    def d_in(self) -> int | dict[str, int]:
        widths = {m: int(self.manifest["width"][m]) for m in self.modalities}
        return widths[self.modalities[0]] if self.single else widths

    def __len__(self) -> int:
        return sum(self._shard_rows)

    def __repr__(self) -> str:
        return f"ActivationCache({str(self.path)!r}, modalities={self.modalities}, rows={len(self)}, d_in={self.d_in})"

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Normalisation statistics per modality (count, mean_norm, mean, std, ...)."""
        return {m: self.manifest.get("stats", {}).get(m, {}) for m in self.modalities}

    def _load(self, i: int) -> dict[str, Tensor]:
        shard = self.shards[i]
        data = read_shard(shard.file, self.modalities)
        for m, t in data.items():
            expected = (shard.rows[m], int(self.manifest["width"][m]))
            if tuple(t.shape) != expected:
                raise shard_error(shard.file, f"tensor '{m}' has shape {tuple(t.shape)}, manifest says {expected}")
        return data

    def _pack(self, data: dict[str, Tensor], index: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        if self.pooled:  # one stream: the rows of every pooled modality, in modality order
            rows = torch.cat([data[m] for m in self.modalities])
            return (rows if index is None else rows[index]).to(self.dtype)
        out = {m: (t if index is None else t[index]).to(self.dtype) for m, t in data.items()}
        return out[self.modalities[0]] if self.single else out

    def _groups(self, epoch: int, seed: int) -> list[list[int]]:
        """Shards of one epoch, in shuffled order, grouped into shuffle buffers."""
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        groups: list[list[int]] = []
        current: list[int] = []
        filled = 0
        for i in order:
            current.append(i)
            filled += self._shard_rows[i]
            if filled >= self.buffer_rows:
                groups.append(current)
                current, filled = [], 0
        if current:
            groups.append(current)
        return groups

    def _epoch_pieces(self, epoch: int, seed: int, skip: int) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """One epoch in shuffled order, starting ``skip`` rows in: (a shuffle buffer's loaded shards, the
        positions of its rows in stream order). Rows are gathered later, only those a batch part needs."""
        for g, group in enumerate(self._groups(epoch, seed)):
            size = sum(self._shard_rows[i] for i in group)
            if skip >= size:
                skip -= size
                continue
            parts = [self._load(i) for i in group]
            data = {m: torch.cat([p[m] for p in parts]) for m in self.modalities}
            generator = torch.Generator().manual_seed((seed + epoch) * 1_000_003 + g)
            yield data, torch.randperm(size, generator=generator)[skip:]
            skip = 0

    def batches(self, batch_size: int, seed: int, start: int = 0,
                part: tuple[int, int] = (0, 1)) -> Iterator[Tensor | dict[str, Tensor]]:
        """Infinite stream of shuffled batches; epoch ``e`` uses seed ``seed + e``; ``start`` batches are skipped.

        part: (rank, world) of a data-parallel run: only that rank's contiguous slice of each batch
        (``tensor_split`` of its rows in ``world``) is gathered, the same stream cut up; the shard files
        are read by every rank (a shuffle buffer mixes rows of all its shards into every batch)."""
        if batch_size < 1:
            raise VlsaeError(f"batch_size must be at least 1, got {batch_size}")
        total = len(self)
        if total == 0:
            raise VlsaeError(f"activation cache {self.path} has no rows for {', '.join(self.modalities)}")
        rank, world = part
        lo, hi = _part_bounds(batch_size, rank, world)
        offset = int(start) * int(batch_size)
        epoch, skip = divmod(offset, total)
        pending: list[tuple[dict[str, Tensor], Tensor]] = []  # (buffer, positions) not yet in a batch
        pending_rows = 0
        while True:
            for piece in self._epoch_pieces(epoch, seed, skip):
                pending.append(piece)
                pending_rows += piece[1].numel()
                while pending_rows >= batch_size:
                    batch, pending = _cut(pending, batch_size)
                    pending_rows -= batch_size
                    yield self._gather(_cut(_cut(batch, hi)[0], lo)[1] if world > 1 else batch)
            skip = 0
            epoch += 1

    def _gather(self, pieces: list[tuple[dict[str, Tensor], Tensor]]) -> Tensor | dict[str, Tensor]:
        """The rows of ``pieces`` (in order) as one batch."""
        packed = [self._pack(data, index) for data, index in pieces]
        if len(packed) == 1:
            return packed[0]
        if isinstance(packed[0], Tensor):
            return torch.cat(packed)
        return {m: torch.cat([c[m] for c in packed]) for m in self.modalities}

    def sample(self, n: int, seed: int = 0) -> Tensor | dict[str, Tensor]:
        """Up to n rows drawn without replacement (in cache order), one shard in memory at a time."""
        total = len(self)
        n = min(int(n), total)
        generator = torch.Generator().manual_seed(seed)
        if total <= 20_000_000:
            chosen = torch.randperm(total, generator=generator)[:n]
        else:
            draw = torch.unique(torch.randint(total, (int(n * 1.2) + 16,), generator=generator))
            chosen = draw[torch.randperm(draw.numel(), generator=generator)[:n]]
        chosen, _ = torch.sort(chosen)
        pieces: list[Any] = []
        lo = 0
        for i, rows in enumerate(self._shard_rows):
            left, right = torch.searchsorted(chosen, torch.tensor([lo, lo + rows])).tolist()
            if right > left:
                pieces.append(self._pack(self._load(i), chosen[left:right] - lo))
            lo += rows
        if isinstance(pieces[0], Tensor):
            return torch.cat(pieces)
        return {m: torch.cat([p[m] for p in pieces]) for m in self.modalities}

    # -- ordered access (evaluation, concept cards) ---------------------------------
    def iter_shards(self) -> Iterator[Extracted]:
        """Every shard in order as an :class:`Extracted` (keys, rows per modality, pair index)."""
        for shard in self.shards:
            names = ["keys", *self.modalities, *[f"pair_index.{m}" for m in self.modalities]]
            data = read_shard(shard.file, names)
            yield Extracted(keys=decode_keys(data["keys"]),
                            acts={m: data[m].to(self.dtype) for m in self.modalities},
                            pair_index={m: data[f"pair_index.{m}"].to(torch.int64) for m in self.modalities})

    def keys(self) -> list[str]:
        """Every pair key, in cache order (row i of a paired cache belongs to key i)."""
        out: list[str] = []
        for shard in self.shards:
            out.extend(decode_keys(read_shard(shard.file, ["keys"])["keys"]))
        return out

    def read_all(self) -> Tensor | dict[str, Tensor]:
        """The whole selection in cache order (memory grows with the cache: for small caches and tests)."""
        parts = [self._pack(self._load(i)) for i in range(len(self.shards))]
        if isinstance(parts[0], Tensor):
            return torch.cat(parts)
        return {m: torch.cat([p[m] for p in parts]) for m in self.modalities}


def _part_bounds(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank ``rank``'s rows in a batch of ``batch_size`` cut in ``world`` (as ``tensor_split``)."""
    base, extra = divmod(batch_size, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _cut(pieces: list[tuple[dict[str, Tensor], Tensor]], n: int
         ) -> tuple[list[tuple[dict[str, Tensor], Tensor]], list[tuple[dict[str, Tensor], Tensor]]]:
    """The first ``n`` rows of a list of (buffer, positions) pieces, and the rest."""
    head, rest, need = [], [], n
    for data, index in pieces:
        if need == 0:
            rest.append((data, index))
        elif index.numel() <= need:
            head.append((data, index))
            need -= index.numel()
        else:
            head.append((data, index[:need]))
            rest.append((data, index[need:]))
            need = 0
    return head, rest
