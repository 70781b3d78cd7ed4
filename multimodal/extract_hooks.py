"""One extraction pass, several hooks: ``vlsae extract --hook visual.blocks.3,visual.blocks.6,final``.

The model's forward is the costly part of extraction, and one forward reaches every layer: the
adapters give all the hooks of a batch from one pass (:meth:`~multimodal.adapters.base.Adapter.forward_hooks`:
open_clip one pass per tower, LLaVA one forward of the model, as sparsify trains an SAE per layer from
one pass). The output is one ordinary activation cache per hook:

    OUT/hooks.json                    # the hooks, their cache folders, the model and data
    OUT/visual.blocks.3/manifest.json # a cache as `vlsae extract --hook visual.blocks.3` writes it
    OUT/visual.blocks.6/...
    OUT/final/...

and ``vlsae train --acts OUT`` trains one SAE per hook (``OUT_RUN/<hook>/``, one table at the end).

Which hooks a ``--hook`` value names (:func:`split_hooks`): a comma list whose points each yield
other modalities (``visual.blocks.3,text.blocks.3``) is one hook with a point per modality, as
always; a list that names a modality twice (``visual.blocks.3,visual.blocks.6``) is one hook per
point. ``--hook`` may also be given several times, one hook each. A hook's folder is its name with
``+`` for ``,``.

Resuming: every cache resumes from its own finished shards (the stream restarts at the earliest
missing pair); ``hooks.json`` is written before the first batch (``complete: false``) and again at
the end, and a re-run must name the same hooks. A run that fails before any cache has a shard
leaves ``OUT`` as it was.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_json

from multimodal.adapters import Adapter, create_adapter
from multimodal.adapters.base import dtype_name
from multimodal.cache_format import MANIFEST
from multimodal.extract import ExtractConfig, ExtractResult, check_extract_config, open_writer, run_writers
from multimodal.pairs import PairReader, expand_urls

HOOKS_JSON = "hooks.json"


def split_hooks(adapter: Adapter, values: str | Sequence[str]) -> list[str]:
    """The hooks that ``--hook`` values name (see the module docstring), each checked, none twice."""
    hooks: list[str] = []
    for value in [values] if isinstance(values, str) else list(values):
        points = [p.strip() for p in str(value).split(",") if p.strip()]
        if not points:
            raise VlsaeError(f"empty --hook; {adapter._hook_hint()}")
        for point in points:
            adapter.parse_hook(point)  # an unknown point is named alone
        modalities = [m for p in points for m in adapter.hook_modalities(p)]
        if len(set(modalities)) == len(modalities):
            hooks.append(",".join(points))
        else:
            hooks.extend(points)
    seen: set[str] = set()
    for hook in hooks:
        if hook in seen:
            raise VlsaeError(f"--hook names {hook} twice; give each hook once")
        seen.add(hook)
    return hooks


def hook_folder(hook: str) -> str:
    """The cache folder of ``hook`` inside a multi-hook output."""
    return hook.replace(",", "+")


def is_multi_hook(out: str | Path) -> bool:
    """Whether ``out`` is a multi-hook extraction (finished or not)."""
    return (Path(out) / HOOKS_JSON).is_file()


@dataclass
class HookCache:
    hook: str
    path: Path


def read_record(path: Path) -> dict[str, Any]:
    """``hooks.json``, or a one-line error when it does not parse."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VlsaeError(f"cannot read {path} ({exc}); re-run the extraction with --overwrite") from None
    if not isinstance(record, dict) or not isinstance(record.get("hooks"), list):
        raise VlsaeError(f"{path} lists no hooks; re-run the extraction with --overwrite")
    return record


def hook_caches(out: str | Path) -> list[HookCache]:
    """The caches of a finished multi-hook extraction, in ``--hook`` order; a one-line error otherwise."""
    record = read_record(Path(out) / HOOKS_JSON)
    if not record.get("complete"):
        raise VlsaeError(f"{out} is an unfinished multi-hook extraction; re-run its vlsae extract to finish it")
    return [HookCache(entry["hook"], Path(out) / entry["cache"]) for entry in record["hooks"]]


def _check_out(out: Path, hooks: list[str], overwrite: bool) -> None:
    if out.is_file():
        raise VlsaeError(f"--out {out} is a file; pass a folder")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if (out / MANIFEST).is_file():
        raise VlsaeError(f"--out {out} holds a one-hook activation cache; pick a new folder for several hooks")
    if not is_multi_hook(out):
        raise VlsaeError(f"--out {out} is a non-empty folder that is not an activation cache; pick a new folder")
    record = read_record(out / HOOKS_JSON)
    held = [entry["hook"] for entry in record.get("hooks", [])]
    if overwrite:
        return
    if record.get("complete"):
        raise VlsaeError(f"{out} already holds a finished extraction of {', '.join(held)}; pass --overwrite to redo "
                         "it or choose another --out")
    if held != hooks:
        raise VlsaeError(f"{out} holds an unfinished extraction of --hook {', '.join(held)}; re-run with the same "
                         "hooks to resume it, or pass --overwrite")


def extract_hooks(config: ExtractConfig, hooks: list[str], adapter: Adapter | None = None) -> dict[str, ExtractResult]:
    """``vlsae extract`` with several hooks: one pass over the data into one cache per hook; hook -> result."""
    check_extract_config(config)
    out = Path(config.out)
    _check_out(out, hooks, config.overwrite)
    urls = expand_urls(config.data)
    if adapter is None:
        adapter = create_adapter(config.model, device=config.device, dtype=config.dtype)
    tokens = adapter.check_tokens(config.tokens)
    info = {"batch_size": config.batch_size, "device": str(adapter.device), "compute_dtype": dtype_name(adapter.dtype),
            "extracted_with": list(hooks)}
    writers = {hook: open_writer(adapter, out / hook_folder(hook), hook, tokens, config.shard_rows, config.overwrite,
                                 config.data, info) for hook in hooks}
    needs_image = any("image" in adapter.parse_hook(h) for h in hooks)
    reader = PairReader(urls, require_image=needs_image, max_skipped=config.max_skipped)
    existed = out.is_dir()
    record = {"hooks": [{"hook": h, "cache": hook_folder(h)} for h in hooks], "model": adapter.spec,
              "data": config.data, "tokens": tokens, "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / HOOKS_JSON, record)
    try:
        results = run_writers(adapter, reader, writers, tokens, config.batch_size, config.limit, config.workers,
                              config.progress, config.data, config.reader_process, reader.stats)
    except BaseException:
        if not any((out / hook_folder(h)).exists() for h in hooks):  # nothing written: leave OUT as it was
            (out / HOOKS_JSON).unlink(missing_ok=True)
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
        raise
    for folder in out.iterdir():  # a replaced extraction's caches of hooks no longer asked for
        if folder.is_dir() and (folder / MANIFEST).is_file() and folder.name not in {hook_folder(h) for h in hooks}:
            shutil.rmtree(folder)
    atomic_write_json(out / HOOKS_JSON, {**record, "complete": True,
                                         "n_pairs": next(iter(results.values())).n_pairs})
    return results


def summary_rows(results: dict[str, ExtractResult]) -> list[dict[str, Any]]:
    """One row per hook: its cache, pairs, rows and width per modality."""
    return [{"hook": hook, "cache": str(r.path), "pairs": r.n_pairs, "rows": r.rows, "width": r.width}
            for hook, r in results.items()]
