"""Reading image-caption pairs from webdataset shards.

A pair record is ``__key__`` + an image (``png``/``jpg``/``jpeg``/``webp``) + a
caption (``txt``) + optional ``json`` metadata. Reading is in shard order and
deterministic (no shuffling), because the activation cache resumes by position.
A record that cannot be decoded, or lacks an image or caption, is skipped and
counted (one warning at the end); when nothing at all is readable, reading
fails with one line naming the shards. Text-only readers (``require_image=False``,
used when the model reads captions only) also accept caption-only records and
do not decode images: every record's ``image`` is None.
"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from vlsae.errors import VlsaeError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


@dataclass
class PairRecord:
    key: str
    image: Image.Image | None
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def expand_urls(urls: str | Path | list[str]) -> list[str]:
    """Shard paths from a brace pattern ('DIR/{000000..000009}.tar'), a folder, a file, or a list."""
    if isinstance(urls, (list, tuple)):
        out: list[str] = []
        for u in urls:
            out.extend(expand_urls(u))
        return out
    text = str(urls)
    path = Path(text)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise VlsaeError(f"{path} holds no .tar shards; write some with `vlsae world --out {path}`")
        return shards
    from braceexpand import braceexpand
    expanded = list(braceexpand(text))
    missing = [u for u in expanded if "://" not in u and not Path(u).exists()]
    if missing:
        raise VlsaeError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return expanded


def _decode(sample: dict[str, Any], require_image: bool = True) -> PairRecord:
    """One record; a text-only reader (``require_image`` false) neither needs nor decodes its image."""
    key = sample.get("__key__")
    image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    if key is None or (image_bytes is None and require_image) or "txt" not in sample:
        raise ValueError("record lacks __key__, an image or a caption")
    image = None
    if image_bytes is not None and require_image:
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
        image = image.convert("RGB")
    caption = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else str(sample["txt"])
    meta = json.loads(sample["json"]) if "json" in sample else {}
    return PairRecord(key=str(key), image=image, caption=caption.strip(), meta=meta)


class PairReader:
    """Iterate pair records of ``urls`` in order; ``skipped`` counts unreadable records."""

    def __init__(self, urls: str | Path | list[str], warn: bool = True, require_image: bool = True):
        self.urls = expand_urls(urls)
        self.require_image = require_image  # False: a text-only reader, records keep image=None
        self.skipped = 0
        self.read = 0
        self.warn = warn
        self.errors: list[str] = []

    def _handler(self, exc: Exception) -> bool:
        self.skipped += 1
        if len(self.errors) < 3:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        return True  # keep going

    def __iter__(self) -> Iterator[PairRecord]:
        import webdataset as wds
        dataset = wds.WebDataset(self.urls, shardshuffle=False, handler=self._handler, empty_check=False)
        for sample in dataset:
            try:
                record = _decode(sample, self.require_image)
            except Exception as exc:  # a corrupt record must not stop the reader
                self._handler(exc)
                continue
            self.read += 1
            yield record
        if self.read == 0:
            why = f" ({self.errors[0]})" if self.errors else ""
            raise VlsaeError(f"no readable image-caption pairs in {self.urls[0]}" +
                             (f" and {len(self.urls) - 1} more shards" if len(self.urls) > 1 else "") + why)
        if self.skipped and self.warn:
            print(f"vlsae: skipped {self.skipped} corrupt or incomplete records while reading {len(self.urls)} shard(s)",
                  file=sys.stderr)


def iter_pairs(urls: str | Path | list[str], require_image: bool = True) -> Iterator[PairRecord]:
    """Pair records of the shards, in order (see :class:`PairReader`); ``require_image=False`` reads
    captions only (caption-only shards too; images are not decoded)."""
    return iter(PairReader(urls, require_image=require_image))


def batched_pairs(urls: str | Path | list[str], batch_size: int) -> Iterator[list[PairRecord]]:
    """Lists of up to ``batch_size`` consecutive records."""
    batch: list[PairRecord] = []
    for record in iter_pairs(urls):
        batch.append(record)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
