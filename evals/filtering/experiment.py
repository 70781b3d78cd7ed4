"""The filtering experiment: do SAE scorers find corrupted captions, and does the kept half train a better CLIP?

1. A noisy ShapesWorld (``noise`` of the captions corrupted: another image's
   caption, or one colour or shape swapped; the json flags are ground truth,
   read by the evaluation only).
2. Every scorer filters it to its best ``keep`` fraction with ``vlsae filter``'s
   own code (:func:`evals.tasks.filter.run_filter`); detection is the AUROC of
   the scores against "clean" and the precision / recall of the kept set.
3. shapes-clip's recipe (:mod:`evals.filtering.alignment`) trains on all pairs,
   on a random ``keep`` fraction and on each scorer's kept fraction, with the
   same seed, steps and batch size; each arm's zero-shot accuracy and retrieval
   R@1 are measured on clean held-out scenes.
4. Two regimes. ``pretrained``: the scorers' models are the shipped shapes-clip
   and shapes-llava (trained on clean data) and their SAEs are trained on a clean
   world. ``bootstrap``: the scoring CLIP is the full-data arm itself (trained on
   the noisy data) and every SAE is trained on the noisy data (shapes-llava stays
   the shipped one: retraining it is beyond this experiment's budget).

The SAEs: a VL-SAE on the CLIP's final embeddings (40 latents, k = 20, the
demo's) for ``vl-overlap`` / ``vl-jaccard``, and a BatchTopK SAE on
shapes-llava's ``layers.1`` image and text tokens together (SAE-V's single
dictionary; BatchTopK so that the L0 of a token varies, which ``l0`` needs) for
``saev``, ``l0`` and ``cooc-l0``. Every step writes into ``out`` and is reused
by a rerun, so an interrupted experiment continues.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from multimodal.extract import ExtractConfig, extract
from multimodal.filtering import FilterConfig
from multimodal.shapesworld import ShapesWorldConfig, write_world
from vlsae.config import option, to_dict
from vlsae.training.run import load_run_config, run_training

from evals.filtering.alignment import ArmResult, train_arm
from evals.tasks.filter import run_filter

CLIP_SCORERS = ("clipscore", "vl-overlap", "vl-jaccard")
TOKEN_SCORERS = ("saev", "l0", "cooc-l0")
LLAVA_HOOK = "layers.1"  # the middle of shapes-llava's three decoder layers (SAE-V hooks a middle layer, 16 of 32)


@dataclass
class ExperimentConfig:
    out: str = option("runs/filtering", help="experiment folder (reused and continued)")
    pairs: int = option(20_000, help="pairs of the noisy world")
    shard_size: int = option(2_000, help="pairs per shard")
    noise: float = option(0.4, help="fraction of corrupted captions")
    seed: int = option(1, help="seed of the noisy world (the clean world uses seed + 1)")
    keep: float = option(0.5, help="fraction every scorer keeps")
    clean_pairs: int = option(5_000, help="pairs of the clean world the pretrained regime's SAEs train on")
    token_pairs: int = option(2_000, help="pairs whose shapes-llava tokens train a token-level SAE")
    sae_steps: int = option(1_500, help="training steps of every SAE")
    scorers: list[str] = option(factory=lambda: [*CLIP_SCORERS, *TOKEN_SCORERS], help="scorers to compare")
    regimes: list[str] = option(factory=lambda: ["pretrained", "bootstrap"], help="pretrained and/or bootstrap")
    arm: dict = option(factory=dict, help="overrides of the arms' recipe (evals.filtering.alignment.ARM_DEFAULTS)")
    train_arms: bool = option(True, help="train the alignment arms (False: detection only)")
    progress: bool = option(True, help="progress bars")


@dataclass
class Experiment:
    """What the experiment found: detection per regime and scorer, the arms, the paths."""

    detection: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    filters: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    arms: dict[str, ArmResult] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"detection": self.detection, "filters": self.filters,
                "arms": {k: v.as_dict() for k, v in self.arms.items()}}


def _world(folder: Path, config: ShapesWorldConfig, n: int, shard_size: int, progress: bool) -> Path:
    if not (folder / "world.json").is_file():
        write_world(config, folder, n=n, shard_size=shard_size, overwrite=True, progress=progress)
    return folder


def _extract(model: str, data: Path, out: Path, hook: str, tokens: str, limit: int, progress: bool) -> Path:
    manifest = out / "manifest.json"
    if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
        extract(ExtractConfig(model=model, data=str(data), out=str(out), hook=hook, tokens=tokens, limit=limit,
                              batch_size=128, progress=progress, overwrite=out.exists()))
    return out


def _train_sae(out: Path, arch: str, sae: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int,
               progress: bool) -> Path:
    if not (out / "training.json").is_file():
        run = load_run_config(None, base={"arch": arch, "sae": sae, "data": data, "out": str(out),
                                          "train": {"steps": steps, "batch_size": batch_size, "lr": 2e-3,
                                                    "checkpoint_every": 0, "progress": progress, "eval_rows": 2048,
                                                    "tensorboard": False}})
        run_training(run, resume=(out / "checkpoint").is_dir())
    return out


def scoring_models(config: ExperimentConfig, regime: str, world: Path, clean: Path, full_arm: Path | None
                   ) -> dict[str, tuple[str, str]]:
    """scorer family -> (model spec, SAE run) of a regime, training the SAEs it needs first."""
    out = Path(config.out) / regime
    clip = "shapes-clip" if regime == "pretrained" else f"open_clip:{full_arm}"
    source = clean if regime == "pretrained" else world
    limit = config.clean_pairs if regime == "pretrained" else config.pairs
    needs_vl = any(s in config.scorers for s in ("vl-overlap", "vl-jaccard"))
    needs_tokens = any(s in config.scorers for s in TOKEN_SCORERS)
    models = {"clip": (clip, "")}
    if needs_vl:
        acts = _extract(clip, source, out / "clip-acts", "final", "cls", limit, config.progress)
        models["vl"] = (clip, str(_train_sae(out / "vl-sae", "vl", {"n_latents": 40, "k": 20}, {"acts": str(acts)},
                                             config.sae_steps, 256, config.progress)))
    if needs_tokens:
        acts = _extract("shapes-llava", source, out / "llava-acts", LLAVA_HOOK, "all", config.token_pairs, config.progress)
        models["tokens"] = ("shapes-llava", str(_train_sae(out / "token-sae", "batchtopk", {"n_latents": 256, "k": 8},
                                                           {"acts": str(acts), "modality": "image+text"},
                                                           config.sae_steps, 1024, config.progress)))
    return models


def _filter(config: ExperimentConfig, name: str, scorer: str, model: str, sae: str, world: Path) -> dict[str, Any]:
    out = Path(config.out) / "filtered" / name
    record = out / "experiment.json"
    if record.is_file():
        return json.loads(record.read_text())
    result = run_filter(FilterConfig(scorer=scorer, model=model, sae=sae, data=str(world), keep=config.keep,
                                     out=str(out), overwrite=True, progress=config.progress, batch_size=128))
    keep = {k: result[k] for k in ("counts", "threshold", "timing", "detection", "index", "scorer_fit")}
    record.write_text(json.dumps(keep, indent=1))
    return keep


def run_experiment(config: ExperimentConfig, log: Callable[[str], None] = print) -> Experiment:
    """Every step of the module docstring; returns (and writes ``out/experiment.json``) what it found."""
    root = Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    noisy = ShapesWorldConfig(seed=config.seed, noise=config.noise)
    world = _world(root / "world", noisy, config.pairs, config.shard_size, config.progress)
    clean = _world(root / "clean", ShapesWorldConfig(seed=config.seed + 1), config.clean_pairs, config.shard_size,
                   config.progress)
    found = Experiment()
    arms_world = ShapesWorldConfig(seed=config.seed)  # held-out scenes of the same world, clean
    full_arm = root / "arms" / "full"
    if config.train_arms or "bootstrap" in config.regimes:
        log("arm: all pairs")
        found.arms["full"] = train_arm("full", world, full_arm, arms_world, config.arm, config.progress)
    for regime in config.regimes:
        models = scoring_models(config, regime, world, clean, full_arm)
        arms = ["random"] if regime == config.regimes[0] else []
        for scorer in [*arms, *config.scorers]:
            family = "clip" if scorer == "clipscore" else "vl" if scorer in CLIP_SCORERS else "tokens"
            model, sae = models.get(family, ("", "")) if scorer != "random" else ("", "")
            name = "random" if scorer == "random" else f"{regime}-{scorer}"
            log(f"filter: {name}")
            summary = _filter(config, name, scorer, model, sae, world)
            found.filters.setdefault(regime, {})[scorer] = summary
            found.detection.setdefault(regime, {})[scorer] = summary["detection"]
            if config.train_arms:
                log(f"arm: {name}")
                found.arms[name] = train_arm(name, root / "filtered" / name, root / "arms" / name, arms_world,
                                             config.arm, config.progress)
    (root / "experiment.json").write_text(json.dumps({"config": to_dict(config), **found.as_dict()}, indent=1))
    return found
