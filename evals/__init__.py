"""evals: metrics beyond the trainer's own, benchmark tasks and reports.

Holds the planted-feature synthetic suite (``evals.synthetic``): seeded
generators with ground truth and the recovery, absorption and splitting
metrics that score a trained SAE against it.
"""
