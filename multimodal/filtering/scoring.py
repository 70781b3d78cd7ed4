"""Scoring shards: pairs -> model adapter -> (SAE codes) -> one score per pair.

A :class:`Scoring` holds what scoring needs, built and checked once: the
adapter at its hook point, the SAE (its width checked against the hook's),
and the scorer, fitted on probe pairs when it needs them (SAE-V's weights).
Batches are read and prepared (decoding, transforms, tokenising) in a
background thread one batch ahead of the forward pass. Each shard is read on
its own under the read policy's counting, so its scores can be spilled and
its losses recorded the moment it is done.
"""
from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from vlsae.alignment import AlignedSAE
from vlsae.checkpoint import WEIGHTS, load_sae, read_config
from vlsae.errors import VlsaeError

from multimodal.adapters import create_adapter
from multimodal.filtering.config import FilterConfig
from multimodal.filtering.scorers import PairBatch, Scorer
from multimodal.filtering.shards import sha256_file
from multimodal.filtering.spill import ShardScores
from multimodal.pairs import PairReader, PairRecord


def prefetched(records: Iterable[PairRecord], batch_size: int,
               prepare: Callable[[list[PairRecord]], Any]) -> Iterator[tuple[list[PairRecord], Any]]:
    """(records, prepared) batches in order; reading and preparing batch i+1 overlaps the caller's work on batch i."""
    iterator = iter(records)

    def next_batch() -> tuple[list[PairRecord], Any] | None:
        chunk = list(itertools.islice(iterator, batch_size))
        return (chunk, prepare(chunk)) if chunk else None

    with ThreadPoolExecutor(1, thread_name_prefix="vlsae-filter-read") as pool:
        pending = pool.submit(next_batch)
        while True:
            item = pending.result()
            if item is None:
                return
            pending = pool.submit(next_batch)
            yield item


def check_widths(sae: Any, widths: dict[str, int], model: str, hook: str) -> None:
    """One line, not a shape error deep in the encoder, when the hook's rows do not fit the SAE."""
    expected = dict(sae.projector.config.widths) if isinstance(sae, AlignedSAE) else {m: int(sae.config.d_in) for m in widths}
    for modality, width in widths.items():
        if modality in expected and width != expected[modality]:
            raise VlsaeError(f"the SAE takes width {expected[modality]} but {model} at hook '{hook}' gives {modality} rows "
                             f"of width {width}; pass the --model and --hook the SAE was trained on")


class Scoring:
    """The adapter, SAE and scorer of one filter run (see the module docstring)."""

    def __init__(self, config: FilterConfig, scorer: Scorer, hook: str, tokens: str):
        self.config, self.scorer, self.hook, self.tokens = config, scorer, hook, tokens
        self.adapter = None
        self.sae = None
        self.modalities: list[str] = []
        if type(scorer).needs_model:
            self.adapter = create_adapter(config.model, device=config.device)
            points = self.adapter.parse_hook(hook)
            self.adapter.check_tokens(tokens)
            self.modalities = [m for m in self.adapter.modalities if m in points]
            if set(self.modalities) != {"image", "text"}:
                raise VlsaeError(f"scorer '{config.scorer}' compares a pair's image with its caption, but hook '{hook}' "
                                 f"of {config.model} gives {', '.join(self.modalities)} only; use a hook with both")
        if type(scorer).needs_sae:
            self.sae = load_sae(config.sae, device=self.adapter.device if self.adapter else "cpu").eval()
            check_widths(self.sae, self.adapter.widths(hook), config.model, hook)
        self.forward_seconds = 0.0

    @property
    def needs_images(self) -> bool:
        return "image" in self.modalities

    def prepare(self, records: list[PairRecord]) -> Any:
        return self.adapter.prepare(records, modalities=self.modalities) if self.adapter is not None else None

    def batch(self, records: list[PairRecord], prepared: Any) -> PairBatch:
        """The scorer's view of one batch: activations at the hook, the SAE, theta."""
        keys = [r.key for r in records]
        if self.adapter is None:
            return PairBatch(keys=keys, theta=self.config.theta)
        tick = time.perf_counter()
        extracted = self.adapter.forward(prepared, self.hook, self.tokens)
        self.forward_seconds += time.perf_counter() - tick
        device = self.adapter.device
        return PairBatch(keys=keys, acts={m: t.to(device) for m, t in extracted.acts.items()},
                         pair_index={m: t.to(device) for m, t in extracted.pair_index.items()}, sae=self.sae,
                         theta=self.config.theta)

    def batches(self, records: Iterable[PairRecord]) -> Iterator[PairBatch]:
        for chunk, prepared in prefetched(records, self.config.batch_size, self.prepare):
            yield self.batch(chunk, prepared)

    def probe_batches(self, urls: list[str]) -> Callable[[], Iterator[PairBatch]]:
        """The probe's batches, as often as the scorer asks (the first ``probe_pairs`` pairs of ``urls``)."""
        def batches() -> Iterator[PairBatch]:
            reader = PairReader(urls, warn=False, require_image=self.needs_images)
            yield from self.batches(itertools.islice(reader, self.config.probe_pairs))
        return batches

    def score_shard(self, url: str, sha256: str, bar: Any = None) -> ShardScores:
        """Every readable pair of one shard, scored; undecodable records and cuts are counted, not scored."""
        reader = PairReader([url], warn=False, require_image=self.needs_images)
        keys: list[str] = []
        scores: list[np.ndarray] = []
        try:
            for batch in self.batches(reader):
                with torch.no_grad():
                    values = self.scorer.score(batch)
                keys.extend(batch.keys)
                scores.append(values.detach().to("cpu", torch.float64).numpy())
                if bar is not None:
                    bar.update(len(batch))
        except VlsaeError:
            if reader.stats.pairs:
                raise
            # nothing in this shard was readable: its counts say so, the policy over all shards decides
        read = asdict(reader.stats.shard(url))
        return ShardScores(url=url, sha256=sha256, keys=keys,
                           scores=np.concatenate(scores) if scores else np.zeros(0), read=read)


def describe_sae(path: str) -> dict[str, Any]:
    """What filter.json records about the SAE: its folder, architecture, widths and weights checksum."""
    record = read_config(Path(path))
    if not (Path(path) / WEIGHTS).is_file():
        raise VlsaeError(f"{path} has {Path(path) / 'config.json'} but no {WEIGHTS}; pass a finished SAE run folder")
    config = record["config"]
    return {"path": str(Path(path).resolve()), "arch": record["arch"], "d_in": config.get("d_in"),
            "n_latents": config.get("n_latents"), "hook": config.get("hook", ""),
            "sha256": sha256_file(Path(path) / WEIGHTS)}
