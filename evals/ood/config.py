"""Settings of an OOD run (``vlsae ood``, ``vlsae eval ood``, :func:`evals.ood.run_ood`)."""
from __future__ import annotations

from dataclasses import dataclass

from multimodal.pairs import DEFAULT_MAX_SKIPPED
from vlsae.config import option


@dataclass
class OODConfig:
    sae: str = option(help="trained SAE run folder or checkpoint (trained on the model's final embeddings)")
    model: str = option(help="adapter spec of the model the embeddings come from, e.g. shapes-clip")
    fit: str = option(help="in-distribution training data for the reference statistics (KNN banks, class means, "
                           "covariance, class profiles): pair shards or an activation cache, e.g. what the SAE was trained on")
    id: str = option(help="held-out in-distribution pairs to score (neither --fit nor the SAE's training rows): shards or a cache")
    out: str = option(help="report folder: scores.csv, results.json, index.html (and the caches, unless --cache)")
    ood: dict[str, str] | list[str] = option(factory=dict, help="OOD sets to score: name -> shards or activation cache, or NAME=DATA items")
    scores: list[str] | None = option(None, help="scores to compute; none means every registered score the inputs allow")
    classes: str | None = option(None, help="a --classes file (JSON/YAML: classes, templates) for the zero-shot head "
                                            "(none: every ShapesWorld object description)")
    attribute: str | None = option(None, help="head attribute whose predicted class conditions the class scores (none: the head's first, "
                                              "shape on ShapesWorld)")
    k: int = option(10, help="neighbours: KNN scores use the distance to the k-th nearest fit row")
    lam: float = option(0.5, help="concept-MCM's weight of the concept similarity (0 gives plain MCM)")
    temperature: float = option(1.0, help="MCM's softmax temperature on cosines")
    bootstrap: int = option(1000, help="bootstrap resamples for the 95-percent intervals (0: no intervals)")
    seed: int = option(0, help="seed of the bootstrap")
    cache: str | None = option(None, help="folder for the extracted activation caches and the head (none: OUT/acts)")
    batch_size: int = option(128, help="pairs per forward pass when extracting")
    device: str = option("auto", help="device for the model: auto, cpu, cuda or cuda:N")
    max_skipped: float = option(DEFAULT_MAX_SKIPPED, help="largest fraction of pairs damaged shards may lose before extraction refuses")
    figures: bool = option(True, help="draw the ROC curves and score histograms of index.html")
    overwrite: bool = option(False, help="replace the report of an earlier run in out (its caches are reused)")
    progress: bool = option(True, help="progress bars")
