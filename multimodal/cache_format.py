"""The activation cache's on-disk format: names, keys, and reading a manifest or a shard.

Layout::

    ACTS/
      manifest.json              source spec, hook, tokens, modalities, width, dtype, counts,
                                 normalisation statistics, the lost pairs of the read ("skipped"),
                                 the list of finished shards
      shard-000000.safetensors   one tensor per modality, (rows, width)
      shard-000001.safetensors   ...

Each shard also holds ``keys`` (pairs, max key length) uint8 (the UTF-8
webdataset key of every pair, zero-padded), ``pair_index.MODALITY`` (rows,)
int32 (the position in ``keys`` of every row's pair) and the running sums the
normalisation statistics come from (``stats.MODALITY.sum`` / ``.sumsq`` /
``.norm_sum``). When every modality has one row per pair (tokens ``cls`` or
``mean``), row ``i`` of every modality belongs to pair ``i`` of the shard.

The writer (:mod:`multimodal.cache_writer`) and the reader
(:mod:`multimodal.cache`) both build on this module, so neither imports the other.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from vlsae.errors import VlsaeError

MANIFEST = "manifest.json"
FORMAT = "vlsae-activations"
VERSION = 1
SHARD_PATTERN = "shard-{:06d}.safetensors"


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
    """The keys :func:`encode_keys` stored."""
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


def shard_error(file: Path, exc: BaseException | str) -> VlsaeError:
    """The one-line error for a damaged shard (the reader raises it for wrong shapes too)."""
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
                raise shard_error(file, f"no tensor '{missing[0]}'")
            return {n: handle.get_tensor(n) for n in names}
    except VlsaeError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise shard_error(file, exc) from None
