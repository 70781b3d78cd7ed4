"""The SAE trainer: any architecture, any activation source.

One loop for every registered SAE. It knows nothing of where batches come
from (see ``data.py``) and nothing of the architecture beyond the base-class
contract: ``training_forward`` returns named losses that are summed, and
``before_optimizer_step``/``after_optimizer_step`` handle decoder norms.

What it adds around that contract: input scaling to E||x|| = sqrt(d) (folded
into the saved weights, so the result takes raw activations), decoder-bias
initialisation from the data, Adam with warm-up and linear decay, gradient
clipping, dead-latent tracking fed back to the SAE (AuxK), bf16 autocast on
CUDA, checkpoints that resume bit-for-bit, JSONL + TensorBoard logs, a
progress bar and an end-of-run summary.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlsae.checkpoint import atomic_write_text, replace_dir, save_sae
from vlsae.config import to_dict
from vlsae.errors import VlsaeError
from vlsae.saes.base import SAE, TrainContext, normalized_mse
from vlsae.training.config import TrainConfig
from vlsae.training.data import ActivationSource, Batch
from vlsae.training.log import MetricsLog, print_summary
from vlsae.training.metrics import evaluate, geometric_median
from vlsae.training.state import optimizer_from_flat, optimizer_to_flat, read_state, write_state

CHECKPOINT_DIR = "checkpoint"
TRAINING_JSON = "training.json"


@dataclass
class TrainResult:
    sae: SAE
    summary: dict[str, Any]
    out_dir: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VlsaeError(f"device '{name}' requested but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise VlsaeError(f"unknown device '{name}'; use auto, cpu or cuda") from None


def is_multimodal(sae: SAE) -> bool:
    return bool(getattr(sae.config, "modalities", ()))


def check_compatible(sae: SAE, source: ActivationSource) -> None:
    """One-line errors when the data cannot feed this SAE."""
    if len(source) == 0:
        raise VlsaeError("the dataset is empty: no rows to train on")
    widths = source.d_in
    if isinstance(widths, dict):
        if not is_multimodal(sae):
            raise VlsaeError(f"the data is paired ({', '.join(widths)}) but '{sae.arch}' is a single-stream SAE; "
                             "use a multimodal architecture (vl, vl-split, vl-shared) or select one modality")
        for m, w in widths.items():
            if m not in sae.config.modalities:
                raise VlsaeError(f"the data has modality '{m}' but the SAE has {list(sae.config.modalities)}")
            if w != sae.d_in:
                raise VlsaeError(f"modality '{m}' has width {w} but the SAE expects d_in={sae.d_in}")
    else:
        if is_multimodal(sae):
            raise VlsaeError(f"'{sae.arch}' trains on paired data (modalities {list(sae.config.modalities)}), "
                             "but the data is a single tensor; give paired data (e.g. an activation cache with image and text)")
        if widths != sae.d_in:
            raise VlsaeError(f"the data has width {widths} but the SAE expects d_in={sae.d_in}; build the SAE with d_in={widths}")


def _finite_or_fail(batch: Batch, where: str) -> None:
    items = batch.items() if isinstance(batch, dict) else [("activations", batch)]
    for name, t in items:
        if not torch.isfinite(t).all():
            raise VlsaeError(f"{name} contain NaN or inf ({where}); clean the data or re-extract it")


def _rows(batch: Batch) -> int:
    if isinstance(batch, dict):
        return sum(t.shape[0] for t in batch.values())
    return batch.shape[0]


def _to(batch: Batch, device: torch.device, scales: float | dict[str, float]) -> Batch:
    if isinstance(batch, dict):
        return {m: t.to(device, torch.float32, non_blocking=True) * scales[m] for m, t in batch.items()}  # type: ignore[index]
    return batch.to(device, torch.float32, non_blocking=True) * scales  # type: ignore[operator]


def estimate_scales(sae: SAE, sample: Batch) -> float | dict[str, float]:
    """c (or c per modality) with E||c x|| = sqrt(d_in)."""
    def scale(x: torch.Tensor) -> float:
        norm = float(x.float().norm(dim=1).mean())
        if norm <= 0 or not math.isfinite(norm):
            raise VlsaeError("the activations are all zero; nothing to train on")
        return math.sqrt(x.shape[1]) / norm
    if isinstance(sample, dict):
        if getattr(sae, "shared_input_scale", False):
            c = scale(torch.cat(list(sample.values())))
            return {m: c for m in sample}
        return {m: scale(x) for m, x in sample.items()}
    return scale(sample)


def _center(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "zeros":
        return torch.zeros(x.shape[1])
    if how == "mean":
        return x.float().mean(0)
    return geometric_median(x.float())


def _fold(sae: SAE, scales: float | dict[str, float]) -> None:
    if isinstance(scales, dict):
        if hasattr(sae, "fold_input_scales"):
            sae.fold_input_scales(scales)  # type: ignore[operator]
        else:
            raise VlsaeError(f"'{sae.arch}' cannot fold per-modality input scales; train it with normalize_input: false")
    else:
        sae.fold_input_scale(scales)


def _make_optimizer(sae: SAE, config: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in sae.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=lr, betas=config.betas, eps=config.adam_eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=config.betas, eps=config.adam_eps)


def _prepare_out_dir(out_dir: Path | None, resume: bool) -> None:
    if out_dir is None:
        if resume:
            raise VlsaeError("--resume needs --out pointing at the interrupted run")
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise VlsaeError(f"--out {out_dir} is a file; give a folder for the run")
    finished = (out_dir / TRAINING_JSON).exists()
    checkpoint = (out_dir / CHECKPOINT_DIR).is_dir()
    if resume:
        if finished:
            raise VlsaeError(f"the run in {out_dir} already finished; nothing to resume (start another with a new --out)")
        if not checkpoint:
            raise VlsaeError(f"no checkpoint to resume in {out_dir}; start the run without --resume")
        return
    if finished:
        raise VlsaeError(f"{out_dir} already holds a finished run; choose another --out (vlsae never overwrites a run)")
    if checkpoint:
        raise VlsaeError(f"{out_dir} holds an interrupted run; pass --resume to continue it or choose another --out")


def train(sae: SAE, source: ActivationSource, config: TrainConfig | None = None, out_dir: str | Path | None = None,
          resume: bool = False, metadata: dict[str, Any] | None = None) -> TrainResult:
    """Train ``sae`` on ``source``; returns the SAE ready for raw inputs and a summary.

    With ``out_dir`` the run writes periodic checkpoints there and, at the end,
    the final checkpoint folder (sae.safetensors, config.json, training.json,
    metrics.jsonl, tensorboard/). ``resume=True`` continues the interrupted run
    in ``out_dir`` exactly where its last checkpoint left off.
    """
    config = config or TrainConfig()
    out = Path(out_dir) if out_dir is not None else None
    check_compatible(sae, source)
    _prepare_out_dir(out, resume)
    device = _device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2 ** 32)
    random.seed(config.seed)

    sae.to(device)
    sae.train()
    sample = source.sample(config.init_rows, seed=config.seed)
    _finite_or_fail(sample, "in the initialisation sample")
    scales: float | dict[str, float] = 1.0
    if config.normalize_input:
        scales = estimate_scales(sae, sample)
    elif isinstance(sample, dict):
        scales = {m: 1.0 for m in sample}
    scaled = _to(sample, torch.device("cpu"), scales)
    if isinstance(scaled, dict):
        sae.init_decoder_bias({m: _center(x, config.b_dec_init) for m, x in scaled.items()})  # type: ignore[arg-type]
    else:
        sae.init_decoder_bias(_center(scaled, config.b_dec_init))
    del scaled

    peak_lr = config.resolved_lr(sae.n_latents)
    optimizer = _make_optimizer(sae, config, peak_lr)
    dead_tokens = config.resolved_dead_tokens()
    last_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
    rows_seen = 0
    start_step = 0
    elapsed_before = 0.0

    if resume:
        assert out is not None
        start_step, rows_seen, elapsed_before, scales = _restore(out / CHECKPOINT_DIR, sae, optimizer, last_fired, device)

    log = MetricsLog(out, start_step=start_step, tensorboard=config.tensorboard)
    history: list[dict[str, float]] = []
    bar = None
    if config.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=start_step, desc=f"train {sae.arch}", unit="step", dynamic_ncols=True)
    use_autocast = device.type == "cuda" and config.autocast_bf16
    batches = source.batches(config.batch_size, seed=config.seed, start=start_step)
    began = time.perf_counter()
    try:
        for step in range(start_step, config.steps):
            batch = _to(next(batches), device, scales)
            _finite_or_fail(batch, f"in the batch of step {step}")
            lr = peak_lr * config.lr_factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            dead = (rows_seen - last_fired) > dead_tokens
            ctx = TrainContext(step=step, progress=step / config.steps, dead_mask=dead)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                out_step = sae.training_forward(batch, ctx)
            loss = out_step.loss
            if not torch.isfinite(loss):
                raise VlsaeError(f"the loss became {float(loss)} at step {step}; lower the learning rate (train.lr) or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
            sae.before_optimizer_step()
            optimizer.step()
            sae.after_optimizer_step()
            rows_seen += _rows(batch)
            last_fired[out_step.code.active_mask()] = rows_seen

            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                record = _step_record(done, lr, loss, out_step, batch, dead)
                history.append(record)
                log.write(record)
                if bar is not None:
                    bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2f}")
            if bar is not None:
                bar.update(1)
            if out is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                _checkpoint(out, sae, optimizer, last_fired, done, rows_seen,
                            elapsed_before + time.perf_counter() - began, scales, config)
                log.flush()
    finally:
        if bar is not None:
            bar.close()
        log.close()

    seconds = elapsed_before + time.perf_counter() - began
    final_dead = float(((rows_seen - last_fired) > dead_tokens).float().mean())
    _fold(sae, scales)
    sae.eval()
    eval_rows = source.sample(config.eval_rows, seed=config.seed + 1)
    eval_rows = {m: t.to(device).float() for m, t in eval_rows.items()} if isinstance(eval_rows, dict) else eval_rows.to(device).float()
    summary: dict[str, Any] = {"arch": sae.arch, "d_in": sae.d_in, "n_latents": sae.n_latents}
    summary.update(evaluate(sae, eval_rows))
    trained_steps = config.steps - start_step
    summary.update({
        "dead_fraction": final_dead, "steps": config.steps, "rows": rows_seen, "seconds": round(seconds, 2),
        "rows_per_s": round(trained_steps * config.batch_size / max(time.perf_counter() - began, 1e-9), 1),
        "device": str(device), "lr": peak_lr,
        "input_scale": scales,
    })
    if out is not None:
        _finish(out, sae, config, summary, metadata)
    if config.progress:
        print_summary(summary, title=f"{sae.arch} SAE" + (f" -> {out}" if out else ""))
    return TrainResult(sae=sae, summary=summary, out_dir=out, history=history)


def _step_record(step: int, lr: float, loss: torch.Tensor, out_step, batch: Batch, dead: torch.Tensor) -> dict[str, float]:
    record: dict[str, float] = {"step": step, "lr": lr, "loss": float(loss.detach())}
    for name, value in out_step.losses.items():
        record[f"loss_{name}"] = float(value.detach())
    with torch.no_grad():
        if isinstance(batch, dict):
            fvus = []
            for m, x in batch.items():
                f = float(normalized_mse(x, out_step.recon[m].float()))
                record[f"fvu_{m}"] = f
                fvus.append(f)
            record["fvu"] = sum(fvus) / len(fvus)
        else:
            record["fvu"] = float(normalized_mse(batch, out_step.recon.float()))
    record["l0"] = float(out_step.code.l0().float().mean())
    record["dead_fraction"] = float(dead.float().mean())
    for key, value in out_step.metrics.items():
        record.setdefault(key, float(value))
    return record


def _checkpoint(out: Path, sae: SAE, optimizer, last_fired, step: int, rows_seen: int, seconds: float,
                scales, config: TrainConfig) -> None:
    """Write out/checkpoint atomically: build it aside, then swap it in."""
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_sae(sae, tmp)
    tensors, opt_meta = optimizer_to_flat(optimizer)
    tensors["last_fired"] = last_fired.cpu()
    tensors["rng_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng_cuda"] = torch.cuda.get_rng_state()
    meta = {"step": step, "rows_seen": rows_seen, "seconds": seconds, "input_scale": scales,
            "optimizer": opt_meta, "train_config": to_dict(config)}
    write_state(tmp, tensors, meta)
    replace_dir(tmp, out / CHECKPOINT_DIR)


def _restore(folder: Path, sae: SAE, optimizer, last_fired: torch.Tensor, device: torch.device):
    from vlsae.checkpoint import WEIGHTS, read_config, read_safetensors
    record = read_config(folder)
    if record["arch"] != sae.arch:
        raise VlsaeError(f"the checkpoint in {folder} is a '{record['arch']}' SAE, not '{sae.arch}'; resume with the same architecture")
    weights = read_safetensors(folder / WEIGHTS, what="checkpoint weights")
    try:
        sae.load_state_dict(weights)
    except RuntimeError as exc:
        raise VlsaeError(f"the checkpoint in {folder} does not fit this SAE ({str(exc).splitlines()[0]}); resume with the same settings") from None
    sae.to(device)
    tensors, meta = read_state(folder)
    optimizer_from_flat(optimizer, tensors, meta["optimizer"])
    last_fired.copy_(tensors["last_fired"].to(device))
    torch.set_rng_state(tensors["rng_cpu"])
    if "rng_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng_cuda"])
    return int(meta["step"]), int(meta["rows_seen"]), float(meta.get("seconds", 0.0)), meta["input_scale"]


def _finish(out: Path, sae: SAE, config: TrainConfig, summary: dict[str, Any], metadata: dict[str, Any] | None) -> None:
    """Final weights first, then training.json (which marks the run finished), then drop the checkpoint."""
    save_sae(sae, out, metadata={"input_scale_folded": True, **(metadata or {})})
    record = {"summary": summary, "train_config": to_dict(config), "metadata": metadata or {}}
    atomic_write_text(out / TRAINING_JSON, json.dumps(record, indent=2, default=str))
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
