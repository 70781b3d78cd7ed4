"""Data sources for CLI runs: the one place that turns a DataSpec into a source
from any package (tensor files in vlsae, synthetic suites in evals, caches in multimodal)."""
from __future__ import annotations

from vlsae.errors import VlsaeError
from vlsae.training.data import ActivationSource, TensorSource
from vlsae.training.run import DataSpec, resolve_path_source


def resolve_data(spec: DataSpec) -> ActivationSource:
    if spec.synthetic:
        from evals.synthetic import generate
        data = generate(spec.synthetic, seed=spec.seed, n_train=spec.n_train, n_test=1, preset=spec.preset,
                        noise=spec.noise, **spec.options)
        source: ActivationSource = TensorSource(data.train)
    elif spec.acts:
        from multimodal.cache import ActivationCache
        return ActivationCache(spec.acts, modality=spec.modality) if spec.modality else ActivationCache(spec.acts)
    else:
        source = resolve_path_source(spec)
    if spec.modality:
        if not isinstance(source.d_in, dict):
            raise VlsaeError(f"--modality {spec.modality} needs paired data, but this data is a single tensor")
        if spec.modality not in source.d_in:
            raise VlsaeError(f"unknown modality '{spec.modality}'; the data has {', '.join(source.d_in)}")
        source = TensorSource(source.data[spec.modality])  # type: ignore[attr-defined]
    return source
