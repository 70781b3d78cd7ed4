"""Data-parallel training on PyTorch distributed: ``torchrun --nproc-per-node N -m vlsae train ...``.

torchrun starts N processes ("ranks") and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; :func:`setup` joins them in one process group (gloo on the CPU,
nccl on CUDA, each rank on ``cuda:LOCAL_RANK``). One process (WORLD_SIZE unset or 1)
gets a :class:`Replicas` of one rank whose methods do nothing, so the single-process
trainer runs exactly as before.

What stays global, so the result does not depend on the number of ranks beyond float order:

- the batch stream: every rank walks the same global stream (``source.batches(batch_size,
  seed, start)``, a pure function of seed and position) and trains on its own contiguous
  slice of each global batch, ``batch_size / world_size`` rows (:meth:`Replicas.batches`);
  a source whose ``batches`` takes ``part`` (a :class:`TensorSource`, the activation cache, a
  projected source over either) gathers only its slice; any other is read whole and sliced. No row is skipped or
  duplicated, and the resume position is the global step, so a checkpoint resumes
  under any number of ranks;
- losses: inside the training forward the batch normalisers (the batch-FVU variance of
  ``normalized_mse``, AuxK's residual variance, :func:`vlsae.saes.base.row_variance`) are
  the global batch's (``vlsae.saes.base.global_batch`` with :meth:`Replicas.sum`), so each
  rank's loss is a mean over its rows divided by a global statistic and their mean is the
  global batch's loss;
- gradients: one all-reduce of all gradients (flattened, with a presence flag per
  parameter so a parameter no rank used keeps ``grad=None``), divided by the world
  size: the gradient of the mean of the ranks' losses, i.e. of the global batch's loss;
- initialisation: every rank draws the same ``init_rows`` sample, so the input scale and
  the decoder bias are the statistics of the same rows as in one process; then rank 0's
  parameters, buffers and scales are broadcast, so every rank starts from one state;
- dead-latent counters: each rank stamps the latents its slice fired, then an all-reduce
  MAX (a latent fired in the global batch when it fired in any slice);
- SAE buffers updated from batch statistics (BatchTopK's threshold, mc/fc densities and
  thresholds, GBA's firing windows): after the backward pass and before the optimizer
  step, every persistent floating buffer is all-reduced by the SAE's
  ``buffer_reductions`` (``{name: "mean" | "sum" | "min" | "max" | "none"}``), ``mean``
  for a buffer it does not name. An EMA of a per-row mean (density, demand) averaged
  over equal slices is the EMA of the global mean; a count (GBA's window firings and
  rows) gets every rank's increment (``sum``); a running max or min takes the max or min;
- an SAE whose ``training_forward`` edits parameters from the batch itself (the vl
  family's dead-latent re-initialisation) says so with ``edits_parameters_in_forward(step)``;
  rank 0's parameters are then broadcast after that step;
- per-step randomness: with more than one rank, torch's generator is re-seeded every
  step from (seed, step, rank), so ranks draw independent noise and a resumed run draws
  what the uninterrupted one would.

What is per slice: selections made across a batch (BatchTopK's top B*k, feature choice's
per-latent top rows) are made within each rank's slice, as in other data-parallel SAE
trainers, so those architectures match one process statistically, not to float order;
logged step figures (batch FVU, L0, losses) are the mean over ranks.

Only rank 0 writes (checkpoints, logs, ``training.json``, ``run.yaml``) and prints.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from vlsae.devices import resolve_device
from vlsae.errors import VlsaeError
from vlsae.rendezvous import join_store
from vlsae.parts import reads_part_batches
from vlsae.training.data import ActivationSource, Batch

REDUCTIONS = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def env_rank() -> int:
    """RANK as torchrun sets it (0 when unset)."""
    return _env_int("RANK", 0)


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a torchrun launch."""
    return env_rank() == 0


def rank_device(name: str) -> torch.device:
    """The device of this rank: ``resolve_device(name)``, and ``cuda:LOCAL_RANK`` under torchrun."""
    device = resolve_device(name)
    if env_world_size() <= 1 or device.type != "cuda":
        return device
    if device.index is not None and str(name).strip().lower() != "cuda":
        raise VlsaeError(f"--device {name} names one GPU, but under torchrun each process uses cuda:LOCAL_RANK; "
                         "pass --device cuda (or auto)")
    return torch.device("cuda", _env_int("LOCAL_RANK", 0))


def check_data_parallel(sae: Any, batch_size: int, world: int) -> None:
    """One-line errors for a run that cannot be split over ``world`` processes."""
    if world <= 1:
        return
    if batch_size % world:
        raise VlsaeError(f"train.batch_size {batch_size} does not split over {world} processes; use a multiple of "
                         f"{world} (each process takes batch_size / {world} rows of every batch)")
    if not getattr(sae, "trains_by_gradient", True):
        raise VlsaeError(f"'{sae.arch}' is built in one pass over the stream without gradients and does not run "
                         "data-parallel; train it as one process")


@dataclass
class Replicas:
    """This process's place among the ranks of a run; with ``world == 1`` every method is a no-op."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------ data
    def batches(self, source: ActivationSource, batch_size: int, seed: int, start: int = 0) -> Iterator[Batch]:
        """This rank's slice of every global batch of ``source``'s stream (the whole batch for one rank)."""
        return reads_part_batches(source, batch_size, seed, start, part=(self.rank, self.world))

    def seed_step(self, seed: int, step: int) -> None:
        """With several ranks: torch's generator seeded from (seed, step, rank) before each step."""
        if self.parallel:
            torch.manual_seed(((seed * 1_000_003 + step) * 1_009 + self.rank) % 2 ** 63)

    # ------------------------------------------------------ every step
    def step_check(self, loss_ok: torch.Tensor, data_ok: torch.Tensor, rows: int) -> tuple[bool, bool, int]:
        """(loss finite on every rank, data finite on every rank, rows in the global batch): one sync."""
        if not self.parallel:
            ok = bool(loss_ok & data_ok)
            return ok, ok or bool(data_ok), rows
        flags = torch.stack([loss_ok.double(), data_ok.double(), torch.tensor(float(rows), device=loss_ok.device,
                                                                               dtype=torch.float64)])
        dist.all_reduce(flags)
        return bool(flags[0] == self.world), bool(flags[1] == self.world), int(flags[2])

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every gradient replaced by its mean over ranks, in one all-reduce."""
        if not self.parallel or not params:
            return
        parts = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                 for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        flat = torch.cat([*parts, present])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for p, size, used in zip(params, [p.numel() for p in params], flat[-len(params):].tolist()):
            if used > 0:
                grad = flat[offset:offset + size].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = grad.clone()
                else:
                    p.grad.copy_(grad)
            offset += size

    def _buffer_groups(self, module: torch.nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """reduction -> [(name, buffer)] over the persistent floating buffers, by ``buffer_reductions``."""
        rules: dict[str, str] = getattr(module, "buffer_reductions", {})
        groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for name, buf in _persistent_buffers(module):
            how = rules.get(name.rsplit(".", 1)[-1], "mean")
            if how == "none" or not buf.is_floating_point():
                continue
            if how not in REDUCTIONS:
                raise ValueError(f"unknown buffer reduction '{how}' for buffer {name}")
            groups.setdefault(how, []).append((name, buf))
        return groups

    @torch.no_grad()
    def buffers_before_step(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Copies of the ``sum`` buffers (counts) before the forward pass: their sync adds every rank's increment."""
        if not self.parallel:
            return {}
        return {name: buf.clone() for name, buf in self._buffer_groups(module).get("sum", [])}

    @torch.no_grad()
    def sync_buffers(self, module: torch.nn.Module, before: dict[str, torch.Tensor] | None = None) -> None:
        """All-reduce the persistent floating buffers by the module's ``buffer_reductions`` (default mean);
        a ``sum`` buffer becomes its value ``before`` the step plus the sum of the ranks' increments."""
        if not self.parallel:
            return
        for how, named in self._buffer_groups(module).items():
            bufs = [b for _, b in named]
            if how == "sum":
                assert before is not None, "sum buffers need buffers_before_step()"
                flat = torch.cat([(b - before[n]).reshape(-1).double() for n, b in named])
            else:
                flat = torch.cat([b.reshape(-1).double() for b in bufs])
            dist.all_reduce(flat, op=REDUCTIONS[how])
            if how == "mean":
                flat.div_(self.world)
            offset = 0
            for name, b in named:
                part = flat[offset:offset + b.numel()].view_as(b)
                b.copy_(part + before[name] if how == "sum" else part)  # type: ignore[index]
                offset += b.numel()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new tensor; ``t`` itself when there is one rank)."""
        if not self.parallel:
            return t
        total = t.clone()
        dist.all_reduce(total)
        return total

    def sync_last_fired(self, last_fired: torch.Tensor) -> None:
        """Token stamps of each latent's last firing: the latest over ranks."""
        if self.parallel:
            dist.all_reduce(last_fired, op=dist.ReduceOp.MAX)

    def mean_record(self, record: dict[str, float]) -> dict[str, float]:
        """A logged step's figures averaged over ranks (a key some rank lacks: the mean of those that have it)."""
        if not self.parallel:
            return record
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, record)
        keys = list(dict.fromkeys(k for r in gathered for k in r))
        return {k: sum(r[k] for r in gathered if k in r) / sum(1 for r in gathered if k in r) for k in keys}

    # ------------------------------------------------------ one state
    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers copied to every rank."""
        if not self.parallel:
            return
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's value of a small picklable object, on every rank."""
        if not self.parallel:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


def _persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(qualified name, buffer) of the buffers saved in the state dict (constants derived from
    the config are registered ``persistent=False`` and skipped)."""
    for prefix, sub in module.named_modules():
        skip = getattr(sub, "_non_persistent_buffers_set", set())
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and name not in skip:
                yield (f"{prefix}.{name}" if prefix else name), buf


_JOINED = False  # this process called init_process_group


def setup(device: torch.device) -> Replicas:
    """Join torchrun's process group (once; gloo on the CPU, nccl on CUDA) and return this rank's place.
    Without torchrun (WORLD_SIZE unset or 1): a single-rank :class:`Replicas`, no process group."""
    if env_world_size() <= 1:
        return Replicas()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        rank, world = env_rank(), env_world_size()
        store = join_store(rank, world)  # a process that cannot reach the others stops with one line
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
        global _JOINED
        _JOINED = True
    return Replicas(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int) -> int:
    """Return ``code``, or, in a process that joined a process group (a torchrun rank), leave the group,
    flush and end the process now with ``os._exit(code)``. Interpreter finalisation after
    ``destroy_process_group`` intermittently aborts with gloo on this torch build (std::terminate with no
    Python frame, about 1 run in 10 on 2 CPU ranks), which torchrun reports as a failed run."""
    if not _JOINED:
        return code
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def session(device_name: str) -> Iterator[Replicas]:
    """``with session(train.device) as replicas:``: the process group for the block, left at its end
    (all ranks together when the block ends normally; after an error each rank leaves alone)."""
    try:
        replicas = setup(rank_device(device_name))
        yield replicas
        replicas.barrier()
    finally:
        shutdown()
