"""Labelled image embeddings for zero-shot evaluation: labels from the shards, embeddings from a cache.

Labels come from each record's metadata, read with the project's pair reader
and its lost-pair policy (captions only: no image is decoded for them):

- ShapesWorld attributes (shape, colour, size, position): the ``json``'s single
  object. A scene of several objects has no one label per attribute, so those
  records are left out, and counted (the zoo evaluation uses single-object
  scenes for the same reason).
- a ``--classes`` attribute (``class`` unless the file names another): the
  ``json`` field of that name (or ``cls``, ``label``), else the record's ``cls``
  member, as webdatasets of labelled images store it. A label is a class name
  or its index in the file's list.

Image embeddings are the adapter's final image embeddings: read from an
activation cache when one is given (scoring is then a pass over cached rows),
else extracted through :func:`multimodal.extract.extract_pairs` into a
temporary cache (image tower only) and read back, the one extraction path.
"""
from __future__ import annotations

import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from multimodal.adapters import Adapter
from multimodal.cache import ActivationCache
from multimodal.extract import extract_pairs
from multimodal.pairs import DEFAULT_MAX_SKIPPED, PairReader, expand_urls, iter_pairs
from multimodal.zoo.shapes_clip import ZERO_SHOT_ATTRIBUTES
from vlsae.errors import VlsaeError

LABEL_FIELDS = ("cls", "label", "class")  # json fields tried after the attribute's own name
IMAGE_HOOK = "visual.final"


@dataclass
class LabelledImages:
    """keys: one per record used; image: (n, d) raw final image embeddings (row i is keys[i]);
    labels: attribute -> (n,) long class index into the head's classes; left_out: reason -> records."""

    keys: list[str]
    image: Tensor
    labels: dict[str, Tensor]
    left_out: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def cls_members(data: str | Path | list[str]) -> dict[str, str]:
    """key -> the text of each record's ``cls`` member (webdataset's convention for a class label)."""
    out: dict[str, str] = {}
    for url in expand_urls(data):
        try:
            with tarfile.open(url) as tar:
                for member in tar:
                    base = Path(member.name)
                    key, _, extension = base.name.partition(".")
                    if member.isfile() and extension == "cls":
                        handle = tar.extractfile(member)
                        if handle is not None:
                            out[str(base.parent / key) if str(base.parent) != "." else key] = handle.read().decode().strip()
        except (OSError, tarfile.TarError):
            continue  # the pair reader reports damaged shards under the lost-pair policy
    return out


def _class_index(value: Any, classes: list[str]) -> int | None:
    """A label (class name, or its index as int or text) -> class index; None when it names no class."""
    text = str(value).strip()
    if text in classes:
        return classes.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(classes):
        return int(text)
    return None


class _NoLabel(Exception):
    """A record without a label for an attribute (the message names it)."""


def record_labels(key: str, meta: dict[str, Any], classes: dict[str, list[str]], where: str = "the head",
                  cls_text: Callable[[], dict[str, str]] | None = None) -> dict[str, int] | None:
    """attribute -> class index of one record; None for a scene of several objects (no one label).

    ``cls_text`` gives the shards' ``cls`` members (read once, on first need).
    Raises the one-line error for a label no class names or a record without one.
    """
    objects = meta.get("objects")
    row: dict[str, int] = {}
    for attribute, names in classes.items():
        if attribute in ZERO_SHOT_ATTRIBUTES and isinstance(objects, list):
            if len(objects) != 1:
                return None
            value = objects[0].get(attribute)
        else:
            value = next((meta[f] for f in (attribute, *LABEL_FIELDS) if f in meta), None)
            if value is None and cls_text is not None:
                value = cls_text().get(key)
        if value is None:
            raise VlsaeError(f"record {key} has no {attribute} label (a json field '{attribute}' or 'cls', or a cls "
                             f"member); label every record or choose another attribute")
        index = _class_index(value, names)
        if index is None:
            raise VlsaeError(f"record {key} has {attribute} '{value}', which {where} does not name (it names "
                             f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''}); add the class or leave such "
                             f"records out of --data")
        row[attribute] = index
    return row


def read_labels(data: str, classes: dict[str, list[str]], classes_file: str = "",
                max_skipped: float = DEFAULT_MAX_SKIPPED, limit: int | None = None) -> tuple[list[str], dict[str, Tensor], dict[str, int]]:
    """(keys, attribute -> (n,) class indices, left-out counts) of the records of ``data`` that carry a
    label for every attribute of ``classes`` (see the module docstring).

    Raises the one-line error for a record whose label no class names, and for a
    ``--classes`` class (``classes_file`` given) that no record has.
    """
    keys: list[str] = []
    labels: dict[str, list[int]] = {a: [] for a in classes}
    left_out: dict[str, int] = {}
    members: dict[str, str] = {}

    def cls_text() -> dict[str, str]:
        if not members:
            members.update(cls_members(data) or {"": ""})
        return members

    where = f"--classes {classes_file}" if classes_file else "the head"
    for record in iter_pairs(data, require_image=False, max_skipped=max_skipped):
        if limit is not None and len(keys) >= limit:
            break
        row = record_labels(record.key, record.meta or {}, classes, where, cls_text)
        if row is None:
            left_out["several objects"] = left_out.get("several objects", 0) + 1
            continue
        keys.append(record.key)
        for attribute, index in row.items():
            labels[attribute].append(index)
    if not keys:
        reason = " (every scene has several objects: zero-shot labels need single-object scenes, e.g. vlsae world --max-objects 1)" \
            if left_out else ""
        raise VlsaeError(f"no labelled records in {data}{reason}")
    tensors = {a: torch.tensor(v, dtype=torch.long) for a, v in labels.items()}
    if classes_file:
        for attribute, values in tensors.items():
            missing = [c for i, c in enumerate(classes[attribute]) if not bool((values == i).any())]
            if missing:
                raise VlsaeError(f"--classes {classes_file} names {attribute} '{missing[0]}', which no record of {data} has"
                                 f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; remove it from the file "
                                 f"or give data that holds it")
    return keys, tensors, left_out


def _wanted(records: Iterator[Any], keys: set[str]) -> Iterator[Any]:
    for record in records:
        if record.key in keys:
            yield record


def cached_images(acts: str | Path, keys: list[str], model: str = "") -> Tensor:
    """(len(keys), d) image rows of an activation cache, in the order of ``keys``."""
    cache = ActivationCache(acts, modality="image")
    source = cache.manifest.get("source", "")
    if model and source and source != model:
        raise VlsaeError(f"the activation cache {acts} holds {source} embeddings, not {model}'s; pass the --model it "
                         f"was extracted with or another --acts")
    hook = cache.manifest.get("hook_points", {}).get("image") or cache.manifest.get("hook", "")
    if hook not in ("final", IMAGE_HOOK):
        raise VlsaeError(f"the activation cache {acts} holds hook '{hook}', not the final image embeddings zero-shot "
                         f"compares with text; extract with --hook final")
    cached = cache.keys()
    rows = cache.read_all()
    if rows.shape[0] != len(cached):
        raise VlsaeError(f"the activation cache {acts} has several image rows per pair; extract with --tokens cls")
    position = {key: i for i, key in enumerate(cached)}
    missing = [k for k in keys if k not in position]
    if missing:
        raise VlsaeError(f"the activation cache {acts} lacks {len(missing)} of the {len(keys)} labelled pairs (first: "
                         f"{missing[0]}); extract it from the same --data")
    return rows[torch.tensor([position[k] for k in keys], dtype=torch.long)].float()


def extracted_images(adapter: Adapter, data: str, keys: list[str], batch_size: int = 128,
                     max_skipped: float = DEFAULT_MAX_SKIPPED, progress: bool = False) -> Tensor:
    """(len(keys), d) final image embeddings of the records named by ``keys``, through a temporary cache."""
    reader = PairReader(data, max_skipped=max_skipped)
    with tempfile.TemporaryDirectory(prefix="vlsae-zeroshot-") as tmp:
        extract_pairs(adapter, _wanted(iter(reader), set(keys)), Path(tmp) / "acts", hook=IMAGE_HOOK, tokens="cls",
                      batch_size=batch_size, overwrite=True, progress=progress, data=str(data), reads=reader.stats,
                      limit=len(keys))
        return cached_images(Path(tmp) / "acts", keys)


def split(n: int, val_fraction: float = 0.5, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(validation rows, test rows): a seeded permutation of ``range(n)`` cut at ``val_fraction``."""
    if not 0.0 < val_fraction < 1.0:
        raise VlsaeError(f"--val-fraction must be strictly between 0 and 1, got {val_fraction}")
    if n < 2:
        raise VlsaeError(f"a validation and a test split need at least 2 labelled records, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = min(n - 1, max(1, int(round(n * val_fraction))))
    return order[:cut].sort().values, order[cut:].sort().values
