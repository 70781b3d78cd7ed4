"""Activation extraction: pairs -> model adapter -> activation cache.

:func:`extract` is what ``vlsae extract`` runs: it reads webdataset pair shards,
runs an adapter in batches and streams the activations into an
:class:`~multimodal.cache.ActivationWriter`. :func:`extract_pairs` does the same
for any iterable of pair records (tests, in-memory data).

Pipeline (:mod:`multimodal.prefetch`): a background thread reads records and
batches them, a small thread pool runs ``adapter.prepare`` (image transforms, tokenising) on the next
batches, and the main thread runs the model and writes shards, so reading
and preprocessing overlap the forward pass. With ``reader_process=True`` the
reading and preparing run in a forked reader process instead (one PyTorch
``DataLoader`` worker), off the main process's interpreter lock: the usual
choice where spare cores feed a GPU. On the 2-core CPU machine it measured
slower (the reader process and the forward's threads contend for the same two
cores), so threads are the default. Batch order is the record order either
way, and an error while reading reaches the caller after the batches before it.

Resuming: when ``out`` holds an unfinished cache with the same settings, the
pairs of its finished shards are skipped by position. Extraction restarts at
the beginning of the batch that holds the first missing pair (and drops that
batch's already-written pairs), so with an unchanged batch size every batch
sees exactly the inputs it saw before and the resumed cache equals an
uninterrupted one. The key of the last written pair is checked against the
data, so changed data is an error, not a silent mix.

Failing: nothing reaches ``out`` before the first cache shard is ready (see
:mod:`multimodal.cache_writer`), so a run that fails early leaves ``out`` as it
was; a run that fails later leaves its finished shards, and its error says so
and how to resume or start over. Pairs lost to damaged data shards are counted
by the reader (:class:`multimodal.pairs.ReadStats`); more than ``max_skipped``
of them fails the run before the cache is marked complete, and the count is
recorded in the manifest as ``skipped``.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator


from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.files import check_writable_dir

from multimodal.adapters import Adapter, create_adapter
from multimodal.adapters.base import Extracted, dtype_name, pair_fields
from multimodal.cache import ActivationWriter
from multimodal.prefetch import batched, prepared_stream
from multimodal.pairs import DEFAULT_MAX_SKIPPED, PairReader, ReadStats, check_max_skipped, expand_urls


@dataclass
class ExtractConfig:
    """Settings of ``vlsae extract``."""

    model: str = option("shapes-clip", help="model adapter spec, NAME or NAME:ARGUMENTS")
    data: str = option("", help="webdataset pair shards, e.g. 'DIR/{000000..000009}.tar'")
    out: str = option("", help="activation cache folder to write (resumed when unfinished)")
    hook: str = option("final", help="hook point (see --list-hooks); comma-join one per modality")
    tokens: str = option("cls", help="token selection: cls | patch | all | mean")
    batch_size: int = option(64, help="pairs per forward pass")
    dtype: str = option("fp32", help="precision of the forward pass and of the stored activations: fp32 | bf16 | fp16")
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    shard_rows: int = option(50_000, help="rows per cache shard (a shard closes once a modality reaches it)")
    limit: int | None = option(None, help="stop after this many pairs (None: all)")
    workers: int = option(2, help="threads preparing batches (image transforms, tokenising) ahead of the model")
    reader_process: bool = option(False, help="read and prepare batches in a forked reader process instead of threads "
                                               "(for machines with spare cores feeding a GPU)")
    max_skipped: float = option(DEFAULT_MAX_SKIPPED, help="largest fraction of the pairs that damaged shards may lose "
                                                          "(corrupt records, truncated tars) before the run fails")
    overwrite: bool = option(False, help="replace an existing cache at out")
    progress: bool = option(True, help="show a progress bar")


@dataclass
class ExtractResult:
    path: Path
    n_pairs: int
    rows: dict[str, int]
    width: dict[str, int]
    resumed_from: int
    seconds: float
    forward_seconds: float
    batches: int
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def pairs_per_second(self) -> float:
        done = self.n_pairs - self.resumed_from
        return done / self.seconds if self.seconds > 0 else 0.0

    @property
    def skipped(self) -> dict[str, Any] | None:
        """The pairs the read lost (the manifest's ``skipped``; None for records not read from shards)."""
        return self.manifest.get("skipped")

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.path), "pairs": self.n_pairs, "rows": self.rows, "width": self.width,
                "skipped": (self.skipped or {}).get("pairs"), "resumed_from": self.resumed_from,
                "seconds": round(self.seconds, 2),
                "forward_seconds": round(self.forward_seconds, 2), "batches": self.batches,
                "pairs_per_s": round(self.pairs_per_second, 1)}


def drop_first_pairs(batch: Extracted, k: int) -> Extracted:
    """The batch without its first k pairs (and their rows)."""
    if k <= 0:
        return batch
    acts, index = {}, {}
    for m, rows in batch.acts.items():
        pair = batch.pair_index[m]
        keep = pair >= k
        acts[m], index[m] = rows[keep], pair[keep] - k
    return Extracted(keys=batch.keys[k:], acts=acts, pair_index=index)


class _DataMismatch(VlsaeError):
    """The data differ from what the unfinished cache was extracted from (the message says what to do)."""


def extract_pairs(adapter: Adapter, records: Iterable[Any], out: str | Path, hook: str = "final", tokens: str = "cls",
                  batch_size: int = 64, shard_rows: int = 50_000, limit: int | None = None, overwrite: bool = False,
                  workers: int = 2, progress: bool = True, data: str = "",
                  info: dict[str, Any] | None = None, reader_process: bool = False,
                  reads: ReadStats | None = None) -> ExtractResult:
    """Run ``adapter`` over ``records`` (pair records in a fixed order) into the cache folder ``out``.

    ``data`` names the records' source in the manifest (it must match to resume).
    ``reader_process`` reads and prepares batches in a forked process (see the
    module docstring); ``records`` is then iterated there, not here. ``reads`` is
    the :class:`~multimodal.pairs.ReadStats` the records' reader fills: its
    policy is checked before the cache is marked complete and its summary is
    the manifest's ``skipped``. A one-line error after finished shards were
    written says how to resume or start over.
    """
    if batch_size < 1:
        raise VlsaeError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise VlsaeError(f"limit must be at least 1, got {limit}")
    tokens = adapter.check_tokens(tokens)
    writer = open_writer(adapter, out, hook, tokens, shard_rows, overwrite, data, info)
    return run_writers(adapter, records, {hook: writer}, tokens, batch_size, limit, workers, progress, data,
                       reader_process, reads)[hook]


def open_writer(adapter: Adapter, out: str | Path, hook: str, tokens: str, shard_rows: int, overwrite: bool,
                data: str, info: dict[str, Any] | None = None) -> ActivationWriter:
    """The cache writer of one hook (checks only: nothing is written before its first shard)."""
    points = adapter.parse_hook(hook)
    modalities = [m for m in adapter.modalities if m in points]
    settings = {"source": adapter.spec, "hook": hook, "tokens": tokens, "data": data}
    info = {"adapter": adapter.describe(), "hook_points": points, **(info or {})}
    return ActivationWriter(out, settings, modalities, adapter.widths(hook), adapter.dtype, shard_rows=shard_rows,
                            overwrite=overwrite, info=info)


def run_writers(adapter: Adapter, records: Iterable[Any], writers: dict[str, ActivationWriter], tokens: str,
                batch_size: int, limit: int | None, workers: int, progress: bool, data: str, reader_process: bool,
                reads: ReadStats | None) -> dict[str, ExtractResult]:
    """Run ``adapter`` over ``records`` once into one opened cache writer per hook; hook -> result.

    Every writer resumes from its own finished shards: the stream restarts at the batch of the
    earliest missing pair and each writer drops the pairs it already holds.
    """
    done = min(w.resume_position for w in writers.values())
    if limit is not None and done >= limit:
        return {hook: _result(w, w.close(), w.resume_position, 0.0, 0.0, 0) for hook, w in writers.items()}
    try:
        return _run(adapter, records, writers, tokens, batch_size, limit, workers, progress, data, reader_process,
                    reads)
    except _DataMismatch:
        raise
    except VlsaeError as exc:
        hint = next((h for h in (w.resume_hint() for w in writers.values()) if h), None)
        if hint is None:
            raise
        raise VlsaeError(f"{exc}; {hint}") from None


def _run(adapter: Adapter, records: Iterable[Any], writers: dict[str, ActivationWriter], tokens: str,
         batch_size: int, limit: int | None, workers: int, progress: bool, data: str,
         reader_process: bool, reads: ReadStats | None) -> dict[str, ExtractResult]:
    """The streaming part of :func:`run_writers`: records -> batches -> one forward for every hook -> writers."""
    first = next(iter(writers.values()))
    out = first.path if len(writers) == 1 else first.path.parent
    done = min(w.resume_position for w in writers.values())
    aligned = (done // batch_size) * batch_size
    resumed = {hook: w.resume_position for hook, w in writers.items()}
    drop = {hook: held - aligned for hook, held in resumed.items()}  # pairs each writer already holds
    expected = {w.resume_position - 1: (w.last_key, w.path) for w in writers.values() if w.last_key is not None}
    last_needed = max(w.resume_position for w in writers.values()) - 1
    modalities = [m for m in adapter.modalities if any(m in adapter.parse_hook(h) for h in writers)]

    def positioned() -> Iterator[Any]:
        """Records from position ``aligned`` on (the skipped ones are read, not prepared)."""
        position = -1
        # islice stops at the limit without reading one record more (the read statistics count what was read)
        for position, record in enumerate(records if limit is None else itertools.islice(records, limit)):
            if position in expected and str(pair_fields(record)[0]) != expected[position][0]:
                key, path = expected[position]
                raise _DataMismatch(f"the data changed since the interrupted extraction into {path}: pair {position} "
                                    f"is '{pair_fields(record)[0]}', the cache has '{key}'; use the same --data or "
                                    f"--overwrite")
            if position >= aligned:
                yield record
        if position < last_needed:
            raise _DataMismatch(f"the data has {position + 1} pairs but the unfinished cache {out} already holds "
                                f"{last_needed + 1}; use the same --data or --overwrite")

    started = time.perf_counter()
    forward_seconds = 0.0
    n_batches = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=limit, initial=done, unit="pair", desc=f"extract {' '.join(writers)}", dynamic_ncols=True,
                   disable=None, leave=False)
    stream = prepared_stream(lambda: batched(positioned(), batch_size),
                              lambda batch: adapter.prepare(batch, modalities=modalities), workers=workers,
                              in_process=not reader_process, reads=reads)
    try:
        for prepared in stream:
            tick = time.perf_counter()
            batches = adapter.forward_hooks(prepared, list(writers), tokens)
            forward_seconds += time.perf_counter() - tick
            n_batches += 1
            for hook, writer in writers.items():
                batch, held = batches[hook], drop[hook]
                if held:
                    drop[hook] = max(0, held - len(batch.keys))
                    batch = drop_first_pairs(batch, held)
                    if not batch.keys:
                        continue
                writer.add(batch)
            if bar is not None:
                bar.update(len(prepared.keys))
    finally:
        stream.close()
        if bar is not None:
            bar.close()
    if first.resume_position == 0 and not first.pending_pairs:
        raise VlsaeError(f"no pairs to extract from {data or 'the records given'}; check --data")
    if reads is not None:
        reads.check()  # the reader checks at its end too; a --limit stops it before that
    seconds = time.perf_counter() - started
    extra = None if reads is None else {"skipped": reads.summary()}
    return {hook: _result(w, w.close(extra=extra), resumed[hook], seconds, forward_seconds, n_batches)
            for hook, w in writers.items()}


def _result(writer: ActivationWriter, manifest: dict[str, Any], resumed_from: int, seconds: float,
            forward_seconds: float, batches: int) -> ExtractResult:
    return ExtractResult(path=writer.path, n_pairs=manifest["n_pairs"], rows=manifest["rows"], width=manifest["width"],
                         resumed_from=resumed_from, seconds=seconds, forward_seconds=forward_seconds, batches=batches,
                         manifest=manifest)


def check_extract_config(config: ExtractConfig) -> None:
    """The cheap checks of an extraction (data and out given, out writable, the lost-pair threshold)."""
    if not config.data:
        raise VlsaeError("no --data given; pass webdataset shards, e.g. --data 'DIR/{000000..000009}.tar'")
    if not config.out:
        raise VlsaeError("no --out given; pass the activation cache folder to write")
    check_writable_dir(config.out, flag="--out")
    check_max_skipped(config.max_skipped)


def extract(config: ExtractConfig, adapter: Adapter | None = None) -> ExtractResult:
    """``vlsae extract``: read ``config.data`` with the pair reader, write the cache at ``config.out``.

    The cheap checks (flags, shards present, ``--out`` writable) come before the
    model is loaded, so a typo costs a second, not a model download.
    """
    check_extract_config(config)
    urls = expand_urls(config.data)
    if adapter is None:
        adapter = create_adapter(config.model, device=config.device, dtype=config.dtype)
    # a text-only hook reads caption-only shards too (prompt lists for diffusion text encoders)
    reader = PairReader(urls, require_image="image" in adapter.parse_hook(config.hook), max_skipped=config.max_skipped)
    return extract_pairs(adapter, reader, config.out, hook=config.hook, tokens=config.tokens,
                         batch_size=config.batch_size, shard_rows=config.shard_rows, limit=config.limit,
                         overwrite=config.overwrite, workers=config.workers, progress=config.progress,
                         reader_process=config.reader_process, reads=reader.stats,
                         data=config.data, info={"batch_size": config.batch_size, "device": str(adapter.device),
                                                 "compute_dtype": dtype_name(adapter.dtype)})
