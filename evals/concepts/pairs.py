"""Paired activations for concept analysis, through the project's one extraction path.

The activations come from :func:`multimodal.extract.extract_pairs` (the code
behind ``vlsae extract``), written to an activation cache and read back with
:class:`multimodal.cache.ActivationCache`, so a report sees exactly the rows a
training run on the same model, hook and tokens would see. The cache holds
activations and keys only; the captions and planted metadata are noted by key
as the records stream past, and the images a report shows are read back from
the shards by key, only for the rows on its cards.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from multimodal.adapters import Adapter
from multimodal.cache import ActivationCache
from multimodal.extract import extract_pairs
from multimodal.pairs import ReadStats, iter_pairs
from vlsae.errors import VlsaeError


@dataclass
class PairActivations:
    """One row per pair and modality, aligned: row i of every ``acts`` tensor is pair ``keys[i]``."""

    keys: list[str]
    captions: list[str]
    metas: list[dict[str, Any]]
    acts: dict[str, torch.Tensor]  # modality -> (n_pairs, width), float32 on the CPU


def _noted(records: Iterable[Any], notes: list[tuple[str, str, dict[str, Any]]]) -> Iterator[Any]:
    """The records unchanged, each one's key, caption and metadata appended to ``notes`` on the way."""
    for record in records:
        notes.append((str(record.key), str(record.caption), dict(getattr(record, "meta", None) or {})))
        yield record


def extract_pair_activations(adapter: Adapter, records: Iterable[Any], folder: str | Path | None = None,
                             hook: str = "final", tokens: str = "cls", batch_size: int = 64, limit: int = 2000,
                             progress: bool = True, data: str = "", reads: ReadStats | None = None) -> PairActivations:
    """Run ``adapter`` over up to ``limit`` pair records (objects with key, image, caption, meta).

    The cache goes to ``folder`` (replaced if present), or to a temporary folder
    removed afterwards when ``folder`` is None. ``tokens`` must give one row per
    pair (cls or mean): concept statistics pair an image row with its caption row.
    ``reads``: the stats of the reader behind ``records``, whose lost-pair policy
    is checked before the pairs are used (:class:`multimodal.pairs.ReadStats`).
    """
    if tokens not in ("cls", "mean"):
        raise VlsaeError("concept reports need one row per pair and modality: use --tokens cls or mean")
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="vlsae-pairs-") as tmp:
            return extract_pair_activations(adapter, records, Path(tmp) / "acts", hook=hook, tokens=tokens,
                                            batch_size=batch_size, limit=limit, progress=progress, data=data,
                                            reads=reads)
    notes: list[tuple[str, str, dict[str, Any]]] = []
    # reader_process stays False: the records are read by a thread of this process, so ``notes`` fills here
    extract_pairs(adapter, _noted(records, notes), folder, hook=hook, tokens=tokens, batch_size=batch_size,
                  limit=limit, overwrite=True, progress=progress, data=data, reader_process=False, reads=reads)
    cache = ActivationCache(folder)
    keys = cache.keys()
    noted = notes[:len(keys)]  # the reader may have pulled one record past the limit
    if [k for k, _, _ in noted] != keys:
        raise VlsaeError(f"the activation cache in {folder} does not hold the pairs that were read; extract again")
    rows = cache.read_all()
    acts = rows if isinstance(rows, dict) else {cache.modalities[0]: rows}  # a one-modality cache reads plain
    return PairActivations(keys=keys, captions=[c for _, c, _ in noted], metas=[m for _, _, m in noted],
                           acts={m: t.float() for m, t in acts.items()})


def read_images(data: str | Path, keys: Iterable[str]) -> dict[str, Image.Image]:
    """The images of the pairs named by ``keys``, read from the shards ``data`` (stops once all are found)."""
    wanted = set(keys)
    found: dict[str, Image.Image] = {}
    if not wanted:
        return found
    for record in iter_pairs(data):
        if record.key in wanted and record.image is not None:
            found[record.key] = record.image
            if len(found) == len(wanted):
                break
    return found
