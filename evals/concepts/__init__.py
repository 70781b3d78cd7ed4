"""Concept reports: what a trained multimodal SAE's latents mean, on real image-caption pairs.

The package is split by job: :mod:`~evals.concepts.pairs` gets paired
activations through the project's extraction path, :mod:`~evals.concepts.probes`
scores the planted ShapesWorld values, :mod:`~evals.concepts.figures` draws,
:mod:`~evals.concepts.html` writes the cards and the page, and
:mod:`~evals.concepts.report` ties them into :func:`concepts_report`, the job
behind ``vlsae concepts``.
"""
from __future__ import annotations

from evals.concepts.pairs import PairActivations, extract_pair_activations, read_images
from evals.concepts.probes import planted_labels, planted_probe, two_fold_probe_ceiling
from evals.concepts.report import concepts_report, write_report

__all__ = ["PairActivations", "concepts_report", "extract_pair_activations", "planted_labels", "planted_probe",
           "read_images", "two_fold_probe_ceiling", "write_report"]
