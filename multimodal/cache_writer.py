"""Writing the activation cache: streaming, resumable, atomic per shard.

A shard is written to a temporary file and renamed into place, then the
manifest is rewritten to list it. A shard closes after the first pair at which
some modality reaches ``shard_rows`` rows, so shard boundaries depend only on
the data, never on batch sizes, and an interrupted extraction resumes after the
pairs of its finished shards.

The writer touches ``--out`` only when its first shard is ready: until then a
failed run leaves the folder exactly as it found it (no folder when there was
none, an existing cache untouched even with ``overwrite``). An unfinished
manifest that lists no shards holds nothing to resume, so it counts as empty.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from vlsae.errors import VlsaeError
from vlsae.files import atomic_save_tensors, atomic_write_json

from multimodal.adapters.base import Extracted, dtype_name
from multimodal.cache_format import FORMAT, MANIFEST, SHARD_PATTERN, VERSION, encode_keys, read_manifest, read_shard


def _is_temporary(name: str) -> bool:
    """Temporaries of the atomic writes (``.shard-....tmp``, ``.manifest.json....tmp``)."""
    return name.startswith((".shard-", f".{MANIFEST}"))


def _is_shard(name: str) -> bool:
    return name.startswith("shard-") and name.endswith(".safetensors")


class ActivationWriter:
    """Streams :class:`Extracted` batches into shards; resumable and atomic per shard.

    ``settings`` (source spec, hook, tokens, data, ...) go into the manifest and
    must match when an unfinished cache is resumed; ``info`` (adapter details,
    batch size, device) is recorded but not compared. Use :attr:`resume_position` to
    know how many pairs the finished shards already hold.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any], modalities: Sequence[str], widths: dict[str, int],
                 dtype: torch.dtype, shard_rows: int = 50_000, overwrite: bool = False,
                 info: dict[str, Any] | None = None):
        if shard_rows < 1:
            raise VlsaeError(f"shard_rows must be at least 1, got {shard_rows}")
        self.path = Path(path)
        self.settings = dict(settings)
        self.info = dict(info or {})
        self.modalities = list(modalities)
        self.widths = {m: int(widths[m]) for m in self.modalities}
        self.dtype = dtype
        self.shard_rows = int(shard_rows)
        self.shards: list[dict[str, Any]] = []
        self._pending_keys: list[str] = []
        self._pending: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        self._pending_counts: dict[str, list[Tensor]] = {m: [] for m in self.modalities}
        self._replace = False  # the folder's cache files go once this run writes its first shard
        self._claimed = False  # this run has written into the folder
        self._created: Path | None = None  # the outermost folder this run created
        self._open(overwrite)

    # the part of the manifest a resumed run must agree with
    def _identity(self) -> dict[str, Any]:
        return {**self.settings, "modalities": self.modalities, "width": self.widths,
                "dtype": dtype_name(self.dtype), "shard_rows": self.shard_rows}

    def _open(self, overwrite: bool) -> None:
        """Decide what the folder's contents become (checks only: nothing is written yet)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise VlsaeError(f"--out {path} is a file; pass a folder for the activation cache")
        if not (path.is_dir() and any(path.iterdir())):
            return
        if not (path / MANIFEST).is_file():
            raise VlsaeError(f"--out {path} is a non-empty folder that is not an activation cache; pick a new folder")
        record = read_manifest(path)
        if overwrite or not (record.get("complete") or record.get("shards")):
            self._replace = True  # overwrite, or an unfinished stub with nothing in it
        elif record.get("complete"):
            raise VlsaeError(f"activation cache {path} is already complete ({record.get('n_pairs')} pairs); "
                             f"pass --overwrite to redo it or choose another --out")
        else:
            theirs = {k: record.get(k) for k in self._identity()}
            mine = json.loads(json.dumps(self._identity()))
            if theirs != mine:
                diff = next(k for k in mine if theirs.get(k) != mine[k])
                raise VlsaeError(f"{path} holds an unfinished extraction with a different '{diff}'; "
                                 f"re-run it with the same settings to resume, or pass --overwrite")
            for entry in record["shards"]:  # keep the finished shards on disk, in order; forget any after a gap
                if not (path / entry["file"]).is_file():
                    break
                self.shards.append(entry)

    def _claim(self) -> None:
        """Make the folder this run's, just before its first write: create it, clear or tidy it."""
        if self._claimed:
            return
        outermost = None
        for folder in (self.path, *self.path.parents):
            if folder.exists():
                break
            outermost = folder
        self.path.mkdir(parents=True, exist_ok=True)
        self._created = outermost
        listed = {entry["file"] for entry in self.shards}
        for file in self.path.iterdir():
            name = file.name
            # a replaced cache loses its manifest and shards; a resumed one the shards its manifest does not list
            # (renamed into place just before a crash); both lose the temporaries of interrupted writes
            if _is_temporary(name) or (_is_shard(name) and name not in listed) or (self._replace and name == MANIFEST):
                file.unlink()
        self._claimed = True

    def _release(self) -> None:
        """Remove the folders this run created, when they are still empty (a failed first write)."""
        if self._created is None:
            return
        for folder in (self.path, *self.path.parents):
            try:
                folder.rmdir()
            except OSError:
                return
            if folder == self._created:
                self._created, self._claimed = None, False
                return

    @property
    def resume_position(self) -> int:
        """Pairs held by finished shards (the extraction skips this many records)."""
        return sum(entry["pairs"] for entry in self.shards)

    @property
    def last_key(self) -> str | None:
        return self.shards[-1]["last_key"] if self.shards else None

    @property
    def pending_pairs(self) -> int:
        """Pairs added but not yet in a finished shard."""
        return len(self._pending_keys)

    def resume_hint(self) -> str | None:
        """What a failed run leaves behind and how to go on, when the folder holds finished shards."""
        if not self.shards:
            return None
        return (f"{self.path} keeps the {self.resume_position} pairs of its {len(self.shards)} finished shard(s): "
                f"re-run the command to resume from them, or pass --overwrite to start over")

    def add(self, batch: Extracted) -> None:
        """Append one batch; full shards are written as they fill up."""
        missing = [m for m in self.modalities if m not in batch.acts]
        if missing:
            raise ValueError(f"batch lacks modality {missing[0]}")
        n = len(batch.keys)
        if n == 0:
            return
        for m in self.modalities:
            rows, index = batch.acts[m], batch.pair_index.get(m)
            if index is None:
                index = torch.arange(rows.shape[0])
            if rows.shape[1] != self.widths[m]:
                raise ValueError(f"{m} rows have width {rows.shape[1]}, cache width is {self.widths[m]}")
            if index.numel() > 1 and bool((index[1:] < index[:-1]).any()):
                order = torch.argsort(index, stable=True)
                rows, index = rows[order], index[order]
            self._pending[m].append(rows.to(self.dtype))
            self._pending_counts[m].append(torch.bincount(index, minlength=n)[:n])
        self._pending_keys.extend(batch.keys)
        self._flush_full()

    def _flush_full(self) -> None:
        while self._pending_keys:
            counts = {m: torch.cat(self._pending_counts[m]) for m in self.modalities}
            cut = None
            for m in self.modalities:
                reached = torch.nonzero(torch.cumsum(counts[m], 0) >= self.shard_rows)
                if reached.numel():
                    first = int(reached[0]) + 1
                    cut = first if cut is None else min(cut, first)
            if cut is None:
                return
            self._write_shard(cut, counts)

    def _write_shard(self, n_pairs: int, counts: dict[str, Tensor]) -> None:
        keys, self._pending_keys = self._pending_keys[:n_pairs], self._pending_keys[n_pairs:]
        tensors: dict[str, Tensor] = {"keys": encode_keys(keys)}
        rows_per_modality: dict[str, int] = {}
        for m in self.modalities:
            rows_all = torch.cat(self._pending[m])
            c = counts[m]
            n_rows = int(c[:n_pairs].sum())
            rows, rest = rows_all[:n_rows], rows_all[n_rows:]
            self._pending[m] = [rest] if rest.shape[0] else []
            self._pending_counts[m] = [c[n_pairs:]] if c.numel() > n_pairs else []
            tensors[m] = rows.contiguous()
            tensors[f"pair_index.{m}"] = torch.repeat_interleave(torch.arange(n_pairs, dtype=torch.int32), c[:n_pairs])
            x = rows.to(torch.float64)
            tensors[f"stats.{m}.sum"] = x.sum(0)
            tensors[f"stats.{m}.sumsq"] = (x * x).sum(0)
            tensors[f"stats.{m}.norm_sum"] = x.norm(dim=1).sum().reshape(1)
            rows_per_modality[m] = n_rows
        file = self.path / SHARD_PATTERN.format(len(self.shards))
        first = not self._claimed
        self._claim()
        try:
            atomic_save_tensors(tensors, file, metadata={"format": FORMAT, "first_pair": str(self.resume_position)})
        except BaseException:
            if first:
                self._release()
            raise
        self.shards.append({"file": file.name, "pairs": n_pairs, "rows": rows_per_modality,
                            "first_pair": self.resume_position, "last_key": keys[-1]})
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool, stats: dict[str, Any] | None = None,
                        extra: dict[str, Any] | None = None) -> None:
        rows = {m: sum(entry["rows"][m] for entry in self.shards) for m in self.modalities}
        n_pairs = self.resume_position
        record = {
            "format": FORMAT, "version": VERSION, "complete": complete,
            **self._identity(), **self.info, **(extra or {}),
            "n_pairs": n_pairs, "rows": rows,
            "paired": bool(n_pairs) and all(rows[m] == n_pairs for m in self.modalities),
            "shards": self.shards,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if stats is not None:
            record["stats"] = stats
        atomic_write_json(self.path / MANIFEST, record, indent=1)

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the last partial shard, the statistics, and mark the cache complete; returns the manifest.

        ``extra`` goes into the manifest too: facts known only at the end (the pairs the read lost).
        """
        if self._pending_keys:
            counts = {m: torch.cat(self._pending_counts[m]) for m in self.modalities}
            self._write_shard(len(self._pending_keys), counts)
        if not self.shards:
            raise VlsaeError("no pairs were extracted; check that --data names readable shards with images and captions")
        self._claim()
        self._write_manifest(complete=True, stats=self._stats(), extra=extra)
        return read_manifest(self.path)

    def _stats(self) -> dict[str, Any]:
        return cache_statistics(self.path, self.shards, self.modalities)


def cache_statistics(path: Path, shards: Sequence[dict[str, Any]], modalities: Sequence[str]) -> dict[str, Any]:
    """Per-modality count, mean row norm, mean and std vectors of the manifest ``shards`` of the cache
    at ``path``, from the shards' running sums (also the statistics of a cache merged from parts)."""
    totals: dict[str, dict[str, Any]] = {}
    for entry in shards:
        names = [f"stats.{m}.{s}" for m in modalities for s in ("sum", "sumsq", "norm_sum")]
        tensors = read_shard(Path(path) / entry["file"], names)
        for m in modalities:
            t = totals.setdefault(m, {"count": 0, "sum": 0.0, "sumsq": 0.0, "norm_sum": 0.0})
            t["count"] += entry["rows"][m]
            t["sum"] = t["sum"] + tensors[f"stats.{m}.sum"]
            t["sumsq"] = t["sumsq"] + tensors[f"stats.{m}.sumsq"]
            t["norm_sum"] += float(tensors[f"stats.{m}.norm_sum"][0])
    stats = {}
    for m, t in totals.items():
        count = max(t["count"], 1)
        mean = t["sum"] / count
        var = (t["sumsq"] / count - mean * mean).clamp_min(0)
        stats[m] = {
            "count": t["count"],
            "mean_norm": t["norm_sum"] / count,
            "mean_sq_norm": float(t["sumsq"].sum()) / count,
            "std_total": math.sqrt(float(var.sum())),
            "mean": [round(v, 7) for v in mean.tolist()],
            "std": [round(v, 7) for v in var.sqrt().tolist()],
        }
    return stats
