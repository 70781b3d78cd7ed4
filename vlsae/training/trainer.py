"""The SAE trainer: any architecture, any activation source.

One loop for every registered SAE. It knows nothing of where batches come
from (see ``data.py``) and nothing of the architecture beyond the base-class
contract: ``training_forward`` returns named losses that are summed, and
``before_optimizer_step``/``after_optimizer_step`` handle decoder norms.

What it adds around that contract:

- input scaling: ``c`` with E||c x|| = sqrt(d_in), estimated on ``init_rows``
  sampled rows (one ``c`` per modality for paired data); the SAE trains on
  ``c x`` and ``c`` is folded into the weights at the end (``fold_input_scale``,
  or ``fold_input_scales(dict)`` for multimodal SAEs), so ``result.sae`` takes raw
  activations; the scales are recorded in ``training.json``;
- decoder-bias initialisation from the same sample (geometric median, mean, zeros);
- Adam with linear warm-up, a constant phase and a linear decay to 0 over the
  last ``decay_fraction`` (see :meth:`TrainConfig.lr_factor`), gradient clipping;
- dead-latent tracking: a "token" is one row, or one pair for paired data; a
  latent is dead when it has not fired in the last ``dead_tokens`` tokens
  (default min(10M, steps * batch_size / 5), so a short run can still see dead
  latents and AuxK gets to act); the mask goes to the SAE in :class:`TrainContext`;
- one host-device sync per step, to stop at the first non-finite loss or batch
  (naming the step) before it reaches the weights or a checkpoint;
- bf16 autocast on CUDA; on CPUs with bf16 matrix units the no-grad matmul that
  only chooses the active latents runs in bf16 (``selection_dtype``), while the
  chosen values, loss and gradients stay fp32; checkpoints that resume
  bit-for-bit (``state.py``);
  JSONL + TensorBoard logs, a tqdm bar and a rich summary (``log.py``);
- an optional readout (``readout.py``): a downstream function of the activations whose
  gradient g-SAE selects with and whose fidelity figures are logged for any SAE;
- SAEs built without gradients (ITDA: ``trains_by_gradient = False``) go through the same
  loop, data, logs, checkpoints and evaluation, in one pass over the stream with no optimizer.

The checks before any work (data, run folder, readout) are ``preflight.py``; writing and
restoring checkpoints is ``state.py``. Under ``torchrun`` the same loop runs data-parallel
(``distributed.py``: each rank trains on its slice of every global batch, gradients and
batch statistics are all-reduced, rank 0 alone writes and prints).
"""
from __future__ import annotations

import functools
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlsae.errors import VlsaeError
from vlsae.saes.base import SAE, TrainContext, TrainOutput, global_batch, normalized_mse
from vlsae.sparse import SparseCode
from vlsae.training.config import TrainConfig
from vlsae.training.data import ActivationSource, Batch, TensorSource
from vlsae.training.distributed import check_data_parallel, rank_device, setup
from vlsae.training.log import TENSORBOARD_DIR, MetricsLog, print_summary
from vlsae.training.metrics import evaluate, geometric_median
from vlsae.training.preflight import CHECKPOINT_DIR, TRAINING_JSON, check_compatible, check_out_dir, check_readout
from vlsae.training.readout import ReadoutLike, as_readout
from vlsae.training.state import restore_checkpoint, write_checkpoint, write_final

__all__ = ["CHECKPOINT_DIR", "TRAINING_JSON", "TrainResult", "check_compatible", "check_out_dir", "train"]


@dataclass
class TrainResult:
    """sae: trained, input scale folded in (takes raw inputs), in eval mode;
    summary: end-of-run figures (see :func:`train`); history: the logged step records."""

    sae: SAE
    summary: dict[str, Any]
    out_dir: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


# ------------------------------------------------------------------ checks
@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """True when /proc/cpuinfo lists AMX-BF16 or AVX512-BF16 (there a bf16 matmul
    runs ~3.7x faster than fp32: 82 vs 304 ms for 4096x512 @ 512x8192 on 2 Xeon cores)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_selection_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``train.selection_dtype`` -> the dtype for the SAE's latent-choosing matmul (None: full precision).

    On CUDA the bf16 autocast already covers that matmul, so only the CPU is affected."""
    if device.type != "cpu" or name == "fp32":
        return None
    if name == "bf16" or cpu_has_bf16_matmul():
        return torch.bfloat16
    return None


def _all_finite(batch: Batch) -> torch.Tensor:
    """0-d bool tensor on the batch's device (no host sync)."""
    items = list(batch.values()) if isinstance(batch, dict) else [batch]
    ok = torch.isfinite(items[0]).all()
    for t in items[1:]:
        ok = ok & torch.isfinite(t).all()
    return ok


def _check_finite(batch: Batch, where: str) -> None:
    items = batch.items() if isinstance(batch, dict) else [("activations", batch)]
    for name, t in items:
        if not bool(torch.isfinite(t).all()):
            what = "the data" if name == "activations" else f"modality '{name}' of the data"
            raise VlsaeError(f"{what} has NaN or inf values {where}; clean the data (or re-extract it)")


def _tokens(batch: Batch) -> int:
    """Rows in a batch; a pair counts once for paired data."""
    if isinstance(batch, dict):
        return next(iter(batch.values())).shape[0]
    return batch.shape[0]


def _to(batch: Batch, device: torch.device, scales: float | dict[str, float]) -> Batch:
    if isinstance(batch, dict):
        return {m: t.to(device, torch.float32, non_blocking=True) * scales[m] for m, t in batch.items()}  # type: ignore[index]
    return batch.to(device, torch.float32, non_blocking=True) * scales  # type: ignore[operator]


def estimate_scales(sae: SAE, sample: Batch) -> float | dict[str, float]:
    """c (or c per modality) with E||c x|| = sqrt(d_in) over the sample's rows."""
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


def data_center(x: torch.Tensor, how: str) -> torch.Tensor:
    """The b_dec initialisation: geometric median, mean or zeros of the rows of x (n, d)."""
    if how == "zeros":
        return torch.zeros(x.shape[1])
    if how == "mean":
        return x.float().mean(0)
    return geometric_median(x.float())


def _fold(sae: SAE, scales: float | dict[str, float]) -> None:
    if isinstance(scales, dict):
        sae.fold_input_scales(scales)  # type: ignore[attr-defined]  (paired data: a MultimodalSAE, checked first)
    else:
        sae.fold_input_scale(scales)


def _make_optimizer(sae: SAE, config: TrainConfig, lr: float) -> torch.optim.Optimizer | None:
    """Adam over the trainable parameters; None for an SAE built without gradients (ITDA)."""
    if not getattr(sae, "trains_by_gradient", True):
        return None
    params = [p for p in sae.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=lr, betas=config.betas, eps=config.adam_eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=config.betas, eps=config.adam_eps)


def _mark_fired(last_fired: torch.Tensor, code: SparseCode, tokens: int) -> None:
    """last_fired[i] = tokens for every latent that fired in this batch (no host sync)."""
    stamps = torch.where(code.values.detach() != 0, tokens, 0)
    last_fired.scatter_reduce_(0, code.indices.reshape(-1), stamps.reshape(-1).to(last_fired.dtype), reduce="amax")


# -------------------------------------------------------------------- train
def train(sae: SAE, source: ActivationSource, config: TrainConfig | None = None, out_dir: str | Path | None = None,
          resume: bool = False, metadata: dict[str, Any] | None = None,
          eval_source: ActivationSource | Batch | None = None, readout: ReadoutLike | None = None) -> TrainResult:
    """Train ``sae`` on ``source``; returns the SAE ready for raw inputs and a summary.

    source: any :class:`ActivationSource` (a tensor batch per step, or a dict of
    modality -> tensor with aligned rows for multimodal SAEs).
    eval_source: held-out rows for the end-of-run metrics; without it they are
    computed on a sample of the training rows (``summary["eval_split"]`` says which).
    out_dir: the run folder. During the run it holds ``checkpoint/`` (every
    ``checkpoint_every`` steps), ``metrics.jsonl`` and ``tensorboard/``; at the end
    the final SAE (``sae.safetensors``, ``config.json``) and ``training.json``
    (summary, train config, input scales), and the checkpoint is removed.
    resume: continue the interrupted run in ``out_dir`` from its last checkpoint;
    the result equals the uninterrupted run's.
    readout: an optional downstream function of the raw activations (a :class:`Readout`, a module or
    a function; :mod:`vlsae.training.readout`). SAEs that select by a downstream gradient (``gsae``)
    need it and get ``ctx.downstream_grad`` every step; for any SAE the logged steps and the summary
    add its fidelity figures (``readout_fvu``, or ``readout_ce_increase``/``readout_kl``/``readout_agreement``).
    SAEs built without gradients (``itda``, ``trains_by_gradient = False``) are built in one pass over
    the stream (at most ``len(source) // batch_size`` batches, ``steps`` capping it) with no optimizer.

    Under torchrun (WORLD_SIZE > 1) every rank calls this with the same arguments; the run is
    data-parallel (:mod:`vlsae.training.distributed`), ``batch_size`` is the global batch and
    only rank 0 writes ``out_dir`` and shows progress. Every rank returns the same SAE.

    summary keys: arch, d_in, n_latents, fvu, l0, shrinkage, never_fired_fraction
    (and per modality ``fvu_<m>`` etc. for paired data), dead_fraction, eval_split,
    eval_rows, steps, tokens, seconds, tokens_per_s, device, world_size, lr, input_scale
    (and, with a readout, its fidelity figures and ``readout``: what it was).
    """
    config = config or TrainConfig()
    out = Path(out_dir) if out_dir is not None else None
    if eval_source is not None and not isinstance(eval_source, ActivationSource):
        eval_source = TensorSource(eval_source)
    readout = as_readout(readout)
    check_compatible(sae, source)
    check_readout(sae, readout is not None, paired=isinstance(source.d_in, dict))
    by_gradient = getattr(sae, "trains_by_gradient", True)
    total_steps = config.steps if by_gradient else min(config.steps, max(1, len(source) // config.batch_size))
    if eval_source is not None:
        check_compatible(sae, eval_source, what="the held-out data")
    check_out_dir(out, resume)
    device = rank_device(config.device)
    replicas = setup(device)
    check_data_parallel(sae, config.batch_size, replicas.world)
    writes = out if replicas.is_main else None  # only rank 0 writes the run folder
    show = config.progress and replicas.is_main
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2 ** 32)
    random.seed(config.seed)

    sae.to(device)
    sae.train()
    sample = source.sample(config.init_rows, seed=config.seed)
    _check_finite(sample, "in the rows sampled for initialisation")
    scales: float | dict[str, float] = 1.0
    if config.normalize_input:
        scales = estimate_scales(sae, sample)
    elif isinstance(sample, dict):
        scales = {m: 1.0 for m in sample}
    if readout is not None:
        readout.to(device).check(sample[: config.batch_size].to(device).float())  # type: ignore[index]
    scaled = _to(sample, torch.device("cpu"), scales)
    if isinstance(scaled, dict):
        sae.init_decoder_bias({m: data_center(x, config.b_dec_init) for m, x in scaled.items()})  # type: ignore[arg-type]
    else:
        sae.init_decoder_bias(data_center(scaled, config.b_dec_init))
    del scaled, sample
    replicas.broadcast_module(sae)

    peak_lr = config.resolved_lr(sae.n_latents)
    optimizer = _make_optimizer(sae, config, peak_lr)
    dead_tokens = config.resolved_dead_tokens()
    last_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
    tokens = 0
    start_step = 0
    elapsed_before = 0.0
    if resume:
        assert out is not None
        start_step, tokens, elapsed_before, scales = restore_checkpoint(out / CHECKPOINT_DIR, sae, optimizer,
                                                                        last_fired, config, device)
    elif writes is not None and (writes / TENSORBOARD_DIR).exists():
        shutil.rmtree(writes / TENSORBOARD_DIR)  # left by a fresh run that died before its first checkpoint
    scales = replicas.broadcast_object(scales)

    log = MetricsLog(writes, start_step=start_step, tensorboard=config.tensorboard)
    history: list[dict[str, float]] = []
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start_step, desc=f"{'train' if by_gradient else 'build'} {sae.arch}",
                   unit="step", dynamic_ncols=True)
    use_autocast = device.type == "cuda" and config.autocast_bf16
    sae.selection_dtype = resolve_selection_dtype(config.selection_dtype, device)
    batches = replicas.batches(source, config.batch_size, seed=config.seed, start=start_step)
    params = [p for p in sae.parameters() if p.requires_grad]
    wants_grad = readout is not None and getattr(sae, "uses_downstream_grad", False)
    steps_run = start_step
    began = time.perf_counter()
    try:
        for step in range(start_step, total_steps):
            batch = _to(next(batches), device, scales)
            lr = peak_lr * config.lr_factor(step) if by_gradient else 0.0
            for group in optimizer.param_groups if optimizer is not None else []:
                group["lr"] = lr
            dead = (tokens - last_fired) > dead_tokens
            ctx = TrainContext(step=step, progress=step / total_steps, dead_mask=dead)
            replicas.seed_step(config.seed, step)
            counts = replicas.buffers_before_step(sae)
            if wants_grad:  # d loss / d (scaled x) = (d loss / d raw x) / scale
                assert readout is not None and not isinstance(scales, dict)
                ctx.downstream_grad = readout.input_gradient(batch / scales) / scales  # type: ignore[operator]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast), torch.set_grad_enabled(by_gradient), \
                    global_batch(replicas.sum if replicas.parallel else None):
                out_step = sae.training_forward(batch, ctx)
            loss = out_step.loss if out_step.losses else torch.zeros((), device=device)
            loss_ok, data_ok, rows = replicas.step_check(torch.isfinite(loss.detach()), _all_finite(batch),
                                                         _tokens(batch))  # the one sync per step
            if not (loss_ok and data_ok):
                _check_finite(batch, f"in the batch of step {step}")
                if not data_ok:
                    raise VlsaeError(f"the data has NaN or inf values in the batch of step {step} (the part another "
                                     "process read); clean the data (or re-extract it)")
                raise VlsaeError(f"the loss became {float(loss) if not bool(torch.isfinite(loss)) else 'nan or inf'} "
                                 f"at step {step}; lower the learning rate (train.lr)")
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                replicas.average_gradients(params)
                replicas.sync_buffers(sae, counts)  # batch statistics the forward pass updated, before a step reads them
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
                sae.before_optimizer_step()
                optimizer.step()
                sae.after_optimizer_step()
            if replicas.parallel and sae.edits_parameters_in_forward(step):
                replicas.broadcast_module(sae)
            tokens += rows
            _mark_fired(last_fired, out_step.code, tokens)
            replicas.sync_last_fired(last_fired)

            done = steps_run = step + 1
            finished = done == total_steps or bool(getattr(sae, "full", False))  # a full ITDA adds nothing more
            if done % config.log_every == 0 or finished:
                record = _step_record(done, lr, loss, out_step, batch, dead)
                if readout is not None and not isinstance(scales, dict):
                    record.update(readout.fidelity(batch / scales, out_step.recon.detach().float() / scales))  # type: ignore[operator, union-attr]
                record = replicas.mean_record(record)
                history.append(record)
                log.write(record)
                if bar is not None:
                    bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2f}")
            if bar is not None:
                bar.update(1)
            if finished:
                break
            if writes is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
                log.flush()
                write_checkpoint(writes, sae, optimizer, last_fired, done, tokens,
                                 elapsed_before + time.perf_counter() - began, scales, config, device, replicas.world)
    finally:
        sae.selection_dtype = None  # inference and evaluation choose latents in full precision
        if bar is not None:
            bar.close()
        log.close()

    trained_seconds = time.perf_counter() - began
    final_dead = float(((tokens - last_fired) > dead_tokens).float().mean())
    _fold(sae, scales)
    sae.eval()
    held = eval_source if eval_source is not None else source
    rows = held.sample(config.eval_rows, seed=config.seed + 1)
    rows = {m: t.to(device).float() for m, t in rows.items()} if isinstance(rows, dict) else rows.to(device).float()
    summary: dict[str, Any] = {"arch": sae.arch, "d_in": sae.d_in, "n_latents": sae.n_latents}
    summary.update(evaluate(sae, rows))
    if readout is not None:
        with torch.no_grad():
            summary.update(readout.fidelity(rows, sae(rows)))  # type: ignore[arg-type]
        summary["readout"] = readout.info or {"name": readout.name}
    summary.update({
        "dead_fraction": final_dead,
        "eval_split": "held-out" if eval_source is not None else "training sample",
        "eval_rows": _tokens(rows),
        "steps": steps_run, "tokens": tokens,
        "seconds": round(elapsed_before + trained_seconds, 2),
        "tokens_per_s": round((steps_run - start_step) * config.batch_size / max(trained_seconds, 1e-9), 1),
        "device": str(device), "world_size": replicas.world, "lr": peak_lr, "input_scale": scales,
    })
    if not by_gradient:
        summary["training"] = "one pass, no gradients"
    if writes is not None:
        write_final(writes, sae, config, summary, metadata)
    replicas.barrier()  # on every rank, train() returns once the run folder is complete
    if show:
        print_summary(summary, title=f"{sae.arch} SAE" + (f" -> {out}" if out else ""))
    return TrainResult(sae=sae, summary=summary, out_dir=out, history=history)


def _step_record(step: int, lr: float, loss: torch.Tensor, out_step: TrainOutput, batch: Batch,
                 dead: torch.Tensor) -> dict[str, float]:
    """The JSONL/TensorBoard record of a logged step (figures on the training batch, scaled space)."""
    record: dict[str, float] = {"step": step, "lr": lr, "loss": float(loss.detach())}
    for name, value in out_step.losses.items():
        record[f"loss_{name}"] = float(value.detach())
    with torch.no_grad():
        if isinstance(batch, dict):
            fvus = []
            for m, x in batch.items():
                f = float(normalized_mse(x, out_step.recon[m].float()))  # type: ignore[index]
                record[f"fvu_{m}"] = f
                fvus.append(f)
            record["fvu"] = sum(fvus) / len(fvus)
        else:
            record["fvu"] = float(normalized_mse(batch, out_step.recon.float()))  # type: ignore[union-attr]
    record["l0"] = float(out_step.code.l0().float().mean())
    record["dead_fraction"] = float(dead.float().mean())
    for key, value in out_step.metrics.items():
        record.setdefault(key, float(value))
    return record
