"""ITDA Jaccard and linear CKA between runs or activation caches, and layer matching.

Each input is an ITDA run (its dictionary's atom labels are read) or an
activation cache (an ITDA is built on its rows here, in cache order, so every
cache sees the same stream: the same pairs in the same order). Everything is
checked before any dictionary is built: the kinds must agree (runs with runs,
caches with caches), every input must have the same number of rows, caches
must hold the same pairs in the same order, and runs must have read streams of
the same length with the same seed and batch size. Linear CKA needs the
activations, so it is computed for caches only.

With several inputs on each side (layers of two models, same order), the
result adds the layer-matching accuracy of both measures.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from multimodal.cache import MANIFEST, ActivationCache
from vlsae.checkpoint import CONFIG, load_sae, read_config
from vlsae.errors import VlsaeError
from vlsae.saes import create_sae
from vlsae.saes.itda import ITDA, ITDAConfig

from evals.similarity.measures import jaccard, layer_matching, linear_cka

TRAINING_JSON = "training.json"
BUILD_ROWS = 4096  # rows handed to the ITDA at once (it encodes them `chunk` at a time)


@dataclass
class ITDASettings:
    """How ITDAs are built on activation caches (ITDA runs keep the settings they were built with)."""

    k: int = 8
    threshold: float = 0.1
    capacity: int = 4096
    chunk: int = 128


@dataclass
class Representation:
    """One input: an ITDA run or an activation cache (rows loaded lazily)."""

    path: str
    kind: str  # "run" or "acts"
    n_rows: int
    stream: dict[str, Any]
    labels: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    atoms: int = 0
    info: dict[str, Any] = field(default_factory=dict)


def open_input(path: str | Path, modality: str | None = None, max_rows: int | None = None) -> Representation:
    """What ``path`` is, with its stream identity, without building anything (one-line errors)."""
    p = Path(path)
    if not p.exists():
        raise VlsaeError(f"not found: {p}; give an ITDA run folder or an activation cache")
    if (p / MANIFEST).is_file():
        cache = _open_cache(p, modality)
        n = len(cache) if max_rows is None else min(len(cache), max_rows)
        keys = _row_keys(cache, n)
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        return Representation(str(p), "acts", n, {"pairs": len(set(keys)), "row_keys_sha256": digest},
                              info={"hook": cache.manifest.get("hook"), "source": cache.manifest.get("source"),
                                    "modality": cache.modalities[0], "width": cache.d_in})
    if (p / CONFIG).is_file():
        arch = read_config(p)["arch"]
        if arch != "itda":
            raise VlsaeError(f"{p} is a '{arch}' SAE; ITDA similarity compares ITDA dictionaries (vlsae train --arch itda) "
                             "or activation caches")
        record = _training_record(p)
        train = record.get("train_config", {})
        stream = {"rows": int(record.get("summary", {}).get("tokens", 0)), "seed": train.get("seed"),
                  "batch_size": train.get("batch_size")}
        return Representation(str(p), "run", stream["rows"], stream)
    raise VlsaeError(f"{p} is neither an ITDA run (no {CONFIG}) nor an activation cache (no {MANIFEST})")


def _open_cache(path: Path, modality: str | None) -> ActivationCache:
    if modality:
        return ActivationCache(path, modality=modality)
    mods = ActivationCache(path).modalities
    if len(mods) > 1:
        raise VlsaeError(f"activation cache {path} holds {', '.join(mods)}; choose one with --modality")
    return ActivationCache(path, modality=mods[0])


def _row_keys(cache: ActivationCache, n: int) -> list[str]:
    """The pair key of each of the first ``n`` rows (one row per pair: the keys themselves; token-level
    caches: read from each shard's row-to-pair index)."""
    keys = cache.keys()
    if len(cache) == len(keys):
        return keys[:n]
    out: list[str] = []
    m = cache.modalities[0]
    for shard in cache.iter_shards():
        out.extend(shard.keys[i] for i in shard.pair_index[m].tolist())
        if len(out) >= n:
            break
    return out[:n]


def _training_record(path: Path) -> dict[str, Any]:
    file = path / TRAINING_JSON
    if not file.is_file():
        raise VlsaeError(f"{path} has no {TRAINING_JSON}: not a finished ITDA run, so what stream it read is unknown")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise VlsaeError(f"{file} is damaged ({exc.msg})") from None


def check_streams(inputs: Sequence[Representation]) -> None:
    """Every input must describe the same stream (same rows, same order)."""
    kinds = {r.kind for r in inputs}
    if len(kinds) > 1:
        raise VlsaeError("mixing ITDA runs and activation caches: a run's atoms are positions in its training stream, "
                         "a cache's are rows in cache order; pass runs to both --a and --b, or caches to both")
    first = inputs[0]
    for other in inputs[1:]:
        if other.n_rows != first.n_rows:
            raise VlsaeError(f"{first.path} has {first.n_rows} rows but {other.path} has {other.n_rows}; ITDA similarity "
                             "needs the same inputs in the same order (use --max-rows to compare the first N of each)")
        if other.stream != first.stream:
            what = "pairs (or their order)" if first.kind == "acts" else "training streams (seed, batch size)"
            raise VlsaeError(f"{first.path} and {other.path} hold different {what}: {first.stream} vs {other.stream}; "
                             "build both on the same data in the same order")


def load(rep: Representation, modality: str | None, max_rows: int | None, settings: ITDASettings,
         keep_rows: bool) -> Representation:
    """Fill in the labels (and, for caches, the rows when ``keep_rows``)."""
    if rep.kind == "run":
        sae = load_sae(rep.path)
        assert isinstance(sae, ITDA)
        rep.labels, rep.atoms = sae.atom_labels(), sae.n_atoms
        rep.info = {"k": sae.config.k, "threshold": sae.config.threshold, "capacity": sae.n_latents}
        return rep
    rows = _open_cache(Path(rep.path), modality).read_all()
    assert isinstance(rows, torch.Tensor)
    rows = rows[: rep.n_rows].float()
    itda = build_itda(rows, settings)
    rep.labels, rep.atoms = itda.atom_labels(), itda.n_atoms
    if keep_rows:
        rep.rows = rows
    return rep


def build_itda(rows: torch.Tensor, settings: ITDASettings) -> ITDA:
    """An ITDA built on ``rows`` (n, d) in order; its labels are row indices."""
    sae = create_sae("itda", d_in=int(rows.shape[1]), n_latents=settings.capacity, k=settings.k,
                     threshold=settings.threshold, chunk=settings.chunk)
    assert isinstance(sae, ITDA)
    for start in range(0, rows.shape[0], BUILD_ROWS):
        sae.add_rows(rows[start:start + BUILD_ROWS].float())
        if sae.full:
            break
    return sae


def compare(a: Sequence[str], b: Sequence[str], modality: str | None = None, settings: ITDASettings | None = None,
            max_rows: int | None = None, cka: bool = True) -> dict[str, Any]:
    """Jaccard (and CKA for caches) between every input of ``a`` and every input of ``b``.

    Returns {"a", "b", "kind", "rows", "atoms", "jaccard" (len(a) x len(b)), "cka" (or None),
    "layer_matching" (when len(a) == len(b) > 1: per measure, see :func:`layer_matching`)}.
    """
    if not a or not b:
        raise VlsaeError("give at least one input to --a and one to --b")
    settings = settings or ITDASettings()
    ITDAConfig(d_in=1, n_latents=settings.capacity, k=settings.k, threshold=settings.threshold,
               chunk=settings.chunk)  # bad settings fail now, not after the first cache is read
    if max_rows is not None and max_rows <= 0:
        raise VlsaeError(f"--max-rows must be positive, got {max_rows}")
    reps_a = [open_input(p, modality, max_rows) for p in a]
    reps_b = [open_input(p, modality, max_rows) for p in b]
    check_streams(reps_a + reps_b)
    with_cka = cka and reps_a[0].kind == "acts"
    for rep in reps_a + reps_b:
        load(rep, modality, max_rows, settings, keep_rows=with_cka)
    J = [[jaccard(x.labels, y.labels) for y in reps_b] for x in reps_a]  # type: ignore[arg-type]
    C = [[linear_cka(x.rows, y.rows) for y in reps_b] for x in reps_a] if with_cka else None  # type: ignore[arg-type]
    out: dict[str, Any] = {"a": list(a), "b": list(b), "kind": reps_a[0].kind, "rows": reps_a[0].n_rows,
                           "atoms": {"a": [r.atoms for r in reps_a], "b": [r.atoms for r in reps_b]},
                           "jaccard": J, "cka": C,
                           "settings": vars(settings) if reps_a[0].kind == "acts" else [r.info for r in reps_a + reps_b]}
    if len(a) == len(b) > 1:
        out["layer_matching"] = {"itda": layer_matching(torch.tensor(J))}
        if C is not None:
            out["layer_matching"]["cka"] = layer_matching(torch.tensor(C))
    return out
