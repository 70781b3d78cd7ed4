"""The planted-feature suites as a training data source: ``data: {synthetic: SUITE, ...}``.

Registered in vlsae's data-source registry (announced to it through the
``vlsae.data_sources`` entry point): ``vlsae train --synthetic hierarchical``
trains on the suite's training rows and reports the final metrics on its
independent test rows.
"""
from __future__ import annotations

from vlsae.training.data import TensorSource
from vlsae.training.sources import DataSpec, ResolvedData, register_data_source

from evals.synthetic.generators import generate


@register_data_source("synthetic")
def planted_suite_source(spec: DataSpec) -> ResolvedData:
    """Draw the suite (seeded) and serve its train rows, with its test rows held out."""
    data = generate(spec.synthetic, seed=spec.seed, n_train=spec.n_train, n_test=spec.n_test,  # type: ignore[arg-type]
                    preset=spec.preset, noise=spec.noise, **spec.options)
    return ResolvedData(TensorSource(data.train), TensorSource(data.test))
