"""Launching vlsae under torchrun from a test: a free rendezvous port, a clean environment, the command."""
from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env() -> dict[str, str]:
    """This process's environment without a launch of its own, one thread per rank (the same kernels in every
    process, so rows and scores compare exactly with a one-process run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node NPROC ... ARGS`` on a free local port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *args]
