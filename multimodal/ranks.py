"""The processes of a torchrun launch, and what they pass each other: :class:`Ranks`, :class:`Exchange`.

The verbs that run split under ``torchrun --nproc-per-node N`` (extraction,
filtering, OOD detection) need little between their processes: a barrier
between stages, a few small records (what each rank did, a plan made on rank
0) and every rank's error. :class:`Exchange` carries them through the
key-value store of torchrun's rendezvous; :func:`on_every_rank` and
:func:`on_main_rank` run a stage so that an error on any rank is raised on
every rank. One process (WORLD_SIZE unset or 1) needs no store: every call is
local and nothing waits.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable

import torch.distributed as dist

from vlsae.errors import VlsaeError
from vlsae.rendezvous import STAGE_TIMEOUT, join_store

# a stage waits for the slowest rank (see vlsae.rendezvous); joining the others has its own, short timeout
TIMEOUT = STAGE_TIMEOUT


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them."""
        world = max(1, _env_int("WORLD_SIZE", 1))
        rank = _env_int("RANK", 0)
        if not 0 <= rank < world:
            raise VlsaeError(f"RANK={rank} is outside WORLD_SIZE={world}; launch the processes with torchrun")
        return cls(rank, world, _env_int("LOCAL_RANK", 0))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shards(self, n: int) -> list[int]:
        """The data shards of this rank among ``n``: ``rank, rank + world, ...`` (webdataset's node split)."""
        return list(range(self.rank, n, self.world))


class Exchange:
    """Small picklable objects passed between the ranks through the key-value store of torchrun's rendezvous.

    :meth:`gather` is an all-gather: every rank posts its object under a key of its rank and reads
    everyone's, blocking until all have posted (so it is also a barrier). It runs in the calling
    thread, without a process group: gloo's all-gather of Python objects aborts now and then at
    interpreter exit (its worker thread frees the last collective's tensors after Python has begun
    to shut down: "terminate called without an active exception", PyTorch 2.14, about 1 run in 6),
    which would fail a run that had written its whole output. One process needs no store.
    ``name`` keeps the keys of one verb's exchanges apart from another's.
    """

    _runs = 0  # exchanges opened in this process: every rank makes the same calls, so the same count

    def __init__(self, ranks: Ranks, name: str = "extract"):
        self.ranks = ranks
        self.store: Any = None
        if ranks.world <= 1:
            return
        if dist.is_initialized():  # the caller's process group already holds a client of the store
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(TIMEOUT)
        else:
            store = join_store(ranks.rank, ranks.world)  # within the connect timeout, or one line
        Exchange._runs += 1
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # keys of an earlier attempt stay in the store
        self.store = dist.PrefixStore(f"vlsae/{name}/{restart}/{Exchange._runs}", store)
        self.phases = 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (``[value]`` in one process)."""
        if self.store is None:
            return [value]
        self.phases += 1
        self.store.set(f"{self.phases}/{self.ranks.rank}", pickle.dumps(value))
        return [pickle.loads(self.store.get(f"{self.phases}/{rank}")) for rank in range(self.ranks.world)]


def on_every_rank(exchange: Any, world: int, work: Callable[[], Any]) -> list[Any]:
    """Run ``work`` on every rank and gather the results (in rank order); an error on any rank is raised on all.

    A rank's own error is raised as it is (a bug keeps its traceback in that process's output); the other
    ranks raise a one-line :class:`VlsaeError` naming the rank it came from.
    """
    own: BaseException | None = None
    try:
        outcome: dict[str, Any] = {"result": work()}
    except VlsaeError as exc:
        own, outcome = exc, {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a bug: its own rank shows the traceback, the others say where
        own, outcome = exc, {"error": f"{type(exc).__name__}: {exc} (its traceback is in that process's output)"}
    gathered = exchange.gather(outcome)
    if own is not None:
        raise own
    for rank, other in enumerate(gathered):
        if "error" in other:
            raise VlsaeError(f"process {rank} of {world}: {other['error']}")
    return [other["result"] for other in gathered]


def on_main_rank(exchange: Any, ranks: Ranks, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 alone while the others wait; its result (or its error) on every rank."""
    return on_every_rank(exchange, ranks.world, work if ranks.is_main else lambda: None)[0]
