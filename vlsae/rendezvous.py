"""Joining the other processes of a launch: the rendezvous store, reached within a connect timeout.

Every verb that runs split over processes (training's process group, the store
exchanges of extraction, filtering and OOD scoring) first reaches the key-value
store at ``MASTER_ADDR:MASTER_PORT``. Rank 0 hosts it outside torchrun (torchrun's
agent hosts it otherwise) and waits there until all ``WORLD_SIZE`` processes have
connected. A process that cannot reach the others (a rank never started, a wrong
``MASTER_ADDR``, a port a firewall drops) would otherwise wait for torch's default
(30 minutes) or for the long stage timeout and then print a C++ trace; here it
stops after ``VLSAE_CONNECT_TIMEOUT`` seconds (default 300) with one line saying
which process waited for what and how to fix it.

Once connected, the store's timeout becomes :data:`STAGE_TIMEOUT`: a stage waits
for the slowest rank (a data shard more than the others, on a CPU: minutes or
hours); a rank that dies is torchrun's to notice (it stops the others).
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from datetime import timedelta
from typing import Any, Iterator

import torch.distributed as dist

from vlsae.errors import VlsaeError

CONNECT_TIMEOUT_ENV = "VLSAE_CONNECT_TIMEOUT"
DEFAULT_CONNECT_SECONDS = 300.0
STAGE_TIMEOUT = timedelta(hours=12)


class UnreachableError(VlsaeError):
    """A process did not meet the others in time: every process says so (the others cannot say it for it)."""


def connect_timeout() -> timedelta:
    """How long a process waits for the others to connect: ``VLSAE_CONNECT_TIMEOUT`` seconds, default 300."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_CONNECT_SECONDS)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise VlsaeError(f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a positive number of seconds; unset it for the "
                         f"default ({DEFAULT_CONNECT_SECONDS:.0f} s)")
    return timedelta(seconds=seconds)


def master_address(world: int) -> str:
    """``MASTER_ADDR:MASTER_PORT`` of the launch, or a one-line error when the variables are missing."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise VlsaeError(f"WORLD_SIZE={world} but no MASTER_ADDR/MASTER_PORT: launch the processes with torchrun "
                         "(or vlsae train --nproc N)")
    return f"{addr}:{port}"


def unreachable(rank: int, world: int, address: str, seconds: float) -> str:
    """The one-line message of a process that did not meet the others in time."""
    waited = ("the other processes to connect to it" if rank == 0 and "TORCHELASTIC_RUN_ID" not in os.environ
              else "the others at the rendezvous store")
    return (f"process {rank} of {world} waited {seconds:.0f} s for {waited} at {address} and gave up: start all "
            f"{world} processes (torchrun --nnodes/--nproc-per-node on every node) with the same MASTER_ADDR and "
            f"MASTER_PORT, reachable from each; {CONNECT_TIMEOUT_ENV} sets the wait")


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """File descriptor 2 into a temporary file for the block, its text in the yielded list afterwards: c10d's
    C++ logging writes a retry warning and a stack trace there per failed connect attempt, which the one-line
    message replaces."""
    sys.stderr.flush()
    saved = os.dup(2)
    text: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def join_store(rank: int, world: int) -> Any:
    """The launch's key-value store, once all ``world`` processes have reached it (see the module docstring)."""
    address = master_address(world)
    timeout = connect_timeout()
    failure: BaseException | None = None
    with _captured_stderr() as logged:
        try:
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
        except (RuntimeError, TimeoutError, OSError) as exc:  # DistStoreError / DistNetworkError are RuntimeErrors
            failure = exc
    if failure is not None:
        message = str(failure).lower()
        if "timeout" in message or "timed out" in message:
            raise UnreachableError(unreachable(rank, world, address, timeout.total_seconds())) from None
        sys.stderr.write("".join(logged))  # not a timeout: what c10d said is worth reading
        raise failure
    store.set_timeout(STAGE_TIMEOUT)
    return store
