"""Dark matter of SAE errors (``vlsae darkmatter``): how much of an SAE's error is linear in its input.

    from evals.darkmatter import dark_matter, run_darkmatter
    scores = dark_matter(x, recon)                  # error_r2, norm_r2, nonlinear_fvu, ... on tensors
    result = run_darkmatter(["runs/topk-4k", "runs/topk-16k"], "acts", "report", modality="image")
"""
from evals.darkmatter.analysis import dark_matter, error_norm_agreement
from evals.darkmatter.run import run_darkmatter

__all__ = ["dark_matter", "error_norm_agreement", "run_darkmatter"]
