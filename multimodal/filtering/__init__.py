"""Data filtering: score image-text pairs by model or SAE concepts, keep the best, copy them byte for byte.

    from multimodal.filtering import FilterConfig, filter_dataset, list_scorers
    list_scorers()   # ['clipscore', 'cooc-l0', 'l0', 'random', 'saev', 'vl-jaccard', 'vl-overlap']
    result = filter_dataset(FilterConfig(scorer="vl-overlap", sae="runs/demo/vl", model="shapes-clip",
                                         data="data/noisy", keep=0.5, out="data/clean"))
    result.summary["counts"]   # pairs scored, kept, dropped, lost

The package is split by job: :mod:`~multimodal.filtering.scorers` (the
registry; one module per scorer family, SAE-V's in ``saev``),
:mod:`~multimodal.filtering.scoring` (adapter + SAE + scorer over shards),
:mod:`~multimodal.filtering.spill` (score files and the keep decision over
them), :mod:`~multimodal.filtering.shards` (the byte-identical shard copy) and
:mod:`~multimodal.filtering.run` (:func:`filter_dataset`, the job of
``vlsae filter``; its report page lives in :mod:`evals.filtering`) and
:mod:`~multimodal.filtering.distributed` (:func:`filter_distributed`: the same
job split over torchrun's processes).
"""
from __future__ import annotations

from multimodal.filtering.config import FilterConfig
from multimodal.filtering.distributed import filter_distributed
from multimodal.filtering.run import FILTER_JSON, FilterResult, filter_dataset, staging_dir
from multimodal.filtering.scorers import SCORERS, PairBatch, Scorer, create_scorer, get_scorer, list_scorers, register_scorer
from multimodal.filtering.scorers.saev import CrossModalWeights, cross_modal_weights

__all__ = ["FILTER_JSON", "SCORERS", "CrossModalWeights", "FilterConfig", "FilterResult", "PairBatch", "Scorer",
           "create_scorer", "cross_modal_weights", "filter_dataset", "filter_distributed", "get_scorer", "list_scorers",
           "register_scorer", "staging_dir"]
