"""Extraction split over processes: ``torchrun --nproc-per-node N -m vlsae extract ...``.

:func:`extract_distributed` is :func:`multimodal.extract.extract` for one process
(WORLD_SIZE unset or 1, ``--out`` not a split cache: it calls it, nothing changes)
and, under torchrun, splits the work by data shard:

- **The split**: rank ``r`` of ``N`` (torchrun's RANK and WORLD_SIZE) takes the
  data shards ``r, r + N, r + 2N, ...`` of the expanded shard list, as
  webdataset's ``split_by_node`` does. Each data shard is one *part*.
- **Parts**: data shard ``i`` is extracted by :func:`~multimodal.extract.extract_pairs`
  into its own cache ``OUT/parts/00000i/`` (manifest and shards, written the usual
  way: atomic per shard, resumable), so no two ranks write the same file and a
  cache shard never spans two data shards. A data shard with no readable pair has
  no part folder.
- **The manifest**: when every rank is done, the ranks exchange what they did (an
  all-gather of each rank's part list through the key-value store of torchrun's
  rendezvous, :class:`multimodal.ranks.Exchange`; it is also the barrier), and rank 0 writes
  ``OUT/manifest.json`` once: the parts' shards in
  data-shard order (files ``parts/00000i/shard-....safetensors``), counts and
  statistics over all of them. The cache then reads like a single-process one of
  the same shards: the same pairs, keys and order. Until that manifest is written
  the folder holds no ``manifest.json`` and does not read as a cache. The other
  ranks return once it is written.
- **The read policy** (:class:`multimodal.pairs.ReadStats`, ``--max-skipped``):
  every part's per-shard counts are gathered and merged into one ``ReadStats`` of
  the whole shard list, so the lost fraction, the size estimates of cut shards and
  the manifest's ``skipped`` are those of a single-process read; every rank
  applies the check to the same counts, so all fail together, before the manifest
  is written (the parts stay: re-running with a larger ``--max-skipped`` only merges).
- **Resuming**: re-running the same command continues every unfinished part from
  its finished shards and skips finished parts (their settings are checked), under
  any number of processes, including one: a folder with ``parts/`` is resumed (or,
  with ``--overwrite``, replaced) in this layout even without torchrun.
- **Errors**: a one-line error on any rank reaches every rank (rank 0 prints it
  under the CLI), naming the rank; the parts finished so far stay for a re-run.

``--overwrite`` of a split cache removes its ``manifest.json`` at the start (its
parts are rewritten in place, so it must stop reading as complete); a
single-process cache being replaced keeps reading until the new manifest replaces
its own, and its shard files go then. ``--limit`` does not split (the pairs before
a rank's shards are unknown to it) and is refused. ``--out`` must be one folder
every rank sees (a shared filesystem across nodes).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from vlsae.devices import resolve_device
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_json

from multimodal.adapters import Adapter, create_adapter
from multimodal.adapters.base import dtype_name
from multimodal.cache_format import MANIFEST, read_manifest
from multimodal.cache_writer import cache_statistics
from multimodal.extract import ExtractConfig, ExtractResult, check_extract_config, extract, extract_pairs
from multimodal.pairs import PairReader, ReadStats, ShardRead, expand_urls
from multimodal.ranks import TIMEOUT, Exchange, Ranks, on_every_rank

__all__ = ["PARTS", "TIMEOUT", "Exchange", "Ranks", "extract_distributed", "is_split_cache", "merge_manifest",
           "merge_reads", "part_name", "rank_device"]

PARTS = "parts"


def part_name(index: int) -> str:
    """The folder of data shard ``index`` under ``OUT/parts``."""
    return f"{index:06d}"


def is_split_cache(out: str | Path) -> bool:
    """Whether ``out`` holds a cache (finished or not) written in parts."""
    return (Path(out) / PARTS).is_dir()


def extract_distributed(config: ExtractConfig, adapter: Adapter | None = None,
                        ranks: Ranks | None = None) -> ExtractResult:
    """``vlsae extract`` in one process or split over torchrun's processes (see the module docstring).

    Every rank calls it with the same ``config``; every rank returns the same
    counts (``n_pairs``, ``rows``, ``resumed_from``, the merged manifest) once the
    manifest is written. ``adapter`` (already built) is used as it is, on every rank.
    """
    ranks = ranks or Ranks.from_env()
    if ranks.world <= 1 and not (config.out and is_split_cache(config.out)):
        return extract(config, adapter)
    return _Split(config, ranks).run(adapter)


def rank_device(name: str, ranks: Ranks) -> str:
    """The device of a rank: ``name`` resolved, and ``cuda:LOCAL_RANK`` for a CUDA run over several processes."""
    device = resolve_device(name)
    if ranks.world <= 1 or device.type != "cuda":
        return str(device)
    if device.index is not None:
        raise VlsaeError(f"--device {name} names one GPU, but under torchrun each process uses cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto)")
    return f"cuda:{ranks.local_rank}"


def _identity(adapter: Adapter, hook: str, tokens: str, url: str, shard_rows: int) -> dict[str, Any]:
    """What a part's manifest must agree with to be reused (the writer's identity of that part)."""
    points = adapter.parse_hook(hook)
    modalities = [m for m in adapter.modalities if m in points]
    return json.loads(json.dumps({"source": adapter.spec, "hook": hook, "tokens": adapter.check_tokens(tokens),
                                  "data": url, "modalities": modalities, "width": adapter.widths(hook),
                                  "dtype": dtype_name(adapter.dtype), "shard_rows": int(shard_rows)}))


def _read_of(manifest: dict[str, Any], url: str) -> ShardRead:
    """The counts of a finished part's data shard, from its manifest's ``skipped`` (one shard read to its end)."""
    skipped = manifest.get("skipped") or {}
    loss = (skipped.get("by_shard") or {}).get(url, {})
    return ShardRead(pairs=int(skipped.get("read", manifest.get("n_pairs", 0))), failed=int(loss.get("failed", 0)),
                     finished=True, error=loss.get("error") or "")


def merge_reads(urls: list[str], parts: list[dict[str, Any]], max_skipped: float | None) -> ReadStats:
    """One :class:`ReadStats` of the whole shard list from the parts' per-shard counts (in data-shard order)."""
    stats = ReadStats(list(urls), max_skipped=max_skipped)
    for part in sorted(parts, key=lambda p: p["index"]):
        read, merged = ShardRead(**part["read"]), stats.shard(part["url"])
        # a shard listed twice is read twice, as one reader of the whole list would count it
        merged.pairs += read.pairs
        merged.failed += read.failed
        merged.finished = read.finished
        merged.error = merged.error or read.error
    return stats


def merge_manifest(out: Path, parts: list[dict[str, Any]], data: str, reads: ReadStats, world: int) -> dict[str, Any]:
    """The manifest of the whole cache: the parts' shards in data-shard order, counts, statistics, ``skipped``."""
    listed = [p for p in sorted(parts, key=lambda p: p["index"]) if p["manifest"] is not None]
    base = listed[0]["manifest"]
    entries: list[dict[str, Any]] = []
    first = 0
    for part in listed:
        for entry in part["manifest"]["shards"]:
            entries.append({**entry, "file": f"{PARTS}/{part_name(part['index'])}/{entry['file']}", "first_pair": first})
            first += entry["pairs"]
    modalities = list(base["modalities"])
    rows = {m: sum(e["rows"][m] for e in entries) for m in modalities}
    n_pairs = sum(e["pairs"] for e in entries)
    record = {**base, "complete": True, "data": data, "skipped": reads.summary(), "n_pairs": n_pairs, "rows": rows,
              "paired": bool(n_pairs) and all(rows[m] == n_pairs for m in modalities), "shards": entries,
              "ranks": world, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "stats": cache_statistics(out, entries, modalities)}
    return record


def _slim(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """A part's manifest without what the merge recomputes (statistics, its own ``skipped``): less to send."""
    return None if manifest is None else {k: v for k, v in manifest.items() if k not in ("stats", "skipped")}


class _Split:
    """One rank's share of a split extraction (see the module docstring)."""

    def __init__(self, config: ExtractConfig, ranks: Ranks):
        self.config = config
        self.ranks = ranks
        self.out = Path(config.out) if config.out else Path()

    def _check(self) -> list[str]:
        """The cheap checks of :func:`extract` plus those of the split layout; the same on every rank."""
        config = self.config
        check_extract_config(config)
        if config.limit is not None:
            raise VlsaeError(f"--limit does not split over {self.ranks.world} processes (a process does not know "
                             "how many pairs the shards before its own hold); drop it, or run as one process on a new "
                             "--out")
        out = self.out
        if (out / MANIFEST).is_file():
            record = read_manifest(out)
            if record.get("complete") and not config.overwrite:
                raise VlsaeError(f"activation cache {out} is already complete ({record.get('n_pairs')} pairs); "
                                 f"pass --overwrite to redo it or choose another --out")
            if not record.get("complete") and record.get("shards") and not config.overwrite:
                raise VlsaeError(f"{out} holds an unfinished single-process extraction; finish it as one process "
                                 f"(without torchrun), or pass --overwrite")
        elif out.is_dir() and any(out.iterdir()) and not is_split_cache(out):
            raise VlsaeError(f"--out {out} is a non-empty folder that is not an activation cache; pick a new folder")
        return expand_urls(config.data)

    def run(self, adapter: Adapter | None) -> ExtractResult:
        config, ranks, out = self.config, self.ranks, self.out
        urls = self._check()
        exchange = Exchange(ranks)
        # every rank looks at --out before any writes to it: a decision taken on what a rank sees must not
        # depend on how far the others have got (a slow rank seeing a fast one's new parts/ would make one
        # exchange more than the others); rank 0's view decides
        was_split = self._exchange(exchange, lambda: is_split_cache(out))[0]
        if config.overwrite and was_split and ranks.is_main:  # its parts are about to be rewritten in place
            (out / MANIFEST).unlink(missing_ok=True)
        mine = ranks.shards(len(urls))

        def work() -> list[dict[str, Any]]:
            model = adapter
            if model is None and mine:  # a rank without shards (more ranks than shards) loads no model
                model = create_adapter(config.model, device=rank_device(config.device, ranks), dtype=config.dtype)
            return [self._part(model, i, urls[i]) for i in mine]

        by_rank = self._exchange(exchange, work)
        parts = [p for done in by_rank for p in done]
        merging = time.perf_counter()
        reads = merge_reads(urls, parts, config.max_skipped)
        if reads.pairs == 0:
            raise VlsaeError(f"no readable image-caption pairs in {urls[0]}"
                             + (f" and {len(urls) - 1} more shards" if len(urls) > 1 else ""))
        try:
            reads.check()
        except VlsaeError as exc:
            raise VlsaeError(f"{exc} (the {reads.pairs} pairs extracted stay in {out / PARTS}: the re-run only "
                             f"merges them)") from None
        warning = reads.warning()
        if warning and ranks.is_main:
            print(warning, file=sys.stderr)

        def finish() -> None:
            if ranks.is_main:
                manifest = merge_manifest(out, parts, config.data, reads, ranks.world)
                atomic_write_json(out / MANIFEST, manifest, indent=1)
                self._tidy(manifest)

        self._exchange(exchange, finish)  # the other ranks return once the manifest is written
        manifest = read_manifest(out)
        exchange.gather(None)  # and rank 0 (the store's host outside torchrun) once they have read it
        # the time of the slowest rank's extraction (as in one process, the model's loading is not counted)
        seconds = max(sum(p["seconds"] for p in done) for done in by_rank) + time.perf_counter() - merging
        return ExtractResult(path=out, n_pairs=manifest["n_pairs"], rows=manifest["rows"], width=manifest["width"],
                             resumed_from=sum(p["resumed_from"] for p in parts), seconds=seconds,
                             forward_seconds=sum(p["forward_seconds"] for p in parts),
                             batches=sum(p["batches"] for p in parts), manifest=manifest)

    def _part(self, adapter: Adapter, index: int, url: str) -> dict[str, Any]:
        """Extract data shard ``index`` into its part folder (or reuse the finished part); what it holds."""
        config = self.config
        folder = self.out / PARTS / part_name(index)
        record = {"index": index, "url": url, "seconds": 0.0, "forward_seconds": 0.0, "batches": 0}
        existing = read_manifest(folder) if (folder / MANIFEST).is_file() else None
        if existing is not None and existing.get("complete") and not config.overwrite:
            mine = _identity(adapter, config.hook, config.tokens, url, config.shard_rows)
            theirs = {k: existing.get(k) for k in mine}
            if theirs != mine:
                diff = next(k for k in mine if theirs.get(k) != mine[k])
                raise VlsaeError(f"{folder} holds a part extracted with a different '{diff}'; re-run with the same "
                                 f"settings to resume, or pass --overwrite")
            return {**record, "read": asdict(_read_of(existing, url)), "manifest": _slim(existing),
                    "resumed_from": existing["n_pairs"]}
        reader = PairReader([url], warn=False, require_image="image" in adapter.parse_hook(config.hook))
        try:
            result = extract_pairs(adapter, reader.shard_records(url), folder, hook=config.hook, tokens=config.tokens,
                                   batch_size=config.batch_size, shard_rows=config.shard_rows,
                                   overwrite=config.overwrite, workers=config.workers,
                                   progress=config.progress and self.ranks.is_main,
                                   reader_process=config.reader_process, reads=reader.stats, data=url,
                                   info={"batch_size": config.batch_size, "device": str(adapter.device),
                                         "compute_dtype": dtype_name(adapter.dtype)})
        except VlsaeError:
            read = reader.stats.shards.get(url)
            held = existing is not None and existing.get("shards") and not config.overwrite
            if read is None or not read.finished or read.pairs or held:
                raise
            return {**record, "read": asdict(read), "manifest": None, "resumed_from": 0}  # no readable pair in it
        return {**record, "read": asdict(reader.stats.shard(url)), "manifest": _slim(result.manifest),
                "resumed_from": result.resumed_from, "seconds": result.seconds,
                "forward_seconds": result.forward_seconds, "batches": result.batches}

    def _exchange(self, exchange: Exchange, work: Callable[[], Any]) -> list[Any]:
        """Run ``work`` on every rank and gather the results (in rank order); an error on any rank is raised on all."""
        return on_every_rank(exchange, self.ranks.world, work)

    def _tidy(self, manifest: dict[str, Any]) -> None:
        """Remove what the manifest does not list: the parts of a replaced split cache beyond the new ones,
        a replaced single-process cache's shards, temporaries of interrupted writes."""
        listed = {Path(e["file"]).parts[1] for e in manifest["shards"] if Path(e["file"]).parts[0] == PARTS}
        for folder in (self.out / PARTS).iterdir():
            if folder.is_dir() and folder.name.isdigit() and folder.name not in listed:
                shutil.rmtree(folder)
        files = {e["file"] for e in manifest["shards"]}
        for file in self.out.iterdir():
            name = file.name
            stale_shard = name.startswith("shard-") and name.endswith(".safetensors") and name not in files
            if file.is_file() and (stale_shard or name.startswith((".shard-", f".{MANIFEST}"))):
                file.unlink()
