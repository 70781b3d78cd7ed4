"""Scores on disk: one file per input shard, and the keep decision computed over those files.

``--keep`` needs every score before it can pick a threshold, so scores are
spilled as they are computed, one safetensors file per input shard
(``scores`` float64, the keys as bytes and offsets, and in the metadata the
shard's path, its SHA-256 and what reading it gave), never held as Python
objects per pair. A file is written once its shard is scored, atomically, so a
resumed run trusts every file it finds whose checksum still matches its shard.

The threshold for keeping a fraction is the k-th largest score, found by a
radix select over the files: each score becomes a 64-bit key that sorts like
the float, and four passes (16 bits each) of a 65,536-bin count narrow down the
k-th key exactly, with memory independent of the dataset's size and ties
broken by input order (the first pairs with the threshold score are kept until
exactly k are).
"""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import safe_open

from vlsae.errors import VlsaeError
from vlsae.files import atomic_save_tensors

CHUNK = 1 << 20  # scores per step of a pass over a file


@dataclass
class ShardScores:
    """What a score file holds: one input shard's scores in record order, and how reading it went."""

    url: str
    sha256: str
    keys: list[str]
    scores: np.ndarray  # (pairs,) float64
    read: dict[str, Any]  # multimodal.pairs.ShardRead fields: pairs, failed, finished, error


def score_file(folder: Path, index: int) -> Path:
    return Path(folder) / f"{index:06d}.safetensors"


def write_scores(path: Path, shard: ShardScores) -> None:
    """Atomically write one shard's scores (a NaN score is a scorer bug, refused here)."""
    scores = np.asarray(shard.scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise RuntimeError(f"the scorer gave NaN for {int(np.isnan(scores).sum())} pairs of {shard.url}")
    encoded = [k.encode("utf-8") for k in shard.keys]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(k) for k in encoded])
    key_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, dtype=np.uint8)
    tensors = {"scores": torch.from_numpy(scores.copy()), "key_bytes": torch.from_numpy(key_bytes.copy()),
               "key_offsets": torch.from_numpy(offsets)}
    atomic_save_tensors(tensors, path, metadata={"url": shard.url, "sha256": shard.sha256, "read": json.dumps(shard.read)})


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The url, sha256 and read record of a score file (None when it is unreadable)."""
    try:
        with safe_open(str(path), "np") as handle:
            meta = handle.metadata() or {}
        return {"url": meta["url"], "sha256": meta["sha256"], "read": json.loads(meta["read"])}
    except Exception:  # noqa: BLE001 - a damaged spill file is rescored, never trusted
        return None


def read_scores(path: Path) -> np.ndarray:
    """The (pairs,) float64 scores of a score file."""
    with safe_open(str(path), "np") as handle:
        return handle.get_tensor("scores")


def read_shard_scores(path: Path) -> ShardScores:
    """The whole score file: keys decoded (one shard's worth)."""
    meta = read_metadata(path)
    if meta is None:
        raise VlsaeError(f"score file {path} is damaged; delete it to rescore its shard")
    with safe_open(str(path), "np") as handle:
        scores, data, offsets = (handle.get_tensor(n) for n in ("scores", "key_bytes", "key_offsets"))
    raw = data.tobytes()
    keys = [raw[offsets[i]: offsets[i + 1]].decode("utf-8") for i in range(len(scores))]
    return ShardScores(meta["url"], meta["sha256"], keys, scores, meta["read"])


def _chunks(paths: list[Path]) -> Iterator[np.ndarray]:
    for path in paths:
        scores = read_scores(path)
        for lo in range(0, scores.shape[0], CHUNK):
            yield scores[lo: lo + CHUNK]


def sortable(scores: np.ndarray) -> np.ndarray:
    """uint64 keys that order like the float64 scores (-inf lowest, +inf highest)."""
    bits = (np.ascontiguousarray(scores, dtype=np.float64) + 0.0).view(np.uint64)  # -0.0 + 0.0 is 0.0: one zero
    negative = (bits >> np.uint64(63)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint64(1 << 63))


def _unsortable(key: np.uint64) -> float:
    key = np.uint64(key)
    bits = key & ~np.uint64(1 << 63) if key >> np.uint64(63) else ~key
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


@dataclass
class Cut:
    """The keep decision: every score above ``threshold`` is kept, and of the scores equal to it the
    first ``ties_kept`` in input order (all of them for a plain ``--threshold``: ``ties_kept`` None)."""

    threshold: float
    ties_kept: int | None
    kept: int


def kth_largest_cut(paths: list[Path], k: int) -> Cut:
    """The cut that keeps exactly the k largest scores of the files (radix select, see the module docstring)."""
    total = sum(read_scores(p).shape[0] for p in paths)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    prefix, mask, remaining = np.uint64(0), np.uint64(0), k
    for shift in (48, 32, 16, 0):
        counts = np.zeros(1 << 16, dtype=np.int64)
        for chunk in _chunks(paths):
            keys = sortable(chunk)
            keys = keys[(keys & mask) == prefix]
            counts += np.bincount(((keys >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.int64), minlength=1 << 16)
        from_top = np.cumsum(counts[::-1])
        position = int(np.searchsorted(from_top, remaining))  # first digit (from the top) reaching k
        digit = (1 << 16) - 1 - position
        remaining -= int(from_top[position - 1]) if position else 0
        prefix |= np.uint64(digit) << np.uint64(shift)
        mask |= np.uint64(0xFFFF) << np.uint64(shift)
    return Cut(threshold=_unsortable(prefix), ties_kept=remaining, kept=k)


def threshold_cut(paths: list[Path], threshold: float) -> Cut:
    """The cut of a plain ``--threshold``: every score >= threshold."""
    kept = sum(int((chunk >= threshold).sum()) for chunk in _chunks(paths))
    return Cut(threshold=float(threshold), ties_kept=None, kept=kept)


class KeepMask:
    """Applies a :class:`Cut` shard by shard in input order (the tie quota runs across shards)."""

    def __init__(self, cut: Cut):
        self.cut = cut
        self.ties_left = cut.ties_kept

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """(pairs,) bool kept flags of the next shard's scores."""
        if self.ties_left is None:
            return scores >= self.cut.threshold
        kept = scores > self.cut.threshold
        tied = np.flatnonzero(scores == self.cut.threshold)
        take = tied[: self.ties_left]
        kept[take] = True
        self.ties_left -= take.size
        return kept


@dataclass
class ScoreStats:
    """Summary of every score: count, range, mean, a histogram, and the extreme pairs for the report."""

    n: int
    minimum: float
    maximum: float
    mean: float
    histogram: list[int]
    edges: list[float]
    highest: list[tuple[float, int, int]]  # (score, shard index, position in shard), best first
    lowest: list[tuple[float, int, int]]   # worst first

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "min": self.minimum, "max": self.maximum, "mean": self.mean}


def score_stats(paths: list[Path], bins: int = 50, extremes: int = 12) -> ScoreStats:
    """Two passes over the score files: the range and mean, then a histogram; the ``extremes``
    highest and lowest pairs by score (ties broken by input order) are found on the way."""
    n, total, lo, hi = 0, 0.0, np.inf, -np.inf
    high: list[tuple[float, int, int]] = []  # min-heap of the highest (score, -shard, -position)
    low: list[tuple[float, int, int]] = []   # min-heap of the negated lowest
    for shard_index, path in enumerate(paths):
        scores = read_scores(path)
        finite = scores[np.isfinite(scores)]
        n += scores.shape[0]
        total += float(finite.sum())
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
        for position in _extreme_positions(scores, extremes):
            value = float(scores[position])
            for heap, item in ((high, (value, -shard_index, -int(position))), (low, (-value, -shard_index, -int(position)))):
                if len(heap) < extremes:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)
    if n == 0:
        raise VlsaeError("no scored pairs")
    if not np.isfinite(lo):
        lo = hi = 0.0
    span = (lo, hi if hi > lo else lo + 1.0)
    histogram = np.zeros(bins, dtype=np.int64)
    for chunk in _chunks(paths):
        histogram += np.histogram(np.clip(chunk, *span), bins=bins, range=span)[0]
    edges = np.linspace(span[0], span[1], bins + 1)
    highest = [(s, -i, -p) for s, i, p in sorted(high, reverse=True)]
    lowest = [(-s, -i, -p) for s, i, p in sorted(low, reverse=True)]
    return ScoreStats(n, lo, hi, total / max(n, 1), histogram.tolist(), edges.tolist(), highest, lowest)


def _extreme_positions(scores: np.ndarray, m: int) -> np.ndarray:
    """Positions of the m highest and m lowest scores of one shard (candidates for the global extremes)."""
    if scores.shape[0] <= 2 * m:
        return np.arange(scores.shape[0])
    order = np.argsort(scores, kind="stable")
    return np.concatenate([order[:m], order[-m:]])
