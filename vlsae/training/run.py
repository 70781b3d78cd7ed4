"""Run configs: one YAML file (or CLI flags) describing a whole training run.

    arch: topk
    sae: {n_latents: 512, k: 16}          # the architecture's config minus d_in (taken from the data)
    data: {path: acts.safetensors}        # or {synthetic: hierarchical, n_train: 50000}, or {acts: DIR, modality: image}
                                          # path data: the last `held_out` fraction is kept for the final metrics
    train: {steps: 3000, batch_size: 1024}
    align: {steps: 0}                     # > 0 trains the contrastive alignment stage first (paired data)
    readout: {kind: planted, feature: 0}  # optional downstream readout (g-SAE needs one): linear, planted, zeroshot
    out: runs/a

``vlsae train --set sae.k=16`` overrides any key. The run config is saved as
``run.yaml`` in the run folder, so ``vlsae train --out runs/a --resume`` needs
nothing else. The ``data`` section is turned into activations by the data-source
registry (:mod:`vlsae.training.sources`), the same way for every caller; the
``readout`` section names a registered readout (:mod:`vlsae.training.readout`)
built once the data's width is known.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from vlsae.alignment import AlignedSAE, ProjectedSource, ProjectorTrainConfig, train_projector
from vlsae.checkpoint import CONFIG, read_config
from vlsae.config import apply_overrides, from_dict, load_yaml, option, to_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_text, looks_like_pickle
from vlsae.saes import SAE, create_sae, get_sae_class, is_multimodal_arch, list_archs
from vlsae.training.config import TrainConfig, init_seed
from vlsae.training.distributed import is_main_process, rank_device, setup
from vlsae.training.readout import ReadoutLike, build_readout
from vlsae.training.data import ActivationSource
from vlsae.training.sources import DataSpec, resolve_data
from vlsae.training.preflight import check_readout
from vlsae.training.trainer import CHECKPOINT_DIR, TRAINING_JSON, TrainResult, check_out_dir, train

RUN_YAML = "run.yaml"


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
    readout: dict = option(factory=dict, help="downstream readout {kind: NAME, ...} (linear, planted, zeroshot); g-SAE needs one")
    out: str | None = option(None, help="run folder (checkpoints, logs, final SAE)")


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data)
    sections = {"data": DataSpec, "train": TrainConfig, "align": AlignSpec}
    for name, cls in sections.items():
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise VlsaeError(f"'{name}' in the run config must be a mapping")
        data[name] = from_dict(cls, value, where=name)
    for name in ("sae", "readout"):
        if not isinstance(data.get(name) or {}, dict):
            raise VlsaeError(f"'{name}' in the run config must be a mapping")
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
        data = merge_config(loaded, data)
    data = apply_overrides(data, overrides or [])
    return run_config_from_dict(data)


def merge_config(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def saved_run_config(out: str | Path) -> dict[str, Any] | None:
    """The run.yaml of a run folder, if any (for ``--resume`` with no other arguments)."""
    path = Path(out) / RUN_YAML
    return load_yaml(path) if path.is_file() else None


@dataclass
class PreparedData:
    """A run config's data made ready for SAEs: the training source (projected when the run has an
    alignment stage), held-out rows, where the activations came from, the projector and the metadata."""

    source: ActivationSource
    held_out: ActivationSource | None
    hook: str
    metadata: dict[str, Any]
    projector: Any = None


def prepare_data(run: RunConfig, archs: list[str] | None = None) -> PreparedData:
    """Resolve ``run.data`` and train the alignment stage if the run has one; ``archs``: the architectures
    that will read it (default ``[run.arch]``), each checked against the data before the alignment stage."""
    resolved = resolve_data(run.data)
    source, held_out = resolved.train, resolved.held_out
    for arch in archs or [run.arch]:
        if isinstance(source.d_in, dict) and not is_multimodal_arch(arch):
            multi = ", ".join(a for a in list_archs() if is_multimodal_arch(a))
            raise VlsaeError(f"the data is paired ({', '.join(source.d_in)}) but '{arch}' is a single-stream SAE; "
                             f"train on one modality (--modality {next(iter(source.d_in))}) or use a multimodal "
                             f"architecture ({multi})")
    metadata: dict[str, Any] = {"data": to_dict(run.data)}
    projector = None
    main = is_main_process()  # under torchrun only rank 0 writes the run folder and prints
    if run.align.steps:
        device = rank_device(run.train.device)
        projector, align_summary = train_projector(
            source, ProjectorTrainConfig(steps=run.align.steps, batch_size=run.align.batch_size, lr=run.align.lr,
                                         seed=run.train.seed, device=str(device), progress=run.train.progress and main),
            d_shared=run.align.d_shared, similarity=run.align.similarity)
        setup(device).broadcast_module(projector)  # every rank trained the same stage; rank 0's copy is the one kept
        metadata["alignment"] = align_summary
        if run.train.progress and main:
            print(f"alignment stage: in-batch retrieval accuracy {align_summary['retrieval_acc_before']:.3f} -> "
                  f"{align_summary['retrieval_acc_after']:.3f}")
        source = ProjectedSource(source, projector)
        if held_out is not None:
            held_out = ProjectedSource(held_out, projector)
    return PreparedData(source, held_out, resolved.hook, metadata, projector)


def build_sae(run: RunConfig, data: PreparedData, readout: ReadoutLike | None = None) -> tuple[SAE, ReadoutLike | None]:
    """The run's SAE at the data's width, its initial weights seeded by the run's seed, and its readout
    (``readout`` when given, else the config's ``readout`` section built, else None)."""
    widths = data.source.d_in
    if isinstance(widths, dict):
        distinct = set(widths.values())
        if len(distinct) != 1:
            raise VlsaeError(f"the modalities have different widths ({widths}); enable the alignment stage "
                             "(align.steps > 0, or --align-steps) to project them into one space")
        d_in = distinct.pop()
        sae_values = {"modalities": list(widths), **run.sae}
    else:
        d_in = widths
        sae_values = dict(run.sae)
    torch.manual_seed(init_seed(run.train.seed))  # the SAE's initial weights follow the run's seed, not the data's stream
    if data.hook and not sae_values.get("hook"):
        sae_values["hook"] = data.hook
    sae = create_sae(run.arch, {**sae_values, "d_in": d_in})
    if readout is None and run.readout:
        check_readout(sae, True, paired=isinstance(widths, dict))
        readout = build_readout(run.readout, run.data, d_in)
    return sae, readout


def run_training(run: RunConfig, resume: bool = False, readout: ReadoutLike | None = None) -> TrainResult:
    """Build the SAE from the run config and the data's width, train it, save it to ``run.out``.

    readout: a readout object (module or function of the activations) that takes the place of the
    config's ``readout`` section, for Python callers whose readout is not a registered kind."""
    out = Path(run.out) if run.out else None
    check_out_dir(out, resume)  # before any data is read or run.yaml written
    check_readout(get_sae_class(run.arch), bool(run.readout) or readout is not None)
    data = prepare_data(run)
    main = is_main_process()
    sae, readout = build_sae(run, data, readout)
    fresh_folder = main and out is not None and not resume and not out.exists()
    if out is not None and not resume and main:
        write_run_yaml(out, run)
    try:
        result = train(sae, data.source, run.train, out_dir=out, resume=resume, metadata=data.metadata,
                       eval_source=data.held_out, readout=readout)
    except VlsaeError:
        # bad data found before the first checkpoint (NaN rows, an empty source): leave no run behind
        if fresh_folder and out is not None and not (out / CHECKPOINT_DIR).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    if data.projector is not None:
        if out is not None and main:
            data.projector.save(out)
        result.sae = AlignedSAE(result.sae, data.projector)  # type: ignore[assignment]
    return result


def write_run_yaml(out: Path, run: RunConfig) -> None:
    record = {"arch": run.arch, "sae": run.sae, "data": to_dict(run.data), "train": to_dict(run.train),
              "align": to_dict(run.align), "readout": run.readout, "out": run.out}
    atomic_write_text(out / RUN_YAML, yaml.safe_dump(record, sort_keys=False))


def _weights_header(path: Path) -> tuple[int, int]:
    """(tensor count, parameter count) from a safetensors header, without reading the data;
    one-line errors for a missing, pickled or truncated file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise VlsaeError(f"{path.parent} has {CONFIG} but no {path.name}; the checkpoint is incomplete")
    if looks_like_pickle(path):
        raise VlsaeError(f"{path} is a pickle/torch.save file; vlsae only loads safetensors")
    try:
        with safe_open(str(path), "pt") as handle:
            shapes = [handle.get_slice(k).get_shape() for k in handle.keys()]
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlsaeError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]}); re-create it or restore a copy") from None
    params = 0
    for shape in shapes:
        n = 1
        for dim in shape:
            n *= dim
        params += n
    return len(shapes), params


def describe_run(path: str | Path) -> dict[str, Any]:
    """Architecture, sizes, training summary and metrics of a run or checkpoint folder.

    A finished run has ``training.json`` (summary, train config, input scales); an
    interrupted one is described from its ``checkpoint/`` with its progress.
    """
    path = Path(path)
    if not path.exists():
        raise VlsaeError(f"run not found: {path}")
    info: dict[str, Any] = {"path": str(path)}
    folder = path
    if path.is_dir() and not (path / CONFIG).exists() and (path / CHECKPOINT_DIR / CONFIG).exists():
        folder = path / CHECKPOINT_DIR
        try:
            state = json.loads((folder / "state.json").read_text())
            step, steps = int(state["step"]), int(state["train_config"]["steps"])
        except (OSError, ValueError, KeyError, TypeError):
            raise VlsaeError(f"{folder} is damaged (no readable state.json); start a new run with another --out") from None
        info["status"] = f"interrupted at step {step} of {steps}; continue with: vlsae train --out {path} --resume"
        info["progress"] = {"step": step, "steps": steps, "tokens": state.get("tokens")}
    record = read_config(folder)
    config = record["config"]
    info.update({"arch": record["arch"], "d_in": config.get("d_in"), "n_latents": config.get("n_latents"),
                 "config": config})
    n_tensors, n_params = _weights_header(folder / "sae.safetensors")
    info["parameters"] = n_params
    info["weights_bytes"] = (folder / "sae.safetensors").stat().st_size
    info["alignment_stage"] = (path / "projector.safetensors").exists()
    log = path / "metrics.jsonl"
    if log.is_file():
        for line in reversed(log.read_text().splitlines()):
            try:
                info["last_logged"] = json.loads(line)
                break
            except json.JSONDecodeError:
                continue  # a line torn by a crash
    training = path / TRAINING_JSON
    if training.is_file():
        try:
            info["training"] = json.loads(training.read_text())
        except json.JSONDecodeError as exc:
            raise VlsaeError(f"{training} is damaged ({exc.msg}); the weights may still load with vlsae.load_sae") from None
        if not isinstance(info["training"], dict):
            raise VlsaeError(f"{training} is damaged (not a JSON object)")
        info["status"] = "finished"
    elif "status" not in info:
        info["status"] = "SAE checkpoint (no training record)"
    return info
