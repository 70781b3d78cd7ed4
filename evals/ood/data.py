"""The inputs of an OOD run: image embeddings of each set, and the zero-shot head, extracted once and cached.

A set (``--fit``, ``--id``, each ``--ood NAME=...``) is either an activation
cache folder (``vlsae extract`` output, hook ``final``) or pair shards, which
are extracted once into ``CACHE/NAME`` (hook ``final``, both modalities) and
reused by the next run while the shards are unchanged. Scoring then reads the
caches only, so a rerun of ``vlsae ood`` costs seconds.

The cheap checks come first (:func:`check_source`: shards exist and hold a
readable pair, a cache is complete and holds image embeddings), so a bad
``--ood`` costs a second, not an extraction of the other sets.

The zero-shot head (text embeddings of every prompt, 9,240 on ShapesWorld) is
cached too, as ``CACHE/head-HASH.safetensors`` + ``.json``, keyed by the model
and the prompts.

Under torchrun a set's extraction is split over the processes
(:func:`multimodal.extract_distributed.extract_distributed`: each rank takes its
data shards, rank 0 writes the manifest), and the cache reads like one a single
process wrote. Every rank decides alone whether a set's cache can be reused, and
they agree: the decision reads only the cache's ``manifest.json`` and the shards'
times, which change only when rank 0 writes that manifest, after every rank is
done with the set.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from multimodal.adapters import Adapter
from multimodal.cache import ActivationCache
from multimodal.cache_format import MANIFEST, read_manifest
from multimodal.extract import ExtractConfig
from multimodal.extract_distributed import extract_distributed
from multimodal.pairs import PairReader, expand_urls
from multimodal.ranks import Ranks
from vlsae.errors import VlsaeError
from vlsae.files import atomic_save_tensors, atomic_write_json, read_safetensors

from evals.zeroshot.head import ZeroShotHead, classes_head, shapesworld_head

IMAGE_HOOKS = ("final", "visual.final")
SET_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
RESERVED = {"id", "fit"}


@dataclass
class EmbeddingSet:
    """One set's image embeddings, in cache order.

    keys: one pair key per row; image: (n, d) raw final image embeddings.
    """

    name: str
    source: str
    keys: list[str]
    image: Tensor
    cache: str

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "rows": len(self.keys), "cache": self.cache}


def parse_ood_sets(items: list[str] | dict[str, str]) -> dict[str, str]:
    """``["noise=DIR", ...]`` (or a mapping) -> {name: source}, with one-line errors for bad names."""
    if isinstance(items, dict):
        pairs = [(str(k), str(v)) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            name, sep, source = str(item).partition("=")
            if not sep or not source.strip():
                raise VlsaeError(f"--ood '{item}' must look like NAME=SHARDS_OR_CACHE, e.g. noise=data/ood/noise")
            pairs.append((name.strip(), source.strip()))
    if not pairs:
        raise VlsaeError("give at least one --ood NAME=SHARDS_OR_CACHE set to score against --id")
    out: dict[str, str] = {}
    for name, source in pairs:
        if not SET_NAME.match(name) or name in RESERVED:
            raise VlsaeError(f"OOD set name '{name}' must start with a letter, use letters, digits, '_', '-', '.' "
                             f"and not be 'id' or 'fit'")
        if name in out:
            raise VlsaeError(f"OOD set '{name}' is given twice; give every --ood set its own name")
        out[name] = source
    return out


def is_cache(source: str | Path) -> bool:
    return (Path(source) / MANIFEST).is_file()


def _identity(source: str) -> tuple[str, ...]:
    """What two sources are compared by: the resolved cache folder, or the resolved shard files."""
    if is_cache(source):
        return (str(Path(source).resolve()),)
    return tuple(str(Path(u).resolve()) if "://" not in u else u for u in expand_urls(source))


def check_distinct(fit: str, id_source: str) -> None:
    """Scoring the rows the statistics were fitted on inflates every AUROC: refuse ``--id`` equal to ``--fit``."""
    if _identity(fit) == _identity(id_source):
        raise VlsaeError("--id is the same data as --fit; score held-out in-distribution rows (neither the fit rows "
                         "nor the SAE's training rows), e.g. a ShapesWorld with another --seed")


def check_source(source: str, flag: str, spec: str | None = None) -> None:
    """The one-line error now if ``source`` cannot give image embeddings of model ``spec`` (no model is
    loaded for this)."""
    if is_cache(source):
        manifest = read_manifest(source)
        if spec is not None and manifest.get("source") != spec:
            raise VlsaeError(f"{flag}: activation cache {source} holds embeddings of '{manifest.get('source')}', "
                             f"not of --model {spec}; extract it with the same model")
        if not manifest.get("complete"):
            raise VlsaeError(f"{flag}: activation cache {source} is unfinished; re-run its vlsae extract to finish it")
        if "image" not in manifest.get("modalities", []) or manifest.get("hook") not in IMAGE_HOOKS:
            raise VlsaeError(f"{flag}: activation cache {source} holds hook '{manifest.get('hook')}' "
                             f"({', '.join(manifest.get('modalities', []))}); OOD scoring needs final image embeddings "
                             f"(vlsae extract --hook final)")
        return
    try:
        urls = expand_urls(source)
        next(iter(PairReader(urls, warn=False)), None)
    except VlsaeError as exc:
        raise VlsaeError(f"{flag}: {exc}") from None


def _reusable(cache: Path, source: str, spec: str) -> bool:
    """A complete cache of ``source`` by model ``spec`` (hook final), written after its shards last changed."""
    if not is_cache(cache):
        return False
    manifest = read_manifest(cache)
    if not (manifest.get("complete") and manifest.get("data") == source and manifest.get("source") == spec
            and manifest.get("hook") == "final"):
        return False
    written = (cache / MANIFEST).stat().st_mtime
    return all(Path(u).stat().st_mtime <= written for u in expand_urls(source) if "://" not in u)


def needs_extraction(name: str, source: str, spec: str, cache_root: Path) -> bool:
    """Whether :func:`load_set` would extract this set (shards without a reusable cache in ``cache_root/name``)."""
    return not is_cache(source) and not _reusable(cache_root / name, source, spec)


def load_set(name: str, source: str, flag: str, adapter: Adapter | None, spec: str, cache_root: Path,
             batch_size: int = 128, max_skipped: float | None = 0.01, progress: bool = True,
             ranks: Ranks | None = None) -> EmbeddingSet:
    """The image embeddings of one set: read from a cache, or extracted from shards into ``cache_root/name``
    (split over torchrun's processes, ``ranks``: default from the environment; every rank calls it)."""
    if is_cache(source):
        check_source(source, flag, spec)
        cache = Path(source)
    else:
        cache = cache_root / name
        if not _reusable(cache, source, spec):
            if adapter is None:
                raise VlsaeError(f"{flag}: shards need the model to extract them; give --model")
            extract_distributed(ExtractConfig(model=spec, data=source, out=str(cache), hook="final",
                                              batch_size=batch_size, max_skipped=max_skipped, overwrite=True,
                                              progress=progress), adapter=adapter, ranks=ranks)
    reader = ActivationCache(cache, modality="image")
    return EmbeddingSet(name=name, source=source, keys=reader.keys(), image=reader.read_all(), cache=str(cache))


def check_disjoint(fit: EmbeddingSet, scored: EmbeddingSet) -> None:
    """Refuse an ID set that shares pairs with the fit set (the same keys)."""
    shared = set(fit.keys) & set(scored.keys)
    if shared:
        raise VlsaeError(f"{len(shared)} of the {len(scored.keys)} --id pairs are also in --fit (e.g. key "
                         f"{sorted(shared)[0]}); score held-out rows, e.g. a ShapesWorld with another --seed")


# -- the zero-shot head, cached ---------------------------------------------------------

def _head_key(adapter: Adapter, classes: str | None) -> str:
    description = adapter.describe()
    weights = description.get("weights")
    if weights and Path(str(weights)).is_file():
        stat = Path(str(weights)).stat()
        description["weights_file"] = [stat.st_size, stat.st_mtime]
    prompts = Path(classes).read_text() if classes else "shapesworld object descriptions"
    return hashlib.sha256(json.dumps([description, prompts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_head(adapter: Adapter, classes: str | None, cache_root: Path | None) -> ZeroShotHead:
    """The zero-shot head of ``adapter``: a ``--classes`` file's, else ShapesWorld's; cached in ``cache_root``."""
    path = None
    if cache_root is not None:
        path = cache_root / f"head-{_head_key(adapter, classes)}"
        weights, record = path.with_suffix(".safetensors"), path.with_suffix(".json")
        if weights.is_file() and record.is_file():
            meta = json.loads(record.read_text())
            tensors = read_safetensors(weights, what="zero-shot head")
            return ZeroShotHead(attributes=meta["attributes"], classes=meta["classes"], text=tensors["text"],
                                prompt_class={a: tensors[f"prompt_class.{a}"] for a in meta["attributes"]},
                                logit_scale=float(meta["logit_scale"]), prompts=meta["prompts"], raw=tensors.get("raw"))
    head = classes_head(adapter, classes) if classes else shapesworld_head(adapter)
    if path is not None:
        tensors = {"text": head.text.contiguous(), **{f"prompt_class.{a}": t.contiguous() for a, t in head.prompt_class.items()}}
        if head.raw is not None:
            tensors["raw"] = head.raw.contiguous()
        atomic_save_tensors(tensors, path.with_suffix(".safetensors"))
        atomic_write_json(path.with_suffix(".json"), {"attributes": head.attributes, "classes": head.classes,
                                                      "logit_scale": head.logit_scale, "prompts": head.prompts,
                                                      "model": adapter.spec})
    return head
