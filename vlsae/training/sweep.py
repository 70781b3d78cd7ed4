"""Sweeps: many SAEs trained on one stream of batches, read once.

    vlsae train --data acts.safetensors --sweep sae.k=16,32,64 --sweep sae.n_latents=4096,8192 --out runs/s
    # or in the run config:  sweep: {sae.k: [16, 32, 64], sae.n_latents: [4096, 8192]}

trains every combination (the cartesian product, in the order the keys were given) in one pass: each
batch is read from the source once and handed to every SAE in turn. Reading activations (a cache on
disk, a tensor file) is the costly part of a small SAE's step, so N SAEs cost far less than N runs.

Each SAE of a sweep (an "arm") is a :class:`vlsae.training.trainer.Trainer` of its own: its own optimizer,
schedule, dead-latent counters, RNG states, logs and checkpoint, in its own run folder ``OUT/k=16,n_latents=4096``
(with its ``run.yaml``, so it is also an ordinary run: ``vlsae info``, ``load_sae``). It ends as the same SAE
trained alone with the same config would, to float order: the arms see the same batches, the same init
sample and the same seeds, and each arm's generators are set around its own steps. What one sample gives
every arm alike is computed once: the init rows (per ``train.init_rows``), the decoder-bias centre (per
b_dec_init and input scale), the evaluation rows. At the end ``OUT/sweep.json`` and ``OUT/sweep.md`` compare
the arms (FVU, L0, dead fraction, seconds); ``OUT/sweep.yaml`` holds the sweep for ``--resume``.

What can vary: ``arch``, any ``sae.*`` key, and the train keys that change one SAE's optimisation alone
(:data:`SWEEPABLE_TRAIN`). What cannot: ``data.*``, ``align.*`` and ``readout.*`` (one stream, one readout) and
every other ``train.*`` key: steps, batch_size and seed fix the stream the arms share in lock-step, and the
rest (device, checkpoint_every, log_every, eval_rows, progress, tensorboard) are the sweep's, not an arm's.

Every arm checkpoints at the same steps. ``--resume`` continues each arm from its own checkpoint; arms that
finished are kept, arms whose checkpoint is ahead (a crash between two arms' checkpoints) wait for the
stream to reach them. Under torchrun a sweep runs data-parallel like one run (every arm on every rank).
"""
from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlsae.alignment import AlignedSAE
from vlsae.checkpoint import load_sae
from vlsae.config import apply_overrides, load_yaml, to_dict
from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_text
from vlsae.saes import get_sae_class
from vlsae.training.distributed import check_data_parallel, rank_device, setup
from vlsae.training.log import format_value
from vlsae.training.preflight import CHECKPOINT_DIR, TRAINING_JSON, check_compatible, check_out_dir, check_readout
from vlsae.training.run import RunConfig, merge_config, build_sae, prepare_data, run_config_from_dict, write_run_yaml
from vlsae.training.steps import check_finite, evaluation_rows, rng_state, seed_everything, set_rng_state
from vlsae.training.trainer import TrainResult, Trainer

SWEEP_YAML = "sweep.yaml"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
SWEEPABLE_TRAIN = ("lr", "betas", "adam_eps", "warmup_steps", "decay_fraction", "grad_clip", "b_dec_init", "init_rows",
                   "normalize_input", "dead_tokens", "selection_dtype", "autocast_bf16")
TABLE_KEYS = ("fvu", "l0", "dead_fraction", "seconds")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class Arm:
    """One SAE of a sweep: its folder name, the values it takes on the sweep's keys, its run config."""

    name: str
    values: dict[str, Any]
    run: RunConfig


@dataclass
class SweepResult:
    """results: one per arm, in sweep order; summary: what ``sweep.json`` holds."""

    out_dir: Path
    arms: list[Arm]
    results: list[TrainResult]
    summary: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ the sweep's keys
def parse_sweep_flags(items: list[str]) -> dict[str, list[Any]]:
    """``["sae.k=16,32", "train.betas=[0.9,0.99],[0.9,0.999]"]`` -> ``{"sae.k": [16, 32], "train.betas": [...]}``.
    Values are comma-separated and read as YAML (a list value in brackets); a later flag for a key wins."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise VlsaeError(f"--sweep '{item}' must look like KEY=V1,V2,..., e.g. --sweep sae.k=16,32,64")
        try:
            values = yaml.safe_load(f"[{raw}]")
        except yaml.YAMLError:
            values = [v.strip() for v in raw.split(",") if v.strip()]
        out[key] = [float(v) if isinstance(v, str) and _NUMBER.fullmatch(v) else v for v in values]  # YAML reads 1e-3 as text
    return out


def sweep_section(section: Any) -> dict[str, list[Any]]:
    """The ``sweep:`` section of a run config: ``{key: [values]}`` with dotted keys (nested mappings are
    flattened: ``{sae: {k: [16, 32]}}`` is ``sae.k``); a single value is a one-value list."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise VlsaeError("'sweep' in the run config must be a mapping of keys to lists of values, e.g. sweep: {sae.k: [16, 32]}")
    out: dict[str, list[Any]] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in sweep_section(value).items()})
        else:
            out[str(key)] = list(value) if isinstance(value, (list, tuple)) else [value]
    return out


def check_axes(axes: dict[str, list[Any]]) -> None:
    """One-line errors for a key that cannot vary in one pass or has no values (unknown keys are left to
    the run config, whose error names the closest valid key)."""
    for key, values in axes.items():
        section, _, rest = key.partition(".")
        if not values:
            raise VlsaeError(f"--sweep {key} has no values; give at least one, e.g. --sweep {key}=V1,V2")
        if key == "arch" or (section == "sae" and rest):
            continue
        if section == "train" and rest in SWEEPABLE_TRAIN:
            continue
        if section == "train" and rest:
            why = ("every SAE of a sweep reads the same stream of batches in lock-step (train.steps, batch_size, seed)"
                   if rest in ("steps", "batch_size", "seed") else "it is the sweep's setting, the same for every SAE")
            raise VlsaeError(f"{key} cannot vary within one sweep: {why}; the train keys that can: "
                             f"{', '.join(SWEEPABLE_TRAIN)}")
        if section in ("data", "align", "readout", "out"):
            raise VlsaeError(f"{key} cannot vary within one sweep: every SAE of a sweep reads the same data "
                             f"(data.*, align.*, readout.*, out are the sweep's); run one sweep per value instead")


def _label(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).split("\n")[0]
    if isinstance(value, (list, tuple)):
        return "-".join(_label(v) for v in value)
    return str(value)


def arm_names(combos: list[dict[str, Any]]) -> list[str]:
    """Folder names ``k=16,n_latents=4096``: the last part of each key (the whole key where two share it),
    values as written; anything but letters, digits and ``._+-`` becomes ``_``; duplicates get -2, -3..."""
    keys = list(combos[0]) if combos else []
    short = [k.rsplit(".", 1)[-1] for k in keys]
    labels = [k if short.count(s) > 1 else s for k, s in zip(keys, short)]
    names: list[str] = []
    for i, combo in enumerate(combos):
        parts = [f"{label}={_label(combo[k])}" for label, k in zip(labels, keys)]
        name = ",".join(re.sub(r"[^A-Za-z0-9._+\-]", "_", p.split("=", 1)[0]) + "=" +
                        re.sub(r"[^A-Za-z0-9._+\-]", "_", p.split("=", 1)[1]) for p in parts) or "arm"
        if len(name) > 120 or name.startswith("."):
            name = f"arm-{i + 1:03d}"
        base, n = name, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def _set(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise VlsaeError(f"--sweep {key}: '{part}' is not a section")
        else:
            child = node[part] = dict(child)
        node = child
    node[parts[-1]] = value
    return out


def expand(base: dict[str, Any], axes: dict[str, list[Any]], out: str | Path) -> list[Arm]:
    """Every combination of the axes' values on top of ``base``: one :class:`Arm` each, its run folder under ``out``."""
    check_axes({k: v for k, v in axes.items() if not v})  # no values: said before any config is built
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    arms = []
    for name, combo in zip(arm_names(combos), combos):
        data = dict(base)
        for key, value in combo.items():
            data = _set(data, key, value)
        data["out"] = str(Path(out) / name)
        arms.append(Arm(name, combo, run_config_from_dict(data)))  # an unknown key: the "did you mean" error
    check_axes(axes)
    return arms


def load_sweep(path: str | Path | None, overrides: list[str], sweeps: list[str],
               base: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """YAML file (optional, its ``sweep:`` section taken out) + a base mapping + ``key=value`` overrides, and the
    sweep's axes (the section's, then ``--sweep`` flags'): ``(run-config mapping, axes)``. No axes: not a sweep;
    the mapping is then exactly what :func:`vlsae.training.run.load_run_config` builds its RunConfig from."""
    data: dict[str, Any] = dict(base or {})
    section = None
    if path is not None:
        loaded = load_yaml(path)
        section = loaded.pop("sweep", None)
        data = merge_config(loaded, data)
    data = apply_overrides(data, overrides)
    axes = sweep_section(section)
    axes.update(parse_sweep_flags(sweeps))
    return data, axes


def is_sweep_dir(out: str | Path) -> bool:
    return (Path(out) / SWEEP_YAML).is_file()


def saved_sweep(out: str | Path) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """(base run-config mapping, axes) of the sweep in ``out`` (for ``--resume``)."""
    record = load_yaml(Path(out) / SWEEP_YAML)
    if not isinstance(record.get("base"), dict) or not isinstance(record.get("axes"), dict):
        raise VlsaeError(f"{Path(out) / SWEEP_YAML} is damaged (no base or axes); start a new sweep with another --out")
    return record["base"], record["axes"]


def _check_sweep_dir(out: Path, resume: bool) -> None:
    if not resume:
        check_out_dir(out, resume=False)  # a sweep folder is never a run folder
    if resume:
        if not is_sweep_dir(out):
            raise VlsaeError(f"no sweep to resume in {out} (no {SWEEP_YAML}); start it without --resume")
        if (out / SWEEP_JSON).exists():
            raise VlsaeError(f"the sweep in {out} already finished; nothing to resume (start another with a new --out)")
    elif is_sweep_dir(out):
        raise VlsaeError(f"{out} holds a sweep; pass --resume to continue it or choose another --out")


# ------------------------------------------------------------------ the run
def run_sweep(base: dict[str, Any], axes: dict[str, list[Any]], out: str | Path, resume: bool = False) -> SweepResult:
    """Train every arm of the sweep on one stream of batches; write each run folder, ``sweep.json`` and ``sweep.md``.

    base: a run-config mapping (as :func:`load_sweep` returns it); axes: key -> values. Under torchrun every
    rank calls this with the same arguments (data-parallel, as :func:`vlsae.training.trainer.train`)."""
    out = Path(out)
    _check_sweep_dir(out, resume)
    arms = expand(base, axes, out)
    first = arms[0].run
    for arm in arms:
        check_readout(get_sae_class(arm.run.arch), bool(arm.run.readout))
    device = rank_device(first.train.device)
    replicas = setup(device)
    main = replicas.is_main
    fresh = not out.exists()
    if main and not resume:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / SWEEP_YAML, yaml.safe_dump({"base": {k: v for k, v in base.items() if k != "out"},
                                                            "axes": axes}, sort_keys=False))
    try:
        return _train_arms(arms, axes, out, replicas, device, resume)
    except VlsaeError:
        if main and fresh and not any((out / a.name / CHECKPOINT_DIR).exists() for a in arms):
            shutil.rmtree(out, ignore_errors=True)  # bad data found before any checkpoint: leave no sweep behind
        raise


def _train_arms(arms: list[Arm], axes: dict[str, list[Any]], out: Path, replicas: Any, device: Any,
                resume: bool) -> SweepResult:
    began = time.perf_counter()
    first = arms[0].run
    config = first.train
    data = prepare_data(first, archs=[a.run.arch for a in arms])
    source = data.source
    finished: dict[str, TrainResult] = {}
    trainers: dict[str, Trainer] = {}
    readouts: dict[str, Any] = {}
    for arm in arms:
        folder = Path(arm.run.out)  # type: ignore[arg-type]
        if resume and (folder / TRAINING_JSON).exists():
            summary = json.loads((folder / TRAINING_JSON).read_text())["summary"]
            finished[arm.name] = TrainResult(sae=load_sae(folder), summary=summary, out_dir=folder)
            continue
        has_checkpoint = resume and (folder / CHECKPOINT_DIR).is_dir()
        check_out_dir(folder, has_checkpoint)
        sae, readout = build_sae(arm.run, data, readouts.get(json.dumps(arm.run.readout, sort_keys=True)))
        if readout is not None:
            readouts[json.dumps(arm.run.readout, sort_keys=True)] = readout
        check_compatible(sae, source)
        check_readout(sae, readout is not None, paired=isinstance(source.d_in, dict))
        if data.held_out is not None:
            check_compatible(sae, data.held_out, what="the held-out data")
        check_data_parallel(sae, config.batch_size, replicas.world)
        by_gradient = getattr(sae, "trains_by_gradient", True)
        total = config.steps if by_gradient else min(config.steps, max(1, len(source) // config.batch_size))
        trainer = Trainer(sae, arm.run.train, replicas, device, out=folder, readout=readout, total_steps=total,
                          own_rng=True, own_clock=True)
        trainer.resume = has_checkpoint  # type: ignore[attr-defined]
        trainers[arm.name] = trainer
        if replicas.is_main and not has_checkpoint:
            write_run_yaml(folder, arm.run)

    seed_everything(config.seed)
    samples: dict[int, Any] = {}
    centers: dict[int, dict[Any, Any]] = {}
    read = 0.0
    state = None
    for arm in arms:
        if arm.name not in trainers:
            continue
        trainer, rows = trainers[arm.name], arm.run.train.init_rows
        if rows not in samples:
            t0 = time.perf_counter()
            samples[rows] = source.sample(rows, seed=config.seed)
            read += time.perf_counter() - t0
            check_finite(samples[rows], "in the rows sampled for initialisation")
            centers[rows] = {}
            state = state or rng_state(device)
        set_rng_state(state, device)  # type: ignore[arg-type]  (every arm starts from the state it has alone)
        trainer.initialise(samples[rows], centers[rows])
        trainer.start(trainer.resume)  # type: ignore[attr-defined]
    samples.clear()

    live = [t for t in trainers.values() if not t.finished]
    step = min((t.step_index for t in live), default=0)
    bar = None
    if config.progress and replicas.is_main and live:
        from tqdm.auto import tqdm
        bar = tqdm(total=max(t.total_steps for t in live), initial=step, desc=f"sweep of {len(arms)} SAEs", unit="step",
                   dynamic_ncols=True)
    try:
        if live:
            batches = replicas.batches(source, config.batch_size, seed=config.seed, start=step)
        while any(not t.finished for t in live):
            t0 = time.perf_counter()
            raw = next(batches)
            read += time.perf_counter() - t0
            for trainer in live:
                if not trainer.finished and trainer.step_index == step:
                    trainer.step(raw)
            step += 1
            if bar is not None:
                bar.update(1)
    finally:
        for trainer in trainers.values():
            trainer.close()
        if bar is not None:
            bar.close()

    results: list[TrainResult] = []
    if trainers:
        held = data.held_out if data.held_out is not None else source
        t0 = time.perf_counter()
        rows = evaluation_rows(held, config, device)
        read += time.perf_counter() - t0
        split = "held-out" if data.held_out is not None else "training sample"
    for arm in arms:
        if arm.name in finished:
            results.append(finished[arm.name])
            continue
        metadata = {**data.metadata, "sweep": {"folder": str(out), "values": arm.values}}
        result = trainers[arm.name].finish(rows, split, metadata)
        if data.projector is not None:
            if replicas.is_main:
                data.projector.save(Path(arm.run.out))  # type: ignore[arg-type]
            result.sae = AlignedSAE(result.sae, data.projector)  # type: ignore[assignment]
        results.append(result)
    replicas.barrier()
    summary = _summary(arms, results, axes, config, time.perf_counter() - began, read, replicas.world)
    if replicas.is_main:
        atomic_write_text(out / SWEEP_MD, format_table(summary) + "\n")
        atomic_write_text(out / SWEEP_JSON, json.dumps(summary, indent=2, default=str))  # marks the sweep finished
    replicas.barrier()
    return SweepResult(out_dir=out, arms=arms, results=results, summary=summary)


def _summary(arms: list[Arm], results: list[TrainResult], axes: dict[str, list[Any]], config: Any, seconds: float,
             read: float, world: int) -> dict[str, Any]:
    rows = []
    for arm, result in zip(arms, results):
        s = result.summary
        rows.append({"name": arm.name, "path": str(result.out_dir), "values": arm.values, "arch": s.get("arch"),
                     "n_latents": s.get("n_latents"), **{k: s.get(k) for k in TABLE_KEYS}, "summary": s})
    return {"axes": axes, "arms": rows, "steps": config.steps, "batch_size": config.batch_size, "seed": config.seed,
            "seconds": round(seconds, 2), "read_seconds": round(read, 2), "world_size": world,
            "note": "seconds per arm: its own steps; read_seconds: reading the shared stream, once for every arm"}


def format_table(summary: dict[str, Any]) -> str:
    """The markdown table of a sweep: one row per arm, its values and FVU, L0, dead fraction, seconds."""
    keys = list(summary["axes"])
    head = ["arm", *keys, *TABLE_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["arms"]:
        cells = [row["name"], *[_label(row["values"].get(k)) for k in keys],
                 *[format_value(row[k]) if row[k] is not None else "" for k in TABLE_KEYS]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{len(summary['arms'])} SAEs, {summary['steps']} steps of {summary['batch_size']} rows, one read of the "
                 f"stream: {summary['seconds']} s in all, {summary['read_seconds']} s of it reading")
    return "\n".join(lines)
