"""``vlsae filter``: score every pair, decide what to keep, write the kept records byte for byte.

DataComp's shape: scores are computed once into a table (key, score), the
keep decision is a separate cheap step over that table (a fraction or a
threshold), and the pool itself is never rewritten. Stages:

1. **Score** each input shard (:mod:`~multimodal.filtering.scoring`) into a
   score file of its own (:mod:`~multimodal.filtering.spill`), written
   atomically when the shard is done.
2. **Decide** over the score files: the k-th largest score for ``--keep``
   (exactly k kept, ties in input order), or ``--threshold``.
3. **Write** ``OUT/NNNNNN.tar`` (one per input shard, the kept records copied
   as bytes, in input order), ``OUT/scores.csv`` (key, score, kept),
   ``OUT/filter.json`` (scorer, model, SAE, counts, threshold, the input
   shards' SHA-256), ``OUT/scores/`` (the score files), and what the caller's
   ``finish`` adds (the report page).

Atomic output: everything is built in a hidden staging folder beside ``OUT``
(``.OUT.filter-partial``) and moved into place in one rename, so an
interrupted run leaves no partial shard in ``OUT``. **Resuming**: a rerun with
the same settings continues from the score files in the staging folder (each
trusted only while its shard's checksum matches); a rerun with other settings
discards them and starts clean, saying so. ``--overwrite`` of a finished
``OUT`` with the same settings reuses its ``OUT/scores/`` the same way, so a
new ``--keep`` is a cheap re-decision. **Splitting**: ``--shards i/n`` scores
only shards j with j % n == i into the staging folder and writes no output
(processes or machines sharing the folder); a run without it merges the
score files, scoring any shard still missing, and writes the output. Under
torchrun the processes split the shards the same way by themselves
(:mod:`multimodal.filtering.distributed`).

Memory does not grow with the dataset: one shard's keys at a time, scores on
disk, the keep threshold by a radix select over the files. Corrupt records
follow the read policy of :mod:`multimodal.pairs` (counted per shard, recorded
in the score files, checked against ``--max-skipped`` over all shards).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors import safe_open

from vlsae.config import to_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_json, check_writable_dir, read_safetensors, atomic_save_tensors, replace_dir

from multimodal.filtering.config import FilterConfig, check_config, parse_shards, resolve_hook
from multimodal.filtering.scorers import Scorer
from multimodal.filtering.scoring import Scoring, describe_sae
from multimodal.filtering.shards import copy_kept, sha256_file
from multimodal.filtering.spill import (KeepMask, ScoreStats, kth_largest_cut, read_metadata, read_shard_scores,
                                        score_file, score_stats, threshold_cut, write_scores)
from multimodal.pairs import ReadStats, ShardRead, expand_urls

STAGING_SUFFIX = ".filter-partial"
SCORES = "scores"
SETTINGS = "settings.json"
SCORER_STATE = "scorer_state.safetensors"
FILTER_JSON = "filter.json"


@dataclass
class FilterResult:
    """What a filter run gives: ``summary`` (filter.json), and for the report the score statistics,
    the extreme pairs as cards and, when the data carries ShapesWorld flags, (scores, clean, kept) arrays of
    the pairs that carry one (in memory: 10 bytes a pair, only with ``truth`` on)."""

    summary: dict[str, Any]
    out: Path | None
    stats: ScoreStats | None = None
    cards: list[dict[str, Any]] = field(default_factory=list)
    truth: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def complete(self) -> bool:
        """False for a ``--shards`` run, which only scored."""
        return self.out is not None


def staging_dir(out: Path) -> Path:
    """The hidden folder beside ``out`` where a run builds its output and keeps its score files."""
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def _settings(config: FilterConfig, scorer: type, hook: str, tokens: str, probe: list[str]) -> dict[str, Any]:
    """What the scores depend on (a change of any of these starts clean); JSON round-tripped."""
    settings: dict[str, Any] = {"scorer": config.scorer}
    if scorer.needs_model:
        settings.update(model=config.model, hook=hook, tokens=tokens)
    if scorer.needs_sae:
        settings.update(sae=describe_sae(config.sae), theta=config.theta)
    if scorer.needs_probe:
        settings.update(probe=probe, probe_pairs=config.probe_pairs)
    if not scorer.needs_model:
        settings.update(seed=config.seed)
    return json.loads(json.dumps(settings))


def _open_staging(staging: Path, out: Path, settings: dict[str, Any], reuse_out: bool, progress: bool) -> Path:
    """The staging folder's score folder, after discarding what other settings left there and copying
    in a finished ``out``'s score files when its settings are the same."""
    scores = staging / SCORES
    saved = staging / SETTINGS
    if staging.exists():
        try:
            same = json.loads(saved.read_text()) == settings
        except (OSError, ValueError):
            same = False
        if not same:
            if progress:
                print(f"vlsae filter: {staging} holds scores of other settings; discarding them and starting clean",
                      file=sys.stderr)
            shutil.rmtree(staging)
    scores.mkdir(parents=True, exist_ok=True)
    atomic_write_json(saved, settings)
    if reuse_out and (out / FILTER_JSON).is_file() and (out / SCORES).is_dir():
        try:
            previous = json.loads((out / FILTER_JSON).read_text()).get("settings")
        except (OSError, ValueError):
            previous = None
        if previous == settings:
            for path in sorted((out / SCORES).glob("*.safetensors")):
                if not (scores / path.name).exists():
                    shutil.copy2(path, scores / path.name)
            if (out / SCORER_STATE).is_file() and not (staging / SCORER_STATE).exists():
                shutil.copy2(out / SCORER_STATE, staging / SCORER_STATE)
    return scores


def _check_paths(config: FilterConfig, urls: list[str], out: Path, scoring_only: bool) -> None:
    check_writable_dir(out, flag="--out")
    check_writable_dir(staging_dir(out).parent, flag="--out")
    resolved = out.resolve()
    inside = [u for u in urls if "://" not in u and resolved in Path(u).resolve().parents]
    if inside:
        raise VlsaeError(f"--out {out} holds the input shard {inside[0]}; write the filtered dataset to another folder")
    if not scoring_only and out.exists() and any(out.iterdir()) and not config.overwrite:
        raise VlsaeError(f"{out} is not empty; choose another --out or pass --overwrite to replace it")


def _state_info(path: Path) -> dict[str, Any]:
    """The fit summary saved with a scorer state file ({} when there is none)."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as handle:
            return json.loads((handle.metadata() or {}).get("info", "{}"))
    except Exception:  # noqa: BLE001 - a damaged state is refitted
        return {}


def _fit(scoring: Scoring, staging: Path, probe: list[str]) -> dict[str, Any]:
    """The scorer's fitted state: read back from the staging folder, else fitted on the probe and saved."""
    path = staging / SCORER_STATE
    if path.is_file() and _state_info(path):
        scoring.scorer.load_state(read_safetensors(path, what="scorer state"))
        return _state_info(path)
    info = scoring.scorer.fit(scoring.probe_batches(probe), scoring.sae)
    atomic_save_tensors(scoring.scorer.state(), path, metadata={"info": json.dumps(info)})
    return info


def _score(config: FilterConfig, scorer_cls: type, hook: str, tokens: str, urls: list[str], todo: list[int],
           shas: dict[int, str], scores: Path, staging: Path, probe: list[str],
           scoring: Scoring | None = None) -> dict[str, Any]:
    """Score the shards ``todo`` into their score files (with ``scoring`` when it is built already); returns
    the timing and the scorer's fit summary."""
    if not todo:
        return {"pairs": 0, "seconds": 0.0, "fit": _state_info(staging / SCORER_STATE)}
    scoring = scoring or Scoring(config, scorer_cls(seed=config.seed), hook, tokens)
    fit = _fit(scoring, staging, probe) if scorer_cls.needs_probe else {}
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="pair", desc=f"score {config.scorer}", dynamic_ncols=True, disable=None, leave=False)
    started, pairs = time.perf_counter(), 0
    try:
        for index in todo:
            shard = scoring.score_shard(urls[index], shas.get(index) or sha256_file(urls[index]), bar)
            write_scores(score_file(scores, index), shard)
            pairs += len(shard.keys)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    return {"pairs": pairs, "seconds": round(seconds, 3), "forward_seconds": round(scoring.forward_seconds, 3),
            "pairs_per_second": round(pairs / seconds, 1) if seconds > 0 else None, "fit": fit}


def _read_stats(urls: list[str], files: list[Path], max_skipped: float) -> ReadStats:
    """The read policy over every shard, from the counts the score files recorded."""
    stats = ReadStats(urls, max_skipped=max_skipped)
    for url, path in zip(urls, files):
        meta = read_metadata(path)
        stats.shards[url] = ShardRead(**meta["read"])
    if stats.pairs == 0:
        raise VlsaeError(f"no readable image-caption pairs in {urls[0]}" +
                         (f" and {len(urls) - 1} more shards" if len(urls) > 1 else "") + "; check --data")
    stats.check()
    return stats


@dataclass
class FilterPlan:
    """What every stage of a filter run reads, resolved once from its config (no model, no scoring)."""

    config: FilterConfig
    scorer_cls: type[Scorer]
    urls: list[str]
    out: Path
    probe: list[str]
    hook: str
    tokens: str
    settings: dict[str, Any]
    staging: Path

    @property
    def scores(self) -> Path:
        """The staging folder's score files."""
        return self.staging / SCORES


def plan_filter(config: FilterConfig, scoring_only: bool | None = None) -> FilterPlan:
    """The checks of a run and its plan; ``scoring_only`` (default: whether ``--shards`` is given) skips the
    check of an existing output, which a run that only scores does not write."""
    scorer_cls = check_config(config)
    if scoring_only is None:
        scoring_only = parse_shards(config.shards) is not None
    out = Path(config.out)
    urls = expand_urls(config.data)
    _check_paths(config, urls, out, scoring_only)
    probe = expand_urls(config.probe) if (scorer_cls.needs_probe and config.probe) else urls
    hook, tokens = resolve_hook(config, scorer_cls)
    settings = _settings(config, scorer_cls, hook, tokens, probe)
    return FilterPlan(config, scorer_cls, urls, out, probe, hook, tokens, settings, staging_dir(out))


def open_staging(plan: FilterPlan) -> Path:
    """The staging folder made ready for ``plan`` (what other settings left there discarded); its score folder."""
    config = plan.config
    return _open_staging(plan.staging, plan.out, plan.settings, reuse_out=config.overwrite, progress=config.progress)


def shards_to_score(plan: FilterPlan, mine: list[int]) -> tuple[list[int], dict[int, str]]:
    """Of the shards ``mine``, those without a score file that matches the shard's checksum; the checksums known."""
    known = {i: read_metadata(score_file(plan.scores, i)) for i in mine}
    shas = {i: sha256_file(plan.urls[i]) for i in mine if known[i] is not None}  # a score file is trusted while they match
    return [i for i in mine if known[i] is None or known[i]["sha256"] != shas[i]], shas


def score_shards(plan: FilterPlan, todo: list[int], shas: dict[int, str], scoring: Scoring | None = None
                 ) -> dict[str, Any]:
    """Score the shards ``todo`` into the staging folder; the timing and the scorer's fit summary."""
    config = plan.config
    return _score(config, plan.scorer_cls, plan.hook, plan.tokens, plan.urls, todo, shas, plan.scores, plan.staging,
                  plan.probe, scoring)


def build_scoring(plan: FilterPlan) -> Scoring:
    """The plan's adapter, SAE and scorer, fitted when the scorer needs a probe (SAE-V's weights, saved into the
    staging folder, or read back from it when they are there)."""
    config = plan.config
    scoring = Scoring(config, plan.scorer_cls(seed=config.seed), plan.hook, plan.tokens)
    if plan.scorer_cls.needs_probe:
        _fit(scoring, plan.staging, plan.probe)
    return scoring


def filter_dataset(config: FilterConfig, finish: Callable[[Path, FilterResult], None] | None = None) -> FilterResult:
    """Run ``vlsae filter`` (see the module docstring). ``finish(folder, result)`` writes extra files (the
    report page) into the output folder before it is moved into place."""
    plan = plan_filter(config)
    split = parse_shards(config.shards)
    scores = open_staging(plan)
    mine = [i for i in range(len(plan.urls)) if split is None or i % split[1] == split[0]]
    todo, shas = shards_to_score(plan, mine)
    try:
        timing = score_shards(plan, todo, shas)
    except VlsaeError:
        if not any(scores.iterdir()):  # a user error before anything was scored leaves nothing behind
            shutil.rmtree(plan.staging, ignore_errors=True)
        raise
    if split is not None:
        summary = {"scorer": config.scorer, "scored_shards": todo, "reused_shards": [i for i in mine if i not in todo],
                   "staging": str(plan.staging), "timing": timing}
        return FilterResult(summary=summary, out=None)
    return decide_and_write(plan, {**timing, "reused_shards": len(mine) - len(todo)}, finish)


def decide_and_write(plan: FilterPlan, timing: dict[str, Any],
                     finish: Callable[[Path, FilterResult], None] | None = None) -> FilterResult:
    """The keep decision over every score file of the staging folder, and the output moved into place.

    ``timing``: the scoring's (pairs, seconds, ..., ``fit``: the scorer's fit summary, ``reused_shards``)."""
    config, urls, staging, settings = plan.config, plan.urls, plan.staging, plan.settings
    out = plan.out
    timing = dict(timing)
    files = [score_file(plan.scores, i) for i in range(len(urls))]
    stats = _read_stats(urls, files, config.max_skipped)
    warning = stats.warning()
    if warning and config.progress:
        print(warning, file=sys.stderr)
    n = stats.pairs
    cut = kth_largest_cut(files, max(1, round(config.keep * n))) if config.keep is not None \
        else threshold_cut(files, config.threshold)
    summary_stats = score_stats(files, extremes=config.extremes)
    result = _write(config, urls, files, staging, cut, summary_stats)
    result.summary.update({
        "scorer": config.scorer, "model": settings.get("model"), "sae": settings.get("sae"), "hook": settings.get("hook"),
        "tokens": settings.get("tokens"), "theta": settings.get("theta"), "seed": settings.get("seed"),
        "keep": config.keep, "threshold": cut.threshold, "threshold_given": config.threshold,
        "ties_kept": cut.ties_kept, "score": summary_stats.as_dict(), "lost": stats.summary(),
        "scorer_fit": timing.pop("fit", {}), "timing": timing,
        "settings": settings, "config": to_dict(config)})
    result.summary["counts"].update(lost=stats.lost)
    folder = staging / "result"
    atomic_write_json(folder / FILTER_JSON, result.summary)
    if finish is not None:
        finish(folder, result)
    replace_dir(folder, out)
    shutil.rmtree(staging, ignore_errors=True)
    result.out = out
    result.summary["out"] = str(out)
    return result


def _write(config: FilterConfig, urls: list[str], files: list[Path], staging: Path, cut: Any,
           stats: ScoreStats) -> FilterResult:
    """The output folder in the staging area: kept shards, scores.csv, the score files, the cards."""
    folder = staging / "result"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / SCORES).mkdir(parents=True)
    extremes: dict[int, list[tuple[str, float, int]]] = {}
    for kind, rows in (("highest", stats.highest), ("lowest", stats.lowest)):
        for score, shard, position in rows:
            extremes.setdefault(shard, []).append((kind, score, position))
    mask = KeepMask(cut)
    cards: list[dict[str, Any]] = []
    truth_scores: list[np.ndarray] = []
    truth_clean: list[np.ndarray] = []
    truth_kept: list[np.ndarray] = []
    shards, kept_total = [], 0
    with open(folder / "scores.csv", "w", encoding="utf-8", newline="") as table:
        table.write("key,score,kept\n")
        for index, (url, path) in enumerate(zip(urls, files)):
            shard = read_shard_scores(path)
            flags = mask(shard.scores)
            kept = {key for key, flag in zip(shard.keys, flags) if flag}
            wanted = [(shard.keys[p], kind, score) for kind, score, p in extremes.get(index, [])]
            copied = copy_kept(url, folder / f"{index:06d}.tar", kept.__contains__, {w[0] for w in wanted},
                               truth=config.truth)
            for key, score, flag in zip(shard.keys, shard.scores, flags):
                table.write(f"{_csv_key(key)},{score:.9g},{int(flag)}\n")
            for key, kind, score in wanted:
                card = copied.cards.get(key, {"caption": "", "image": None, "ext": None})
                cards.append({"kind": kind, "key": key, "score": float(score), "kept": key in kept, "shard": index,
                              "clean": copied.clean.get(key), **card})
            if copied.clean:
                has = np.array([k in copied.clean for k in shard.keys], dtype=bool)
                truth_scores.append(shard.scores[has])
                truth_kept.append(flags[has])
                truth_clean.append(np.array([copied.clean[k] for k, h in zip(shard.keys, has) if h], dtype=bool))
            shards.append({"input": url, "sha256": shard.sha256, "output": f"{index:06d}.tar", "pairs": len(shard.keys),
                           "kept": int(flags.sum()), "copied": copied.kept, "read": shard.read})
            kept_total += int(flags.sum())
            shutil.copy2(path, folder / SCORES / path.name)  # the staging copy stays until the output is in place
    if (staging / SCORER_STATE).is_file():
        shutil.copy2(staging / SCORER_STATE, folder / SCORER_STATE)
    order = {"highest": 0, "lowest": 1}
    ranked = sorted(cards, key=lambda c: (order[c["kind"]], -c["score"] if c["kind"] == "highest" else c["score"]))
    truth = (np.concatenate(truth_scores), np.concatenate(truth_clean), np.concatenate(truth_kept)) if truth_scores \
        else None
    missing = sum(s["kept"] - s["copied"] for s in shards)
    summary = {"counts": {"shards": len(urls), "pairs_scored": stats.n, "kept": kept_total,
                          "dropped": stats.n - kept_total, "kept_fraction": kept_total / stats.n if stats.n else 0.0,
                          "kept_not_copied": missing},
               "shards": shards}
    return FilterResult(summary=summary, out=None, stats=stats, cards=ranked, truth=truth)


def _csv_key(key: str) -> str:
    """A key as one CSV field (quoted when it holds a comma, a quote or a line break)."""
    if any(c in key for c in ',"\n\r'):
        return '"' + key.replace('"', '""') + '"'
    return key
