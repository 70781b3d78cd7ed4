"""The filtering application above :mod:`multimodal.filtering`: its report page, detection metrics,
the alignment experiment's helpers and the demo step.

:mod:`~evals.filtering.report` writes the page ``vlsae filter`` puts in its
output; :mod:`~evals.filtering.metrics` scores a filter against known
corruptions; :mod:`~evals.filtering.alignment` trains shapes-clip's
contrastive recipe on a filtered dataset and measures it;
:mod:`~evals.filtering.demo` is the small run ``vlsae demo`` shows.
"""
from __future__ import annotations

from evals.filtering.metrics import detection, keep_top
from evals.filtering.report import write_filter_report

__all__ = ["detection", "keep_top", "write_filter_report"]
