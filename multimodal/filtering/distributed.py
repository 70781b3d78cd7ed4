"""``vlsae filter`` split over processes: ``torchrun --nproc-per-node N -m vlsae filter ...``.

:func:`filter_distributed` is :func:`~multimodal.filtering.filter_dataset` in one
process (WORLD_SIZE unset or 1: it calls it, nothing changes) and, under
torchrun, the same run in three stages, the ranks meeting between them through
the key-value store of torchrun's rendezvous (:class:`multimodal.ranks.Exchange`;
no gloo collective):

1. **Rank 0 prepares** while the others make the same checks: those of a whole run (the
   output folder included), the staging folder opened (what other settings left
   there discarded, a finished output's scores copied in for reuse), the shards
   still to score (every shard's checksum against its score file), and, when
   there are any, the model and the SAE loaded and checked and the scorer fitted
   (SAE-V's cross-modal weights, written once as the staging folder's scorer
   state, which the other ranks then read instead of racing to write it).
2. **Every rank scores** its share of those shards, ``j % N == rank`` (what
   ``--shards rank/N`` scores), into the shared staging folder: one score file per
   shard, so no two ranks write the same file. A rank with no shard left loads no
   model.
3. **Rank 0 decides and writes** over every score file (the read policy checked
   over all shards, the keep cut, the byte-identical shards, ``scores.csv``,
   ``filter.json``, the caller's report page), the others waiting; its summary
   comes back on every rank. The timing in ``filter.json`` is the ranks' scoring
   together (pairs summed, seconds of the slowest rank, ``processes``: N).

Every score depends on its pair and the scorer's state alone, so the output is
that of one process over the same shards, byte for byte. An error on any rank
(a one-line error or a bug) is raised on every rank, naming the rank; the score
files written so far stay in the staging folder, and a rerun, under any number
of processes, scores only what is missing. ``--shards`` (a split by hand across
machines) does not combine with torchrun's split and is refused. The staging
folder must be one every rank sees (a shared filesystem across nodes).
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from vlsae.errors import VlsaeError

from multimodal.extract_distributed import rank_device
from multimodal.filtering.config import FilterConfig, check_config
from multimodal.filtering.run import (FilterPlan, FilterResult, build_scoring, decide_and_write, filter_dataset,
                                      open_staging, plan_filter, score_shards, shards_to_score)
from multimodal.filtering.scoring import Scoring
from multimodal.ranks import Exchange, Ranks, on_every_rank, on_main_rank


def filter_distributed(config: FilterConfig, finish: Callable[[Path, FilterResult], None] | None = None,
                       ranks: Ranks | None = None) -> FilterResult:
    """``vlsae filter`` in one process or split over torchrun's processes (see the module docstring).

    Every rank calls it with the same ``config``; rank 0 returns what :func:`filter_dataset` returns, the
    others a :class:`FilterResult` with the same ``summary`` and ``out`` (no report statistics or cards).
    ``finish`` runs on rank 0 only.
    """
    ranks = ranks or Ranks.from_env()
    if ranks.world <= 1:
        return filter_dataset(config, finish)
    check_config(config)
    if config.shards:
        raise VlsaeError(f"--shards {config.shards} splits the shards by hand, but under torchrun the "
                         f"{ranks.world} processes split them already; drop --shards (or run without torchrun)")
    return _Split(config, ranks).run(finish)


class _Split:
    """One rank's part of a split filter run (see the module docstring)."""

    def __init__(self, config: FilterConfig, ranks: Ranks):
        self.config = config
        self.ranks = ranks
        # what this rank scores with: its own device (cuda:LOCAL_RANK on GPUs), a progress bar on rank 0 only
        self.scoring_config = replace(config, device=rank_device(config.device, ranks),
                                      progress=config.progress and ranks.is_main)
        self.scoring: Scoring | None = None

    def run(self, finish: Callable[[Path, FilterResult], None] | None) -> FilterResult:
        ranks = self.ranks
        exchange = Exchange(ranks, name="filter")
        plan: FilterPlan | None = None

        def prepare() -> dict[str, Any]:
            nonlocal plan
            plan = plan_filter(self.config, scoring_only=False)
            scores = open_staging(plan)
            todo, shas = shards_to_score(plan, list(range(len(plan.urls))))
            try:
                if todo:
                    self.scoring = build_scoring(replace(plan, config=self.scoring_config))
            except VlsaeError:
                if not any(scores.iterdir()):  # as in one process: a user error before any score leaves nothing
                    shutil.rmtree(plan.staging, ignore_errors=True)
                raise
            return {"todo": todo, "shas": shas}

        def check() -> None:  # the other ranks meanwhile: the same checks, nothing opened
            nonlocal plan
            plan = plan_filter(self.config, scoring_only=True)

        prepared = on_every_rank(exchange, ranks.world, prepare if ranks.is_main else check)[0]
        todo = [i for i in prepared["todo"] if i % ranks.world == ranks.rank]
        shas = {i: prepared["shas"][i] for i in todo if i in prepared["shas"]}
        scoring_plan = replace(plan, config=self.scoring_config)

        try:
            timings = on_every_rank(exchange, ranks.world,
                                    lambda: score_shards(scoring_plan, todo, shas, self.scoring))
        except VlsaeError:
            if ranks.is_main and plan.scores.is_dir() and not any(plan.scores.iterdir()):
                shutil.rmtree(plan.staging, ignore_errors=True)  # every rank has stopped: nothing writes there now
            raise
        self.scoring = None  # the model's memory is not needed for the decision
        timing = merged_timing(timings, reused=len(plan.urls) - len(prepared["todo"]))

        written: list[FilterResult] = []  # rank 0's whole result (statistics, cards: not sent to the others)

        def write() -> dict[str, Any]:
            written.append(decide_and_write(plan, timing, finish))
            return written[0].summary

        summary = on_main_rank(exchange, ranks, write)
        return written[0] if written else FilterResult(summary=summary, out=Path(summary["out"]))


def merged_timing(timings: list[dict[str, Any]], reused: int) -> dict[str, Any]:
    """The scoring timing of all ranks as one run's: pairs and forward seconds summed, the wall seconds of the
    slowest rank, the scorer's fit summary (the same on every rank that scored)."""
    pairs = sum(t["pairs"] for t in timings)
    seconds = max(t["seconds"] for t in timings)
    fit = next((t["fit"] for t in timings if t.get("fit")), {})
    return {"pairs": pairs, "seconds": seconds,
            "forward_seconds": round(sum(t.get("forward_seconds", 0.0) for t in timings), 3),
            "pairs_per_second": round(pairs / seconds, 1) if seconds > 0 else None, "fit": fit,
            "processes": len(timings), "reused_shards": reused}
