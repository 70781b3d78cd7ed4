"""The activation cache as a training data source: ``data: {acts: DIR, modality: image}``.

Registered in vlsae's data-source registry (announced to it through the
``vlsae.data_sources`` entry point), so ``vlsae train --acts DIR`` and
``run_training`` read a cache without vlsae importing this package.
"""
from __future__ import annotations

from vlsae.training.sources import DataSpec, ResolvedData, register_data_source

from multimodal.cache import ActivationCache


@register_data_source("acts", selects_modality=True)
def activation_cache_source(spec: DataSpec) -> ResolvedData:
    """A streaming, shuffled read of the cache (only ``spec.modality`` when given)."""
    cache = ActivationCache(spec.acts, modality=spec.modality) if spec.modality else ActivationCache(spec.acts)
    origin = " ".join(str(cache.manifest[k]) for k in ("source", "hook", "tokens") if cache.manifest.get(k))
    return ResolvedData(cache, hook=origin)
