"""One OOD run: embeddings of every set, every score in one pass, the metrics, the report.

:func:`run_ood` is what ``vlsae ood`` and the ``ood`` task run. Its order keeps
user errors cheap: the flags, the sets (shards present and readable, caches
complete), ``--id`` against ``--fit`` and the SAE's width are checked before
any extraction. Then each set's image embeddings come from its cache (made once
from shards), the reference statistics from ``--fit``, and every score is
computed over the shared :class:`~evals.ood.context.Features` of each set.
Every score is evaluated on ID against each OOD set by the one evaluator
(:mod:`evals.ood.metrics`), and per set the best SAE score is compared with the
best baseline by a paired bootstrap of their AUROC difference.

Under ``torchrun --nproc-per-node N`` every rank makes the same checks, the
extraction of each set from shards is split over the ranks (each takes its data
shards; :func:`evals.ood.data.load_set`), and then rank 0 alone computes the head,
the scores, the metrics and writes the report while the others wait (the
embeddings are small); every rank returns rank 0's results, and an error on any
rank is raised on all. The ranks meet through the rendezvous store
(:class:`multimodal.ranks.Exchange`). The caches read like single-process ones,
so the report is that of one process.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from multimodal.adapters import create_adapter
from multimodal.cache_format import read_manifest
from multimodal.extract_distributed import rank_device
from multimodal.pairs import check_max_skipped
from multimodal.ranks import Exchange, Ranks, on_every_rank, on_main_rank
from vlsae.checkpoint import load_sae
from vlsae.config import to_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_json, check_writable_dir

from evals.ood.config import OODConfig
from evals.ood.context import Reference, ScoreSettings
from evals.ood.data import (EmbeddingSet, check_disjoint, check_distinct, check_source, is_cache, load_head, load_set,
                            needs_extraction, parse_ood_sets)
from evals.ood.metrics import compare_auroc, evaluate
from evals.ood.report import write_report
from evals.ood.scores import get_score, list_scores, missing_inputs
from evals.zeroshot.concept import check_sae
from evals.zeroshot.head import head_summary

RESULTS = "results.json"


def _chosen_scores(names: list[str] | None) -> list[str]:
    if not names:
        return list_scores()
    for name in names:
        get_score(name)  # the registry's one-line error with a suggestion
    return list(dict.fromkeys(names))


def _check_width(sae, sources: dict[str, str], flags: dict[str, str]) -> None:
    """The SAE must read rows as wide as the caches' image embeddings (checked before any extraction)."""
    for name, source in sources.items():
        if is_cache(source):
            check_sae(sae, int(read_manifest(source)["width"]["image"]), f"{flags[name]} {source}")


class _Clock:
    """Wall and CPU seconds per stage. On a shared machine the wall time says how busy it was; the CPU
    time (every thread of this process) says what the work itself costs."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._start = self._mark = (time.perf_counter(), time.process_time())

    def lap(self, stage: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[stage] = now[0] - self._mark[0]
        self.cpu[stage] = now[1] - self._mark[1]
        self._mark = now

    def record(self) -> dict[str, dict[str, float]]:
        now = (time.perf_counter(), time.process_time())
        wall = {**self.wall, "total": now[0] - self._start[0]}
        cpu = {**self.cpu, "total": now[1] - self._start[1]}
        return {"seconds": {k: round(v, 2) for k, v in wall.items()}, "cpu_seconds": {k: round(v, 2) for k, v in cpu.items()}}


def run_ood(config: OODConfig, ranks: Ranks | None = None) -> dict[str, Any]:
    """Score ``config.id`` against every ``config.ood`` set; write the report into ``config.out``.

    ``ranks``: this process's place under torchrun (default: from the environment; see the module docstring)."""
    ranks = ranks or Ranks.from_env()
    clock = _Clock()
    out = check_writable_dir(config.out)
    if (out / RESULTS).exists() and not config.overwrite:
        raise VlsaeError(f"{out} already holds an OOD report; pass --overwrite to replace it (the caches are reused)")
    cache_root = Path(config.cache) if config.cache else out / "acts"
    check_writable_dir(cache_root, flag="--cache")
    check_max_skipped(config.max_skipped)
    if config.bootstrap < 0:
        raise VlsaeError(f"--bootstrap must be 0 (no intervals) or a number of resamples, got {config.bootstrap}")
    ood_sets = parse_ood_sets(config.ood)
    names = _chosen_scores(config.scores)
    sources = {"fit": config.fit, "id": config.id, **ood_sets}
    flags = {"fit": "--fit", "id": "--id", **{name: f"--ood {name}" for name in ood_sets}}
    for name, source in sources.items():
        check_source(source, flags[name], config.model)
    check_distinct(config.fit, config.id)
    sae = load_sae(config.sae).eval()
    _check_width(sae, sources, flags)
    exchange = Exchange(ranks, name="ood")
    on_every_rank(exchange, ranks.world, lambda: None)  # every rank has checked before rank 0 writes anything
    clock.lap("checks")

    extracting = any(needs_extraction(name, source, config.model, cache_root) for name, source in sources.items())
    adapter = None
    if ranks.is_main or extracting:  # a rank that extracts nothing loads no model
        device = config.device if ranks.world <= 1 else rank_device(config.device, ranks)
        adapter = create_adapter(config.model, device=device)
        check_sae(sae, adapter.widths("final")["image"], config.model)
    sets: dict[str, EmbeddingSet] = {
        name: load_set(name, source, flags[name], adapter, config.model, cache_root, batch_size=config.batch_size,
                       max_skipped=config.max_skipped, progress=config.progress, ranks=ranks)
        for name, source in sources.items()}
    check_disjoint(sets["fit"], sets["id"])
    clock.lap("embeddings")
    return on_main_rank(exchange, ranks, lambda: _report(config, sae, adapter, sets, ood_sets, names, cache_root,
                                                         out, clock))


def _report(config: OODConfig, sae: Any, adapter: Any, sets: dict[str, EmbeddingSet], ood_sets: dict[str, str],
            names: list[str], cache_root: Path, out: Path, clock: _Clock) -> dict[str, Any]:
    """The head, every score, the metrics, the report and ``results.json`` (on rank 0 alone under torchrun)."""
    head = load_head(adapter, config.classes, cache_root)
    clock.lap("head")

    settings = ScoreSettings(k=config.k, lam=config.lam, temperature=config.temperature, attribute=config.attribute)
    reference = Reference(sae, sets["fit"].image, head, settings)
    scores, skipped, score_seconds = _score_all(reference, names, {n: s for n, s in sets.items() if n != "fit"})
    clock.lap("scores")

    metrics, best = _evaluate(scores, list(ood_sets), config.bootstrap, config.seed)
    clock.lap("metrics")

    computed = list(scores["id"])
    results: dict[str, Any] = {
        "sae": str(config.sae), "arch": getattr(sae, "arch", "") or getattr(getattr(sae, "sae", None), "arch", ""),
        "n_latents": int(sae.n_latents), "model": config.model, "attribute": reference.attribute,
        "head": head_summary(head),
        "sets": {name: s.summary() for name, s in sets.items()},
        "scores": {name: {"kind": get_score(name).kind, "summary": get_score(name).summary,
                          "seconds": round(score_seconds[name], 3)} for name in computed},
        "skipped": skipped,
        "metrics": metrics, "best": best,
        "conventions": {"score": "higher = more in-distribution",
                        "auroc": "ID positive, score as is (= OOD positive, negated score)",
                        "fpr95": "classic: fraction of OOD accepted at the threshold keeping 95 % of ID",
                        "fpr95_ood": "OpenOOD v1.5: fraction of ID flagged at the threshold catching 95 % of OOD",
                        "aupr_in": "average precision, ID positive", "aupr_out": "average precision, OOD positive",
                        "intervals": f"95 % percentile bootstrap, {config.bootstrap} resamples, ID and OOD resampled separately"},
        "config": to_dict(config),
    }
    results.update(clock.record())
    write_report(out, results, sets, scores, figures=config.figures)
    clock.lap("report")
    results.update(clock.record())
    atomic_write_json(out / RESULTS, results)  # last: a results.json means a finished report
    return {**results, "out": str(out), "index": str(out / "index.html")}


def _score_all(reference: Reference, names: list[str], sets: dict[str, EmbeddingSet]
               ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str], dict[str, float]]:
    """set -> score -> (n,) values; the scores skipped with why; seconds per score (summed over sets)."""
    skipped: dict[str, str] = {}
    runnable = []
    for name in names:
        why = missing_inputs(get_score(name), reference)
        if why:
            skipped[name] = why
        else:
            runnable.append(name)
    if not runnable:
        raise VlsaeError(f"none of the scores can run here: {'; '.join(f'{n} {w}' for n, w in skipped.items())}")
    seconds = {name: 0.0 for name in runnable}
    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for set_name, embedding in sets.items():
            features = reference.features(embedding.image)
            out[set_name] = {}
            for name in runnable:
                tick = time.perf_counter()
                values = get_score(name)(reference, features).float()
                seconds[name] += time.perf_counter() - tick
                if values.shape != (len(features),) or not bool(torch.isfinite(values).all()):
                    raise RuntimeError(f"OOD score {name} returned {tuple(values.shape)} values with non-finite "
                                       f"entries on {set_name}; every score must give one finite number per row")
                out[set_name][name] = values
    return out, skipped, seconds


def _evaluate(scores: dict[str, dict[str, torch.Tensor]], ood_names: list[str], n_resamples: int, seed: int
              ) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Metrics per OOD set and score; per set, the best score overall, the best of each kind and their AUROC delta."""
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    best: dict[str, dict[str, Any]] = {}
    id_scores = scores["id"]
    for set_name in ood_names:
        metrics[set_name] = {name: evaluate(id_scores[name].numpy(), scores[set_name][name].numpy(),
                                            n_resamples=n_resamples, seed=seed)
                             for name in id_scores}
        row = metrics[set_name]
        top = max(row, key=lambda n: row[n]["auroc"])
        entry: dict[str, Any] = {"score": top, "auroc": row[top]["auroc"]}
        by_kind = {}
        for kind in ("sae", "baseline"):
            names = [n for n in row if get_score(n).kind == kind]
            if names:
                by_kind[kind] = max(names, key=lambda n: row[n]["auroc"])
                entry[f"best_{kind}"] = by_kind[kind]
                entry[f"best_{kind}_auroc"] = row[by_kind[kind]]["auroc"]
        if len(by_kind) == 2:
            sae_name, base_name = by_kind["sae"], by_kind["baseline"]
            delta = compare_auroc((id_scores[sae_name].numpy(), scores[set_name][sae_name].numpy()),
                                  (id_scores[base_name].numpy(), scores[set_name][base_name].numpy()),
                                  n_resamples=n_resamples, seed=seed)
            ci = delta["delta_ci"]
            verdict = ("sae" if ci[0] > 0 else "baseline" if ci[1] < 0 else "tie") if ci else \
                ("sae" if delta["delta"] > 0 else "baseline" if delta["delta"] < 0 else "tie")
            entry.update(sae_minus_baseline=delta["delta"], sae_minus_baseline_ci=ci, verdict=verdict)
        best[set_name] = entry
    return metrics, best
