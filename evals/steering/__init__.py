"""The steering benchmark's helpers: judging steered images, one steering run, discovery runs, reports.

- :mod:`evals.steering.judging`: the three judges as one panel; flip, preservation, removal and change rates;
- :mod:`evals.steering.sweep`: a prompt steered at a row of strengths (same noise as unsteered), images and grid;
- :mod:`evals.steering.run`: what ``vlsae steer`` and ``vlsae steer --discover`` write;
- :mod:`evals.steering.benchmark`: the flip table over (source -> target) pairs, with the baselines;
- :mod:`evals.steering.report`: the HTML pages.

The interventions themselves are :mod:`steering`'s.
"""
