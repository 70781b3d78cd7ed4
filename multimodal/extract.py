"""Activation extraction: pairs -> model adapter -> activation cache.

:func:`extract` is what ``vlsae extract`` runs: it reads webdataset pair shards,
runs an adapter in batches and streams the activations into an
:class:`~multimodal.cache.ActivationWriter`. :func:`extract_pairs` does the same
for any iterable of pair records (tests, in-memory data).

Pipeline: a background thread reads records and batches them, a small thread
pool runs ``adapter.prepare`` (image transforms, tokenising) on the next
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
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from vlsae.config import option
from vlsae.errors import VlsaeError
from vlsae.files import check_writable_dir

from multimodal.adapters import Adapter, create_adapter
from multimodal.adapters.base import Extracted, dtype_name, pair_fields
from multimodal.cache import ActivationWriter
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


def _batched(records: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(records)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk


class _Prefetcher:
    """Reads batches and prepares them in background threads, yielding them in order."""

    _END = object()

    def __init__(self, batches: Iterator[list[Any]], prepare: Callable[[list[Any]], Any], workers: int, depth: int):
        self.batches = batches
        self.prepare = prepare
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="vlsae-prepare")
        self.thread = threading.Thread(target=self._produce, name="vlsae-reader", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for batch in self.batches:
                if not self._put((batch, self.pool.submit(self.prepare, batch))):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[list[Any], Any]]:
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            batch, future = item
            yield batch, future.result()

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock the reader and cancel queued work
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple) and isinstance(item[1], Future):
                item[1].cancel()
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _ReadFailure:
    """An exception raised in the reader process, carried to the main process to be raised there."""

    error: BaseException


@dataclass
class _ReadReport:
    """The reader process's read statistics, sent after its last batch (the main process's copy saw nothing)."""

    stats: ReadStats


class _DataMismatch(VlsaeError):
    """The data differ from what the unfinished cache was extracted from (the message says what to do)."""


class _PreparedBatches(torch.utils.data.IterableDataset):
    """Batches of records, prepared by a thread pool, in order: the reader's work, in this
    process or in a reader process (``carry_errors``: an error becomes a :class:`_ReadFailure`
    item, since a DataLoader worker would wrap it in a multi-line traceback)."""

    def __init__(self, batches: Callable[[], Iterator[list[Any]]], prepare: Callable[[list[Any]], Any], workers: int,
                 carry_errors: bool = False, reads: ReadStats | None = None):
        self.batches = batches
        self.prepare = prepare
        self.workers = workers
        self.carry_errors = carry_errors
        self.reads = reads  # sent after the last batch (carry_errors: the reader process's copy)

    def __iter__(self) -> Iterator[Any]:
        prefetch = _Prefetcher(self.batches(), self.prepare, workers=self.workers, depth=self.workers + 2)
        try:
            for _, prepared in prefetch:
                yield prepared
            if self.carry_errors and self.reads is not None:
                yield _ReadReport(self.reads)
        except Exception as exc:  # noqa: BLE001 - every reading error is the caller's to see
            if not self.carry_errors:
                raise
            yield _ReadFailure(_picklable(exc))
        finally:
            prefetch.close()


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return VlsaeError(f"{type(exc).__name__}: {exc}")


def _prepared_stream(batches: Callable[[], Iterator[list[Any]]], prepare: Callable[[list[Any]], Any], workers: int,
                     in_process: bool, reads: ReadStats | None = None) -> Iterator[Any]:
    """Prepared batches in order, from a forked reader process (or, with ``in_process``, from threads here).

    ``reads``, the statistics the records' reader fills, ends up holding the reader process's counts.
    """
    import multiprocessing

    if in_process or "fork" not in multiprocessing.get_all_start_methods():  # no fork (Windows): threads here
        yield from _PreparedBatches(batches, prepare, workers)
        return
    from torch.utils.data import DataLoader

    items = iter(DataLoader(_PreparedBatches(batches, prepare, workers, carry_errors=True, reads=reads), batch_size=None,
                            num_workers=1, multiprocessing_context="fork", prefetch_factor=max(2, workers + 2)))
    try:
        for item in items:
            if isinstance(item, _ReadFailure):
                raise item.error
            if isinstance(item, _ReadReport):
                if reads is not None:
                    reads.absorb(item.stats)
                continue
            yield item
    finally:
        getattr(items, "_shutdown_workers", lambda: None)()


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
    points = adapter.parse_hook(hook)
    modalities = [m for m in adapter.modalities if m in points]
    widths = adapter.widths(hook)
    settings = {"source": adapter.spec, "hook": hook, "tokens": tokens, "data": data}
    info = {"adapter": adapter.describe(), "hook_points": points, **(info or {})}
    writer = ActivationWriter(out, settings, modalities, widths, adapter.dtype, shard_rows=shard_rows,
                              overwrite=overwrite, info=info)
    done = writer.resume_position
    if limit is not None and done >= limit:
        manifest = writer.close()
        return _result(writer, manifest, done, 0.0, 0.0, 0)
    try:
        return _run(adapter, records, writer, hook, tokens, modalities, batch_size, limit, workers, progress, data,
                    reader_process, reads)
    except _DataMismatch:
        raise
    except VlsaeError as exc:
        hint = writer.resume_hint()
        if hint is None:
            raise
        raise VlsaeError(f"{exc}; {hint}") from None


def _run(adapter: Adapter, records: Iterable[Any], writer: ActivationWriter, hook: str, tokens: str,
         modalities: list[str], batch_size: int, limit: int | None, workers: int, progress: bool, data: str,
         reader_process: bool, reads: ReadStats | None) -> ExtractResult:
    """The streaming part of :func:`extract_pairs`: records -> batches -> forward -> writer."""
    out = writer.path
    done = writer.resume_position
    aligned = (done // batch_size) * batch_size
    drop = done - aligned
    expected_key = writer.last_key

    def positioned() -> Iterator[Any]:
        """Records from position ``aligned`` on (the skipped ones are read, not prepared)."""
        position = -1
        # islice stops at the limit without reading one record more (the read statistics count what was read)
        for position, record in enumerate(records if limit is None else itertools.islice(records, limit)):
            if position == done - 1 and expected_key is not None and str(pair_fields(record)[0]) != expected_key:
                raise _DataMismatch(f"the data changed since the interrupted extraction into {out}: pair {position} is "
                                    f"'{pair_fields(record)[0]}', the cache has '{expected_key}'; use the same --data or "
                                    f"--overwrite")
            if position >= aligned:
                yield record
        if position < done - 1:
            raise _DataMismatch(f"the data has {position + 1} pairs but the unfinished cache {out} already holds {done}; "
                                f"use the same --data or --overwrite")

    started = time.perf_counter()
    forward_seconds = 0.0
    n_batches = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=limit, initial=done, unit="pair", desc=f"extract {hook}", dynamic_ncols=True,
                   disable=None, leave=False)
    stream = _prepared_stream(lambda: _batched(positioned(), batch_size),
                              lambda batch: adapter.prepare(batch, modalities=modalities), workers=workers,
                              in_process=not reader_process, reads=reads)
    try:
        for prepared in stream:
            tick = time.perf_counter()
            batch = adapter.forward(prepared, hook, tokens)
            forward_seconds += time.perf_counter() - tick
            n_batches += 1
            if drop:
                batch, drop = drop_first_pairs(batch, drop), 0
            writer.add(batch)
            if bar is not None:
                bar.update(len(batch.keys))
    finally:
        stream.close()
        if bar is not None:
            bar.close()
    if writer.resume_position == 0 and not writer.pending_pairs:
        raise VlsaeError(f"no pairs to extract from {data or 'the records given'}; check --data")
    if reads is not None:
        reads.check()  # the reader checks at its end too; a --limit stops it before that
    manifest = writer.close(extra=None if reads is None else {"skipped": reads.summary()})
    return _result(writer, manifest, done, time.perf_counter() - started, forward_seconds, n_batches)


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
