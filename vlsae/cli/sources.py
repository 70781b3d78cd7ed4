"""Data sources for CLI runs: the one place that turns a DataSpec into sources
from any package (tensor files in vlsae, synthetic suites in evals, caches in
multimodal). vlsae.training itself imports neither evals nor multimodal."""
from __future__ import annotations

from vlsae.errors import VlsaeError
from vlsae.training.data import ActivationSource, TensorSource
from vlsae.training.run import DataSpec, ResolvedData, resolve_path_source


def _synthetic(spec: DataSpec) -> ResolvedData:
    try:
        from evals.synthetic import generate
    except ImportError as exc:
        raise VlsaeError(f"synthetic data needs the evals package, which cannot be imported here ({exc}); "
                         "run from a vlsae checkout or use --data FILE") from None
    data = generate(spec.synthetic, seed=spec.seed, n_train=spec.n_train, n_test=spec.n_test, preset=spec.preset,
                    noise=spec.noise, **spec.options)
    return ResolvedData(TensorSource(data.train), TensorSource(data.test))


def _cache(spec: DataSpec) -> ResolvedData:
    try:
        from multimodal.cache import ActivationCache
    except ImportError as exc:
        raise VlsaeError(f"--acts needs the activation cache (multimodal.cache), which cannot be imported ({exc}); "
                         "use --data FILE with a tensor file instead") from None
    cache = ActivationCache(spec.acts, modality=spec.modality) if spec.modality else ActivationCache(spec.acts)
    origin = " ".join(str(cache.manifest[k]) for k in ("source", "hook", "tokens") if cache.manifest.get(k))
    return ResolvedData(cache, hook=origin)


def _one_modality(source: ActivationSource | None, modality: str) -> ActivationSource | None:
    if source is None:
        return None
    if not isinstance(source.d_in, dict):
        raise VlsaeError(f"--modality {modality} needs paired data, but this data is a single tensor")
    if modality not in source.d_in:
        raise VlsaeError(f"unknown modality '{modality}'; the data has {', '.join(source.d_in)}")
    return TensorSource(source.data[modality])  # type: ignore[attr-defined]


def resolve_data(spec: DataSpec) -> ResolvedData:
    """The training source (and held-out rows where the data has them) for a run config's ``data``."""
    if spec.acts:
        return _cache(spec)  # the cache selects a modality itself
    resolved = _synthetic(spec) if spec.synthetic else resolve_path_source(spec)
    if spec.modality:
        resolved = ResolvedData(_one_modality(resolved.train, spec.modality),  # type: ignore[arg-type]
                                _one_modality(resolved.held_out, spec.modality))
    return resolved
