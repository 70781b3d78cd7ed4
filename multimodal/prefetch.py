"""Reading and preparing batches ahead of the model, in order: threads here or a forked reader process.

Extraction's feed (:mod:`multimodal.extract`): a background thread reads records and batches them, a
small thread pool runs ``adapter.prepare`` (image transforms, tokenising) on the next batches, and the
consumer gets them in record order; :func:`prepared_stream` runs the same in one forked reader process
(a PyTorch ``DataLoader`` worker) instead. An error while reading reaches the consumer after the batches
before it.
"""
from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from vlsae.errors import VlsaeError

from multimodal.pairs import ReadStats


def batched(records: Iterable[Any], size: int) -> Iterator[list[Any]]:
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


def prepared_stream(batches: Callable[[], Iterator[list[Any]]], prepare: Callable[[list[Any]], Any], workers: int,
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
