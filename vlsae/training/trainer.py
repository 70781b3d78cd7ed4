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
batch statistics are all-reduced, rank 0 alone writes and prints). The state of one SAE in
training is a :class:`Trainer`; :func:`train` drives one on a stream of batches, a sweep
(``sweep.py``) drives several on one stream; the stateless pieces of a step are ``steps.py``.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlsae.errors import VlsaeError
from vlsae.saes.base import SAE, TrainContext, global_batch
from vlsae.sparse import SparseCode
from vlsae.training.config import TrainConfig
from vlsae.training.data import ActivationSource, Batch, TensorSource
from vlsae.training.distributed import Replicas, check_data_parallel, rank_device, setup
from vlsae.training.log import TENSORBOARD_DIR, MetricsLog, print_summary
from vlsae.training.metrics import evaluate
from vlsae.training.preflight import CHECKPOINT_DIR, TRAINING_JSON, check_compatible, check_out_dir, check_readout
from vlsae.training.readout import Readout, ReadoutLike, as_readout
from vlsae.training.state import restore_checkpoint, write_checkpoint, write_final
from vlsae.training.steps import (all_finite, batch_tokens, check_finite, copy_center, cpu_has_bf16_matmul, data_center,
                                  estimate_scales, evaluation_rows, fold_scales, make_optimizer, resolve_selection_dtype,
                                  rng_state, seed_everything, set_rng_state, step_record, to_device)

__all__ = ["CHECKPOINT_DIR", "TRAINING_JSON", "TrainResult", "Trainer", "check_compatible", "check_out_dir",
           "cpu_has_bf16_matmul", "estimate_scales", "resolve_selection_dtype", "train"]


@dataclass
class TrainResult:
    """sae: trained, input scale folded in (takes raw inputs), in eval mode;
    summary: end-of-run figures (see :func:`train`); history: the logged step records."""

    sae: SAE
    summary: dict[str, Any]
    out_dir: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _mark_fired(last_fired: torch.Tensor, code: SparseCode, tokens: int) -> None:
    """last_fired[i] = tokens for every latent that fired in this batch (no host sync)."""
    stamps = torch.where(code.values.detach() != 0, tokens, 0)
    last_fired.scatter_reduce_(0, code.indices.reshape(-1), stamps.reshape(-1).to(last_fired.dtype), reduce="amax")


# ------------------------------------------------------------------ one SAE in training
class Trainer:
    """One SAE in training: its optimizer and schedule, dead-latent counters, logs and checkpoints.

    The driver seeds the generators, then calls :meth:`initialise` with the init sample, :meth:`start`,
    :meth:`step` with every raw batch of the stream from batch ``step_index`` on until ``finished``,
    :meth:`close`, and :meth:`finish` with the evaluation rows. :func:`train` drives one;
    :func:`vlsae.training.sweep.run_sweep` drives several in lock-step on one stream of batches.

    own_rng: keep this SAE's generator states (torch, numpy, Python) apart from the process's, set
    around each of its steps, so SAEs that step in turn each draw what they would draw alone.
    own_clock: ``seconds`` counts the time spent in this trainer's own steps (SAEs that share a stream),
    not the wall time since :meth:`start`.
    """

    def __init__(self, sae: SAE, config: TrainConfig, replicas: Replicas, device: torch.device,
                 out: Path | None = None, readout: Readout | None = None, total_steps: int | None = None,
                 own_rng: bool = False, own_clock: bool = False):
        self.sae, self.config, self.replicas, self.device, self.readout = sae, config, replicas, device, readout
        self.out = out
        self.writes = out if replicas.is_main else None  # only rank 0 writes the run folder
        self.by_gradient = getattr(sae, "trains_by_gradient", True)
        self.total_steps = total_steps or config.steps
        self.own_rng, self.own_clock = own_rng, own_clock
        self.scales: float | dict[str, float] = 1.0
        self.peak_lr = config.resolved_lr(sae.n_latents)
        self.dead_tokens = config.resolved_dead_tokens()
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_fired = torch.zeros(sae.n_latents, dtype=torch.long, device=device)
        self.tokens = self.start_step = self.step_index = 0
        self.elapsed_before = self.busy = self.began = 0.0
        self.finished = False
        self.history: list[dict[str, float]] = []
        self.log: MetricsLog | None = None
        self.rng: tuple | None = None
        self.ended: float | None = None  # set by close(): the end of the training time

    def initialise(self, sample: Batch, centers: dict[Any, Any] | None = None) -> None:
        """Input scale(s) and decoder bias from the init sample (raw rows), then the optimizer.
        centers: decoder-bias centres already computed from this same sample, shared by SAEs that
        would compute the same one (same b_dec_init and scales); filled with this SAE's."""
        sae, config = self.sae, self.config
        sae.to(self.device)
        sae.train()
        if config.normalize_input:
            self.scales = estimate_scales(sae, sample)
        elif isinstance(sample, dict):
            self.scales = {m: 1.0 for m in sample}
        if self.readout is not None:
            self.readout.to(self.device).check(sample[: config.batch_size].to(self.device).float())  # type: ignore[index]
        key = (config.b_dec_init, repr(self.scales))
        center = (centers or {}).get(key)
        if center is None:
            scaled = to_device(sample, torch.device("cpu"), self.scales)
            if isinstance(scaled, dict):
                center = {m: data_center(x, config.b_dec_init) for m, x in scaled.items()}
            else:
                center = data_center(scaled, config.b_dec_init)
            if centers is not None:
                centers[key] = center
        sae.init_decoder_bias(copy_center(center))  # type: ignore[arg-type]
        self.replicas.broadcast_module(sae)
        self.optimizer = make_optimizer(sae, config, self.peak_lr)

    def start(self, resume: bool = False) -> None:
        """Restore the checkpoint in ``out`` (resume) or clear a dead fresh run's logs; open the logs."""
        if resume:
            assert self.out is not None
            self.start_step, self.tokens, self.elapsed_before, self.scales = restore_checkpoint(
                self.out / CHECKPOINT_DIR, self.sae, self.optimizer, self.last_fired, self.config, self.device)
        elif self.writes is not None and (self.writes / TENSORBOARD_DIR).exists():
            shutil.rmtree(self.writes / TENSORBOARD_DIR)  # left by a fresh run that died before its first checkpoint
        self.scales = self.replicas.broadcast_object(self.scales)
        self.step_index = self.start_step
        self.finished = self.step_index >= self.total_steps
        self.log = MetricsLog(self.writes, start_step=self.start_step, tensorboard=self.config.tensorboard)
        self.use_autocast = self.device.type == "cuda" and self.config.autocast_bf16
        self.sae.selection_dtype = resolve_selection_dtype(self.config.selection_dtype, self.device)
        self.params = [p for p in self.sae.parameters() if p.requires_grad]
        self.wants_grad = self.readout is not None and getattr(self.sae, "uses_downstream_grad", False)
        if self.own_rng:
            self.rng = rng_state(self.device)
        self.began = time.perf_counter()

    def seconds(self) -> float:
        """Training seconds so far, including those before a resume."""
        now = self.ended if self.ended is not None else time.perf_counter()
        return self.elapsed_before + (self.busy if self.own_clock else now - self.began)

    def step(self, raw: Batch) -> dict[str, float] | None:
        """Train on one raw batch of the stream (batch ``step_index``); the step's record when it is logged."""
        began = time.perf_counter()
        if self.rng is not None:
            set_rng_state(self.rng, self.device)
        record = self._step(raw)
        if self.rng is not None:
            self.rng = rng_state(self.device)
        self.busy += time.perf_counter() - began
        return record

    def _step(self, raw: Batch) -> dict[str, float] | None:
        sae, config, replicas, optimizer, scales, step = (self.sae, self.config, self.replicas, self.optimizer,
                                                          self.scales, self.step_index)
        batch = to_device(raw, self.device, scales)
        lr = self.peak_lr * config.lr_factor(step) if self.by_gradient else 0.0
        for group in optimizer.param_groups if optimizer is not None else []:
            group["lr"] = lr
        dead = (self.tokens - self.last_fired) > self.dead_tokens
        ctx = TrainContext(step=step, progress=step / self.total_steps, dead_mask=dead)
        replicas.seed_step(config.seed, step)
        counts = replicas.buffers_before_step(sae)
        readout = self.readout
        if self.wants_grad:  # d loss / d (scaled x) = (d loss / d raw x) / scale
            assert readout is not None and not isinstance(scales, dict)
            ctx.downstream_grad = readout.input_gradient(batch / scales) / scales  # type: ignore[operator]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_autocast), \
                torch.set_grad_enabled(self.by_gradient), global_batch(replicas.sum if replicas.parallel else None):
            out_step = sae.training_forward(batch, ctx)
        loss = out_step.loss if out_step.losses else torch.zeros((), device=self.device)
        loss_ok, data_ok, rows = replicas.step_check(torch.isfinite(loss.detach()), all_finite(batch),
                                                     batch_tokens(batch))  # the one sync per step
        if not (loss_ok and data_ok):
            check_finite(batch, f"in the batch of step {step}")
            if not data_ok:
                raise VlsaeError(f"the data has NaN or inf values in the batch of step {step} (the part another "
                                 "process read); clean the data (or re-extract it)")
            raise VlsaeError(f"the loss became {float(loss) if not bool(torch.isfinite(loss)) else 'nan or inf'} "
                             f"at step {step}; lower the learning rate (train.lr)")
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            replicas.average_gradients(self.params)
            replicas.sync_buffers(sae, counts)  # batch statistics the forward pass updated, before a step reads them
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
            sae.before_optimizer_step()
            optimizer.step()
            sae.after_optimizer_step()
        if replicas.parallel and sae.edits_parameters_in_forward(step):
            replicas.broadcast_module(sae)
        self.tokens += rows
        _mark_fired(self.last_fired, out_step.code, self.tokens)
        replicas.sync_last_fired(self.last_fired)

        done = self.step_index = step + 1
        self.finished = done == self.total_steps or bool(getattr(sae, "full", False))  # a full ITDA adds nothing more
        record = None
        if done % config.log_every == 0 or self.finished:
            record = step_record(done, lr, loss, out_step, batch, dead)
            if readout is not None and not isinstance(scales, dict):
                record.update(readout.fidelity(batch / scales, out_step.recon.detach().float() / scales))  # type: ignore[operator, union-attr]
            record = replicas.mean_record(record)
            self.history.append(record)
            assert self.log is not None
            self.log.write(record)
        if not self.finished and self.writes is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
            self.checkpoint()
        return record

    def checkpoint(self) -> None:
        """Write ``out/checkpoint`` at the current step (rank 0)."""
        assert self.writes is not None and self.log is not None
        self.log.flush()
        write_checkpoint(self.writes, self.sae, self.optimizer, self.last_fired, self.step_index, self.tokens,
                         self.seconds(), self.scales, self.config, self.device, self.replicas.world)

    def close(self) -> None:
        """After the last step (or an error): inference chooses latents in full precision; logs closed."""
        self.ended = time.perf_counter()
        self.sae.selection_dtype = None
        if self.log is not None:
            self.log.close()

    def finish(self, rows: Batch, eval_split: str, metadata: dict[str, Any] | None = None) -> TrainResult:
        """Fold the input scale in, score the SAE on ``rows`` (raw, on the device), write the finished run."""
        sae, config = self.sae, self.config
        trained_seconds = self.seconds() - self.elapsed_before
        final_dead = float(((self.tokens - self.last_fired) > self.dead_tokens).float().mean())
        fold_scales(sae, self.scales)
        sae.eval()
        summary: dict[str, Any] = {"arch": sae.arch, "d_in": sae.d_in, "n_latents": sae.n_latents}
        summary.update(evaluate(sae, rows))
        if self.readout is not None:
            with torch.no_grad():
                summary.update(self.readout.fidelity(rows, sae(rows)))  # type: ignore[arg-type]
            summary["readout"] = self.readout.info or {"name": self.readout.name}
        summary.update({
            "dead_fraction": final_dead, "eval_split": eval_split, "eval_rows": batch_tokens(rows),
            "steps": self.step_index, "tokens": self.tokens,
            "seconds": round(self.elapsed_before + trained_seconds, 2),
            "tokens_per_s": round((self.step_index - self.start_step) * config.batch_size / max(trained_seconds, 1e-9), 1),
            "device": str(self.device), "world_size": self.replicas.world, "lr": self.peak_lr, "input_scale": self.scales,
        })
        if not self.by_gradient:
            summary["training"] = "one pass, no gradients"
        if self.writes is not None:
            write_final(self.writes, sae, config, summary, metadata)
        return TrainResult(sae=sae, summary=summary, out_dir=self.out, history=self.history)


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
    show = config.progress and replicas.is_main
    seed_everything(config.seed)

    trainer = Trainer(sae, config, replicas, device, out=out, readout=readout, total_steps=total_steps)
    sample = source.sample(config.init_rows, seed=config.seed)
    check_finite(sample, "in the rows sampled for initialisation")
    trainer.initialise(sample)
    del sample
    trainer.start(resume)
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=trainer.start_step, desc=f"{'train' if by_gradient else 'build'} {sae.arch}",
                   unit="step", dynamic_ncols=True)
    batches = replicas.batches(source, config.batch_size, seed=config.seed, start=trainer.start_step)
    try:
        while not trainer.finished:
            record = trainer.step(next(batches))
            if bar is not None:
                if record is not None:
                    bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2f}")
                bar.update(1)
    finally:
        trainer.close()
        if bar is not None:
            bar.close()

    held = eval_source if eval_source is not None else source
    result = trainer.finish(evaluation_rows(held, config, device),
                            "held-out" if eval_source is not None else "training sample", metadata)
    replicas.barrier()  # on every rank, train() returns once the run folder is complete
    if show:
        print_summary(result.summary, title=f"{sae.arch} SAE" + (f" -> {out}" if out else ""))
    return result
