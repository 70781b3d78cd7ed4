"""The activation cache: a folder of safetensors shards plus ``manifest.json``.

Layout::

    ACTS/
      manifest.json              source spec, hook, tokens, modalities, width, dtype, counts,
                                 normalisation statistics, the list of finished shards
      shard-000000.safetensors   one tensor per modality, (rows, width)
      shard-000001.safetensors   ...

Each shard also holds ``keys`` (pairs, max key length) uint8 (the UTF-8
webdataset key of every pair, zero-padded), ``pair_index.MODALITY`` (rows,)
int32 (the position in ``keys`` of every row's pair) and the running sums the
normalisation statistics come from (``stats.MODALITY.sum`` / ``.sumsq`` /
``.norm_sum``). When every modality has one row per pair (tokens ``cls`` or
``mean``), row ``i`` of every modality belongs to pair ``i`` of the shard.

Writing (:class:`ActivationWriter`) is streaming and atomic per shard: a shard is
written to a temporary file and renamed into place, then the manifest is
rewritten to list it. A shard closes after the first pair at which some
modality reaches ``shard_rows`` rows, so shard boundaries depend only on the
data, never on batch sizes, and an interrupted extraction resumes after the
pairs of its finished shards.

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

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from vlsae.errors import VlsaeError

from multimodal.adapters.base import DTYPES, Extracted, dtype_name

MANIFEST = "manifest.json"
FORMAT = "vlsae-activations"
VERSION = 1
SHARD_PATTERN = "shard-{:06d}.safetensors"
DEFAULT_BUFFER_ROWS = 100_000


# -- small helpers --------------------------------------------------------------

def _atomic_write_json(path: Path, record: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_keys(keys: Sequence[str]) -> Tensor:
    """(n, max_len) uint8 tensor of zero-padded UTF-8 keys."""
    raw = [str(k).encode("utf-8") for k in keys]
    width = max((len(r) for r in raw), default=0) or 1
    out = torch.zeros(len(raw), width, dtype=torch.uint8)
    for i, r in enumerate(raw):
        if r:
            out[i, : len(r)] = torch.frombuffer(bytearray(r), dtype=torch.uint8)
    return out


def decode_keys(tensor: Tensor) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in tensor.tolist()]


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an activation cache folder, with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise VlsaeError(f"activation cache not found: {path} (write one with vlsae extract)")
    if not path.is_dir():
        raise VlsaeError(f"{path} is a file; an activation cache is a folder with {MANIFEST} and shards (vlsae extract --out)")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise VlsaeError(f"{path} has no {MANIFEST}; is it an activation cache written by vlsae extract?")
    try:
        record = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VlsaeError(f"{manifest_path} is not valid JSON ({getattr(exc, 'msg', exc)}); the cache is damaged, re-run vlsae extract") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise VlsaeError(f"{manifest_path} is not a vlsae activation-cache manifest")
    if record.get("version", 0) > VERSION:
        raise VlsaeError(f"{manifest_path} has format version {record.get('version')}; this vlsae reads up to {VERSION}, upgrade it")
    for field in ("modalities", "width", "dtype", "shards"):
        if field not in record:
            raise VlsaeError(f"{manifest_path} lacks '{field}'; the cache is damaged, re-run vlsae extract")
    return record


def _shard_error(file: Path, exc: BaseException | str) -> VlsaeError:
    detail = exc if isinstance(exc, str) else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return VlsaeError(f"activation cache shard {file} is corrupt or truncated ({detail}); "
                      f"delete the cache and re-run vlsae extract")


def read_shard(file: Path, names: Sequence[str]) -> dict[str, Tensor]:
    """Named tensors of one shard; a missing file or a damaged one is a one-line error naming it."""
    if not file.is_file():
        raise VlsaeError(f"activation cache shard {file} is missing; the cache is incomplete, re-run vlsae extract")
    try:
        with safe_open(str(file), framework="pt") as handle:
            present = set(handle.keys())
            missing = [n for n in names if n not in present]
            if missing:
                raise _shard_error(file, f"no tensor '{missing[0]}'")
            return {n: handle.get_tensor(n) for n in names}
    except VlsaeError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _shard_error(file, exc) from None


# -- writing ----------------------------------------------------------------------

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
        self._open(overwrite)

    # the part of the manifest a resumed run must agree with
    def _identity(self) -> dict[str, Any]:
        return {**self.settings, "modalities": self.modalities, "width": self.widths,
                "dtype": dtype_name(self.dtype), "shard_rows": self.shard_rows}

    def _open(self, overwrite: bool) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise VlsaeError(f"--out {path} is a file; pass a folder for the activation cache")
        if path.is_dir() and any(path.iterdir()):
            if not (path / MANIFEST).is_file():
                raise VlsaeError(f"--out {path} is a non-empty folder that is not an activation cache; pick a new folder")
            record = read_manifest(path)
            if overwrite:
                self._clear()
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
                self._resume(record)
        path.mkdir(parents=True, exist_ok=True)
        self._write_manifest(complete=False)

    def _clear(self) -> None:
        for file in self.path.iterdir():
            if file.name == MANIFEST or (file.name.startswith("shard-") and file.suffix == ".safetensors") \
                    or file.name.startswith(".shard-") or file.name.startswith(f".{MANIFEST}"):
                file.unlink()

    def _resume(self, record: dict[str, Any]) -> None:
        """Keep the finished shards that are on disk, in order; forget anything after a gap."""
        for entry in record["shards"]:
            if not (self.path / entry["file"]).is_file():
                break
            self.shards.append(entry)
        listed = {entry["file"] for entry in self.shards}
        for file in self.path.iterdir():  # a shard renamed into place just before a crash, temporaries
            if (file.name.startswith("shard-") and file.name not in listed) or file.name.startswith(".shard-"):
                file.unlink()

    @property
    def resume_position(self) -> int:
        """Pairs held by finished shards (the extraction skips this many records)."""
        return sum(entry["pairs"] for entry in self.shards)

    @property
    def last_key(self) -> str | None:
        return self.shards[-1]["last_key"] if self.shards else None

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
        index = len(self.shards)
        file = self.path / SHARD_PATTERN.format(index)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{file.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT, "first_pair": str(self.resume_position)})
            os.chmod(tmp, 0o644)
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.shards.append({"file": file.name, "pairs": n_pairs, "rows": rows_per_modality,
                            "first_pair": self.resume_position, "last_key": keys[-1]})
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool, stats: dict[str, Any] | None = None) -> None:
        rows = {m: sum(entry["rows"][m] for entry in self.shards) for m in self.modalities}
        n_pairs = self.resume_position
        record = {
            "format": FORMAT, "version": VERSION, "complete": complete,
            **self._identity(), **self.info,
            "n_pairs": n_pairs, "rows": rows,
            "paired": bool(n_pairs) and all(rows[m] == n_pairs for m in self.modalities),
            "shards": self.shards,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if stats is not None:
            record["stats"] = stats
        _atomic_write_json(self.path / MANIFEST, record)

    def close(self) -> dict[str, Any]:
        """Write the last partial shard, the statistics, and mark the cache complete; returns the manifest."""
        if self._pending_keys:
            counts = {m: torch.cat(self._pending_counts[m]) for m in self.modalities}
            self._write_shard(len(self._pending_keys), counts)
        if not self.shards:
            raise VlsaeError("no pairs were extracted; check that --data names readable shards with images and captions")
        self._write_manifest(complete=True, stats=self._stats())
        return read_manifest(self.path)

    def _stats(self) -> dict[str, Any]:
        """Per-modality count, mean row norm, mean and std vectors, from the shards' running sums."""
        totals: dict[str, dict[str, Any]] = {}
        for entry in self.shards:
            names = [f"stats.{m}.{s}" for m in self.modalities for s in ("sum", "sumsq", "norm_sum")]
            tensors = read_shard(self.path / entry["file"], names)
            for m in self.modalities:
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

    modality:    one modality: plain (rows, width) tensors, every row of that modality.
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
        chosen = [modality] if modality is not None else list(modalities or available)
        for m in chosen:
            if m not in available:
                raise VlsaeError(f"activation cache {self.path} has no modality '{m}'; it has {', '.join(available)}")
        if not chosen:
            raise VlsaeError("select at least one modality")
        self.modalities = chosen
        self.single = modality is not None or len(chosen) == 1
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
        self._shard_rows = [s.rows[chosen[0]] if self.single else s.pairs for s in self.shards]

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
                raise _shard_error(shard.file, f"tensor '{m}' has shape {tuple(t.shape)}, manifest says {expected}")
        return data

    def _pack(self, data: dict[str, Tensor], index: Tensor | None = None) -> Tensor | dict[str, Tensor]:
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

    def _epoch_rows(self, epoch: int, seed: int, skip: int) -> Iterator[Tensor | dict[str, Tensor]]:
        """Row chunks of one epoch in shuffled order, starting ``skip`` rows in."""
        for g, group in enumerate(self._groups(epoch, seed)):
            size = sum(self._shard_rows[i] for i in group)
            if skip >= size:
                skip -= size
                continue
            parts = [self._load(i) for i in group]
            data = {m: torch.cat([p[m] for p in parts]) for m in self.modalities}
            generator = torch.Generator().manual_seed((seed + epoch) * 1_000_003 + g)
            perm = torch.randperm(size, generator=generator)[skip:]
            skip = 0
            step = 65_536
            for lo in range(0, perm.numel(), step):
                yield self._pack(data, perm[lo: lo + step])

    def batches(self, batch_size: int, seed: int, start: int = 0) -> Iterator[Tensor | dict[str, Tensor]]:
        """Infinite stream of shuffled batches; epoch ``e`` uses seed ``seed + e``; ``start`` batches are skipped."""
        if batch_size < 1:
            raise VlsaeError(f"batch_size must be at least 1, got {batch_size}")
        total = len(self)
        if total == 0:
            raise VlsaeError(f"activation cache {self.path} has no rows for {', '.join(self.modalities)}")
        offset = int(start) * int(batch_size)
        epoch, skip = divmod(offset, total)
        pending: list[Any] = []
        pending_rows = 0
        while True:
            for chunk in self._epoch_rows(epoch, seed, skip):
                pending.append(chunk)
                pending_rows += self._rows_of(chunk)
                while pending_rows >= batch_size:
                    batch, pending = self._take(pending, batch_size)
                    pending_rows -= batch_size
                    yield batch
            skip = 0
            epoch += 1

    def _rows_of(self, chunk: Tensor | dict[str, Tensor]) -> int:
        return (chunk if isinstance(chunk, Tensor) else next(iter(chunk.values()))).shape[0]

    def _take(self, pending: list[Any], n: int) -> tuple[Any, list[Any]]:
        """The first n rows of a list of chunks, and the chunks left."""
        taken, rest, need = [], [], n
        for chunk in pending:
            rows = self._rows_of(chunk)
            if need == 0:
                rest.append(chunk)
            elif rows <= need:
                taken.append(chunk)
                need -= rows
            else:
                if isinstance(chunk, Tensor):
                    taken.append(chunk[:need])
                    rest.append(chunk[need:])
                else:
                    taken.append({m: t[:need] for m, t in chunk.items()})
                    rest.append({m: t[need:] for m, t in chunk.items()})
                need = 0
        if len(taken) == 1:
            batch = taken[0]
        elif isinstance(taken[0], Tensor):
            batch = torch.cat(taken)
        else:
            batch = {m: torch.cat([c[m] for c in taken]) for m in self.modalities}
        return batch, rest

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
