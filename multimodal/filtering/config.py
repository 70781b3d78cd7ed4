"""Settings of ``vlsae filter`` and the checks that run before any model loads.

Every user mistake the filter can see from its flags alone (a scorer that
needs ``--sae`` without one, ``--keep`` outside (0, 1], both or neither of
``--keep`` and ``--threshold``, a bad ``--shards``) is a one-line error here,
before a shard is read or a model is built.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlsae.checkpoint import read_config
from vlsae.config import option
from vlsae.errors import VlsaeError

from multimodal.adapters import get_adapter_class
from multimodal.adapters.base import TOKEN_MODES
from multimodal.filtering.scorers import Scorer, get_scorer, list_scorers
from multimodal.pairs import DEFAULT_MAX_SKIPPED, check_max_skipped


@dataclass
class FilterConfig:
    """What ``vlsae filter`` reads, how it scores and what it keeps."""

    scorer: str = option("", help="pair scorer: saev, vl-overlap, vl-jaccard, l0, cooc-l0, clipscore, random")
    data: str = option("", help="webdataset pair shards, e.g. 'DIR/{000000..000009}.tar', or a folder of shards")
    out: str = option("", help="folder of the filtered dataset (kept shards, scores.csv, filter.json, index.html)")
    model: str = option("", help="model adapter spec, e.g. shapes-clip or shapes-llava (every scorer but random)")
    sae: str = option("", help="trained SAE run folder (the saev, vl-*, l0 and cooc-l0 scorers)")
    keep: float | None = option(None, help="keep this fraction of the scored pairs, the highest-scoring, in (0, 1]")
    threshold: float | None = option(None, help="keep every pair scoring at least this (instead of keep)")
    hook: str = option("", help="hook point (empty: the one the SAE was trained on, else final)")
    tokens: str = option("", help="token selection cls | patch | all | mean (empty: the SAE's, else cls)")
    theta: float = option(0.0, help="a latent is active on a pair's image or caption when its largest value there "
                                    "exceeds this (SAE-V: 1 on its normalised ReLU SAE)")
    seed: int = option(0, help="seed of the random scorer")
    probe: str = option("", help="pair shards whose first probe_pairs give SAE-V's cross-modal weights (empty: data)")
    probe_pairs: int = option(1000, help="pairs of the probe that SAE-V's weights are computed on")
    batch_size: int = option(64, help="pairs per forward pass")
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    shards: str = option("", help="'i/n': score only the shards j with j % n == i and write no output; a run "
                                  "without it merges the scores (and scores what is missing)")
    max_skipped: float = option(DEFAULT_MAX_SKIPPED, help="largest fraction of the pairs that damaged shards may "
                                                          "lose (corrupt records, truncated tars) before the run fails")
    truth: bool = option(True, help="read ShapesWorld's corrupted flags (json) for the report's ground-truth "
                                    "section; scorers never see them")
    extremes: int = option(12, help="highest- and lowest-scoring pairs shown in the report")
    overwrite: bool = option(False, help="replace an existing out folder")
    progress: bool = option(True, help="show a progress bar")


def parse_shards(text: str) -> tuple[int, int] | None:
    """'i/n' -> (i, n); '' -> None."""
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise VlsaeError(f"--shards must look like i/n with 0 <= i < n (this process scores shards j with j % n == i), "
                         f"got '{text}'")
    return int(match.group(1)), int(match.group(2))


def check_config(config: FilterConfig) -> type[Scorer]:
    """The scorer class, after every check that needs no data and no model."""
    if not config.scorer:
        raise VlsaeError(f"no --scorer given; choose one of {', '.join(list_scorers())}")
    scorer = get_scorer(config.scorer)
    if not config.data:
        raise VlsaeError("no --data given; pass webdataset pair shards, e.g. --data 'DIR/{000000..000009}.tar'")
    if not config.out:
        raise VlsaeError("no --out given; pass the folder the filtered dataset goes to")
    scoring_only = parse_shards(config.shards) is not None
    if config.keep is not None and config.threshold is not None:
        raise VlsaeError("give --keep FRACTION or --threshold T, not both")
    if config.keep is None and config.threshold is None and not scoring_only:
        raise VlsaeError("give --keep FRACTION (e.g. --keep 0.5: the best-scoring half) or --threshold T")
    if config.keep is not None and (isinstance(config.keep, bool) or not 0 < config.keep <= 1):
        raise VlsaeError(f"--keep is the fraction of pairs to keep, in (0, 1] (0.5 keeps half), got {config.keep}")
    if scorer.needs_sae and not config.sae:
        raise VlsaeError(f"scorer '{config.scorer}' reads SAE codes: pass --sae RUN, a trained SAE run folder "
                         f"(a VL-SAE on the model's embeddings for vl-*; a token-level SAE for saev, l0, cooc-l0)")
    if scorer.needs_model and not config.model:
        raise VlsaeError(f"scorer '{config.scorer}' runs a model: pass --model SPEC (e.g. shapes-clip, shapes-llava)")
    if scorer.needs_model:
        get_adapter_class(config.model)  # a typo in the spec is one line now, not after reading the data
    if config.batch_size < 1:
        raise VlsaeError(f"--batch-size must be at least 1, got {config.batch_size}")
    if scorer.needs_probe and config.probe_pairs < 1:
        raise VlsaeError(f"--probe-pairs must be at least 1, got {config.probe_pairs}")
    if config.extremes < 0:
        raise VlsaeError(f"--extremes must be 0 or more, got {config.extremes}")
    check_max_skipped(config.max_skipped)
    if config.tokens and config.tokens not in TOKEN_MODES:
        raise VlsaeError(f"unknown --tokens '{config.tokens}'; use one of {', '.join(TOKEN_MODES)}")
    return scorer


def recorded_hook(sae: str) -> tuple[str, str, str]:
    """(model, hook, tokens) the SAE's training cache recorded (``sae.config.hook`` = 'SOURCE HOOK TOKENS'),
    empty strings where it recorded nothing."""
    record = read_config(Path(sae))
    parts = str(record["config"].get("hook", "")).split()
    if len(parts) >= 3 and parts[-1] in TOKEN_MODES:
        return " ".join(parts[:-2]), parts[-2], parts[-1]
    return "", "", ""


def resolve_hook(config: FilterConfig, scorer: type[Scorer]) -> tuple[str, str]:
    """The hook and token mode to score at: the flags, else the SAE's record, else final / cls."""
    _, hook, tokens = recorded_hook(config.sae) if scorer.needs_sae else ("", "", "")
    return config.hook or hook or "final", config.tokens or tokens or "cls"
