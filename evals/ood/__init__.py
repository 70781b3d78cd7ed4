"""OOD detection from SAE concepts, measured against raw-embedding baselines (``vlsae ood``).

    from evals.ood import OODConfig, run_ood
    result = run_ood(OODConfig(sae="runs/vl", model="shapes-clip", fit="data/fit", id="data/id",
                               ood={"noise": "data/ood/noise"}, out="reports/ood"))
    result["best"]["noise"]          # best score, best SAE score vs best baseline, their AUROC difference

- :mod:`evals.ood.metrics`: the one evaluator (AUROC, FPR@95 %TPR both ways, AUPR-In/Out,
  bootstrap intervals, paired AUROC differences);
- :mod:`evals.ood.scores`: the score registry (SAE scores and baselines, one function each);
- :mod:`evals.ood.context`: the fit statistics and per-set features the scores share (one pass);
- :mod:`evals.ood.data`: sets from shards or activation caches, extracted once; the cached zero-shot head;
- :mod:`evals.ood.run`, :mod:`evals.ood.report`, :mod:`evals.ood.figures`: the run and its report;
- :mod:`evals.ood.demo`: the small OOD pass ``vlsae demo`` runs on its own artifacts.
"""
from evals.ood.config import OODConfig
from evals.ood.metrics import METRICS, compare_auroc, evaluate, ood_metrics
from evals.ood.run import run_ood
from evals.ood.scores import SCORES, get_score, list_scores, register_score

__all__ = ["METRICS", "OODConfig", "SCORES", "compare_auroc", "evaluate", "get_score", "list_scores", "ood_metrics",
           "register_score", "run_ood"]
