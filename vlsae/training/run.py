"""Run configs: one YAML file (or CLI flags) describing a whole training run.

    arch: topk
    sae: {n_latents: 512, k: 16}          # the architecture's config minus d_in (taken from the data)
    data: {path: acts.safetensors}        # or {synthetic: hierarchical, n_train: 50000}, or {acts: DIR, modality: image}
    train: {steps: 3000, batch_size: 1024}
    align: {steps: 0}                     # > 0 trains the contrastive alignment stage first (paired data)
    out: runs/a

``vlsae train --set sae.k=16`` overrides any key. The run config is saved as
``run.yaml`` in the run folder, so ``vlsae train --out runs/a --resume`` needs
nothing else. Only ``path`` data is resolved here; the CLI resolves synthetic
suites and activation caches (which live in ``evals`` and ``multimodal``) and
passes the source in, keeping this package free of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from vlsae.checkpoint import CONFIG, atomic_write_text, read_config
from vlsae.config import apply_overrides, from_dict, load_yaml, option, to_dict
from vlsae.errors import VlsaeError
from vlsae.saes import create_sae, get_sae_class
from vlsae.training.config import TrainConfig
from vlsae.training.data import ActivationSource, open_tensor_file
from vlsae.training.trainer import TRAINING_JSON, TrainResult, train

RUN_YAML = "run.yaml"


@dataclass
class DataSpec:
    path: str | None = option(None, help="a .safetensors or .npy tensor file (one tensor, or tensors named by modality)")
    acts: str | None = option(None, help="an activation cache folder written by `vlsae extract`")
    modality: str | None = option(None, help="train on one modality of paired data (e.g. image) with a single-stream SAE")
    synthetic: str | None = option(None, help="a planted-feature suite: independent, hierarchical, bidirectional, multimodal")
    preset: str | None = option(None, help="preset of the synthetic suite")
    n_train: int = option(50_000, help="rows drawn from the synthetic suite")
    seed: int = option(0, help="seed of the synthetic suite")
    noise: float = option(0.0, help="noise sigma of the synthetic suite")
    options: dict = option(factory=dict, help="extra options of the synthetic suite, e.g. {correlation: 0.3}")

    def __post_init__(self) -> None:
        given = [name for name in ("path", "acts", "synthetic") if getattr(self, name)]
        if len(given) > 1:
            raise VlsaeError(f"data has both '{given[0]}' and '{given[1]}'; give exactly one source")


@dataclass
class AlignSpec:
    steps: int = option(0, help="steps of the contrastive alignment stage before the SAE (0: off)")
    d_shared: int = option(0, help="width of the shared space (0: the largest modality width)")
    similarity: str = option("cosine", help="cosine (default) or dot (the released VL-SAE code)")
    batch_size: int = option(512, help="pairs per alignment batch")
    lr: float = option(1e-3, help="alignment learning rate")


@dataclass
class RunConfig:
    arch: str = option("topk", help="SAE architecture (see `vlsae train --help` for the registry)")
    sae: dict = option(factory=dict, help="the architecture's config, without d_in")
    data: DataSpec = option(factory=DataSpec, help="where activations come from")
    train: TrainConfig = option(factory=TrainConfig, help="how to train")
    align: AlignSpec = option(factory=AlignSpec, help="the alignment stage for unaligned paired data")
    out: str | None = option(None, help="run folder (checkpoints, logs, final SAE)")


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data)
    sections = {"data": DataSpec, "train": TrainConfig, "align": AlignSpec}
    for name, cls in sections.items():
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise VlsaeError(f"'{name}' in the run config must be a mapping")
        data[name] = from_dict(cls, value, where=name)
    if not isinstance(data.get("sae") or {}, dict):
        raise VlsaeError("'sae' in the run config must be a mapping")
    run = from_dict(RunConfig, data, where="run config")
    get_sae_class(run.arch)
    if "d_in" in run.sae:
        raise VlsaeError("sae.d_in comes from the data; remove it from the config")
    return run


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None) -> RunConfig:
    """YAML file (optional) + a base mapping + ``section.key=value`` overrides -> RunConfig."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        loaded = load_yaml(path)
        data = _merge(loaded, data)
    data = apply_overrides(data, overrides or [])
    return run_config_from_dict(data)


def _merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def saved_run_config(out: str | Path) -> dict[str, Any] | None:
    """The run.yaml of a run folder, if any (for ``--resume`` with no other arguments)."""
    path = Path(out) / RUN_YAML
    return load_yaml(path) if path.is_file() else None


def resolve_path_source(spec: DataSpec) -> ActivationSource:
    if spec.path:
        return open_tensor_file(spec.path)
    raise VlsaeError("no training data: give data.path (a tensor file), data.acts (an activation cache) or data.synthetic")


def run_training(run: RunConfig, resume: bool = False,
                 resolve_data: Callable[[DataSpec], ActivationSource] = resolve_path_source) -> TrainResult:
    """Build the SAE from the run config and the data's width, train it, save it to ``run.out``."""
    source = resolve_data(run.data)
    metadata: dict[str, Any] = {"data": to_dict(run.data)}
    projector = None
    if run.align.steps:
        from vlsae.alignment import ProjectedSource, ProjectorTrainConfig, train_projector
        projector, align_summary = train_projector(
            source, ProjectorTrainConfig(steps=run.align.steps, batch_size=run.align.batch_size, lr=run.align.lr,
                                         seed=run.train.seed, device=run.train.device, progress=run.train.progress),
            d_shared=run.align.d_shared, similarity=run.align.similarity)
        metadata["alignment"] = align_summary
        if run.train.progress:
            print(f"alignment stage: in-batch retrieval accuracy {align_summary['retrieval_acc_before']:.3f} -> "
                  f"{align_summary['retrieval_acc_after']:.3f}")
        source = ProjectedSource(source, projector)
    widths = source.d_in
    if isinstance(widths, dict):
        distinct = set(widths.values())
        if len(distinct) != 1:
            raise VlsaeError(f"the modalities have different widths ({widths}); enable the alignment stage "
                             "(align.steps > 0, or --align-steps) to project them into one space")
        d_in = distinct.pop()
        sae_values = {"modalities": list(widths), **run.sae} if "modalities" in get_sae_class(run.arch).config_class.__dataclass_fields__ else dict(run.sae)
    else:
        d_in = widths
        sae_values = dict(run.sae)
    torch.manual_seed(run.train.seed)  # the SAE's initial weights are part of the run's seed
    sae = create_sae(run.arch, {**sae_values, "d_in": d_in})
    out = Path(run.out) if run.out else None
    if out is not None and not resume:
        _write_run_yaml(out, run)
    result = train(sae, source, run.train, out_dir=out, resume=resume, metadata=metadata)
    if projector is not None:
        from vlsae.alignment import AlignedSAE
        if out is not None:
            projector.save(out)
        result.sae = AlignedSAE(result.sae, projector)  # type: ignore[assignment]
    return result


def _write_run_yaml(out: Path, run: RunConfig) -> None:
    if (out / TRAINING_JSON).exists() or (out / "checkpoint").exists():
        return  # the trainer refuses with the right message
    record = {"arch": run.arch, "sae": run.sae, "data": to_dict(run.data), "train": to_dict(run.train),
              "align": to_dict(run.align), "out": run.out}
    atomic_write_text(out / RUN_YAML, yaml.safe_dump(record, sort_keys=False))


def describe_run(path: str | Path) -> dict[str, Any]:
    """Architecture, sizes, training summary and metrics of a run or checkpoint folder."""
    path = Path(path)
    record = read_config(path)
    info: dict[str, Any] = {"path": str(path), "arch": record["arch"]}
    config = record["config"]
    info["d_in"] = config.get("d_in")
    info["n_latents"] = config.get("n_latents")
    info["config"] = config
    training = path / TRAINING_JSON
    if training.is_file():
        try:
            info["training"] = json.loads(training.read_text())
        except json.JSONDecodeError as exc:
            raise VlsaeError(f"{training} is damaged ({exc.msg})") from None
    elif (path / "checkpoint").is_dir():
        info["status"] = "interrupted: resume with vlsae train --out " + str(path) + " --resume"
    weights = path / "sae.safetensors"
    info["weights_bytes"] = weights.stat().st_size if weights.exists() else None
    info["alignment_stage"] = (path / "projector.safetensors").exists()
    if not weights.exists():
        raise VlsaeError(f"{path} has {CONFIG} but no sae.safetensors; the checkpoint is incomplete")
    return info
