"""``vlsae train``: train any registered SAE from a YAML run config and/or flags.

Precedence, lowest first: the run folder's saved ``run.yaml`` (with --resume),
the --config file, the flags, then --set overrides. Without ``--out`` (and no
``out:`` in the config) the run goes to a fresh folder under ``runs/``, printed
before training starts, so a finished SAE is never thrown away.

Data-parallel: ``torchrun --nproc-per-node N -m vlsae train ...`` (or ``vlsae train --nproc N
...``, which launches exactly that through ``torch.distributed.run``) trains one SAE in N
processes, ``--batch-size`` being the global batch (:mod:`vlsae.training.distributed`).

Sweeps: ``--sweep sae.k=16,32,64`` (repeatable; or a ``sweep:`` section in the config) trains every
combination on one stream of batches read once, one run folder each under --out, and prints the
table that ``OUT/sweep.json`` and ``OUT/sweep.md`` hold (:mod:`vlsae.training.sweep`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vlsae.errors import VlsaeError
from vlsae.files import atomic_write_json, atomic_write_text
from vlsae.saes import get_sae_class, list_archs
from vlsae.training.config import TrainConfig
from vlsae.training.distributed import check_data_parallel, env_world_size, session
from vlsae.training.run import RunConfig, run_config_from_dict, run_training, saved_run_config
from vlsae.training.sweep import format_table, is_sweep_dir, load_sweep, run_sweep, saved_sweep
from vlsae.training.log import format_value
from vlsae.training.preflight import CHECKPOINT_DIR, TRAINING_JSON
from vlsae.training.trainer import check_out_dir

from multimodal.extract_hooks import hook_caches, hook_folder, is_multi_hook

HELP = "train an SAE on a tensor file, an activation cache or a planted-feature suite"
DATA_PARALLEL = True  # runs under torchrun: each process trains on its slice of every batch
RUNS_DIR = "runs"
_TRAIN = TrainConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (see configs/); flags and --set override it (default: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any run-config key, e.g. --set sae.k=16 --set train.lr=3e-4 (repeatable; default: none)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="train one SAE per value, on one stream of batches read once, e.g. --sweep sae.k=16,32,64; "
                             "several --sweep flags train every combination, each in OUT/k=16,... (arch, sae.* and "
                             "the optimisation keys of train.*; default: none, one SAE)")
    data = parser.add_argument_group("data (one of)")
    data.add_argument("--data", help="a .safetensors or .npy tensor file (one tensor, or tensors named by modality; default: none)")
    data.add_argument("--acts", help="an activation cache folder from `vlsae extract` (default: none)")
    data.add_argument("--synthetic", help="a planted-feature suite: independent, hierarchical, bidirectional, multimodal (default: none)")
    data.add_argument("--modality", help="train a single-stream SAE on one modality of paired data (default: all modalities)")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", help=f"architecture: {', '.join(list_archs())} (default: {RunConfig().arch})")
    model.add_argument("--latents", type=int, help="number of latents (sae.n_latents; default: the architecture's, required for most)")
    model.add_argument("--k", type=int, help="active latents per input (sae.k; default: the architecture's, 32 for topk)")
    run = parser.add_argument_group("training")
    run.add_argument("--steps", type=int, help=f"optimizer steps (train.steps; default {_TRAIN.steps})")
    run.add_argument("--batch-size", type=int, help=f"rows per batch (train.batch_size; default {_TRAIN.batch_size})")
    run.add_argument("--lr", type=float, help="peak learning rate (train.lr; default 2e-4 / sqrt(n_latents / 2^14))")
    run.add_argument("--seed", type=int, help=f"seed of the SAE's init, batch order and everything random (default {_TRAIN.seed})")
    run.add_argument("--device", help=f"auto, cpu, cuda or cuda:N (default {_TRAIN.device})")
    run.add_argument("--align-steps", type=int, help="train the contrastive alignment stage first for this many steps (default 0: off)")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help=f"write a resumable checkpoint every N steps, 0 only at the end (default {_TRAIN.checkpoint_every})")
    run.add_argument("--out", help=f"run folder, never overwritten (default: a fresh {RUNS_DIR}/ARCH-TIMESTAMP folder)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train data-parallel in N processes on this machine, launched through torch.distributed.run "
                          "(gloo on the CPU, one GPU each on CUDA); --batch-size stays the global batch and must be a "
                          "multiple of N (default 1: this process alone)")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [("data.path", args.data), ("data.acts", args.acts), ("data.synthetic", args.synthetic),
             ("data.modality", args.modality), ("arch", args.arch), ("sae.n_latents", args.latents), ("sae.k", args.k),
             ("train.steps", args.steps), ("train.batch_size", args.batch_size), ("train.lr", args.lr),
             ("train.seed", args.seed), ("train.device", args.device), ("align.steps", args.align_steps),
             ("train.checkpoint_every", args.checkpoint_every), ("out", args.out)]
    out = [f"{key}={value}" for key, value in pairs if value is not None]
    if args.quiet:
        out.append("train.progress=false")
    return out


def fresh_run_dir(arch: str, root: str | Path = RUNS_DIR) -> Path:
    """``runs/ARCH-YYYYmmdd-HHMMSS`` (with a -2, -3, ... suffix if that exists already)."""
    base = Path(root) / f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _run_config(args: argparse.Namespace) -> tuple[RunConfig | None, dict[str, Any], dict[str, list[Any]]]:
    """(the run config, or None for a sweep; the run-config mapping; the sweep's axes, empty for one run)."""
    base = None
    overrides = [*_flag_overrides(args), *args.set]
    if args.resume and args.acts and is_multi_hook(args.acts):  # each hook's run resumes itself (_per_hook)
        if not args.out:
            raise VlsaeError("--resume needs --out (the folder of the interrupted runs)")
        data, axes = load_sweep(args.config, overrides, args.sweep, base=None)
        if axes:
            raise VlsaeError("--sweep does not combine with one SAE per hook; sweep one hook's cache instead")
        return run_config_from_dict(data), data, axes
    if args.resume:
        if not args.out:
            raise VlsaeError("--resume needs --out (the folder of the interrupted run)")
        if is_sweep_dir(args.out):
            if args.sweep:
                raise VlsaeError(f"the sweep's keys come from {args.out}/sweep.yaml on --resume; drop --sweep")
            base, axes = saved_sweep(args.out)
            data, _ = load_sweep(args.config, overrides, [], base=base)
            return None, data, axes
        check_out_dir(args.out, resume=True)
        base = saved_run_config(args.out)
        if base is None and args.config is None:
            raise VlsaeError(f"{args.out} has a checkpoint but no run.yaml; pass the run's --config and flags again with --resume")
    elif args.config is None and not (args.data or args.acts or args.synthetic):
        raise VlsaeError("no training data: pass --config FILE, --data FILE, --acts DIR or --synthetic SUITE")
    data, axes = load_sweep(args.config, overrides, args.sweep, base=base)
    if axes and args.resume:
        raise VlsaeError(f"{args.out} holds one run, not a sweep; resume it without --sweep")
    if axes:
        run_config_from_dict({k: v for k, v in data.items() if k != "out"})  # the shared keys, checked now
        return None, data, axes
    return run_config_from_dict(data), data, axes


def run(args: argparse.Namespace) -> int:
    run_config, data, axes = _run_config(args)
    if run_config is None:
        return _sweep(args, data, axes)
    if run_config.data.acts and is_multi_hook(run_config.data.acts):
        if args.nproc is not None and args.nproc != 1 and run_config.out is None:
            run_config.out = str(fresh_run_dir("hooks"))
            args._argv = [*args._argv, "--out", run_config.out]
        return launch(args, run_config, sweep=True) if args.nproc not in (None, 1) else _per_hook(args, run_config)
    if args.nproc is not None and args.nproc != 1:
        return launch(args, run_config)
    with session(run_config.train.device) as replicas:
        if run_config.out is None:  # rank 0 names the folder, so every rank writes to the same one
            run_config.out = replicas.broadcast_object(str(fresh_run_dir(run_config.arch)) if replicas.is_main else None)
            if replicas.is_main:
                print(f"vlsae train: no --out given; writing the run to {run_config.out}")
        result = run_training(run_config, resume=args.resume)
        if not replicas.is_main:
            return 0
    s = result.summary
    print(f"fvu {s['fvu']:.4f}  l0 {s['l0']:.2f}  dead {s['dead_fraction']:.3f}  ({s['eval_split']}, {s['eval_rows']} rows)")
    print(f"saved {result.sae.arch} SAE to {result.out_dir}")
    return 0


def _per_hook(args: argparse.Namespace, run_config: RunConfig) -> int:
    """``--acts OUT`` of a multi-hook extraction: one SAE per hook, each an ordinary run in ``RUN/<hook>``, then
    one table (``RUN/hooks.md``, ``RUN/hooks.json``). ``--resume`` (with the same ``--acts``) keeps the finished
    runs, continues the interrupted ones and starts those not begun."""
    caches = hook_caches(run_config.data.acts)
    rows: list[dict[str, Any]] = []
    with session(run_config.train.device) as replicas:
        root = run_config.out
        if root is None:
            root = replicas.broadcast_object(str(fresh_run_dir("hooks")) if replicas.is_main else None)
            if replicas.is_main:
                print(f"vlsae train: no --out given; writing one run per hook to {root}")
        state = {}  # hook -> "finished" | "interrupted" | "new": what --resume does with its run
        for cache in caches:  # every run checked before the first trains: a bad one costs nothing
            out = Path(root) / hook_folder(cache.hook)
            state[cache.hook] = ("finished" if (out / TRAINING_JSON).is_file() else
                                 "interrupted" if (out / CHECKPOINT_DIR).is_dir() else "new") if args.resume else "new"
            if state[cache.hook] != "finished":
                check_out_dir(out, state[cache.hook] == "interrupted")
        for cache in caches:
            out = Path(root) / hook_folder(cache.hook)
            if state[cache.hook] == "finished":
                s = json.loads((out / TRAINING_JSON).read_text())["summary"]
            else:
                one = dataclasses.replace(run_config, out=str(out),
                                          data=dataclasses.replace(run_config.data, acts=str(cache.path)))
                s = run_training(one, resume=state[cache.hook] == "interrupted").summary
            rows.append({"hook": cache.hook, "path": str(out),
                         **{k: s.get(k) for k in ("d_in", "n_latents", "fvu", "l0", "dead_fraction", "seconds")}})
        if not replicas.is_main:
            return 0
    head = ["hook", "d_in", "n_latents", "fvu", "l0", "dead_fraction", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(format_value(r[k]) if isinstance(r[k], float) else str(r[k]) for k in head) + " |"
              for r in rows]
    table = "\n".join(lines)
    atomic_write_text(Path(root) / "hooks.md", table + "\n")
    atomic_write_json(Path(root) / "hooks.json", {"acts": run_config.data.acts, "runs": rows})
    print(table)
    print(f"saved {len(rows)} {run_config.arch} SAEs, one per hook, to {root} (hooks.md, hooks.json)")
    return 0


def _sweep(args: argparse.Namespace, data: dict[str, Any], axes: dict[str, list[Any]]) -> int:
    """``--sweep`` (or a ``sweep:`` section): every combination on one stream, then the comparison table."""
    shared = run_config_from_dict({k: v for k, v in data.items() if k != "out"})
    if args.nproc is not None and args.nproc != 1:
        if data.get("out") is None:
            data["out"] = str(fresh_run_dir("sweep"))
            args._argv = [*args._argv, "--out", data["out"]]
        shared.out = data["out"]
        return launch(args, shared, sweep=True)
    with session(shared.train.device) as replicas:
        out = data.get("out")
        if out is None:
            out = replicas.broadcast_object(str(fresh_run_dir("sweep")) if replicas.is_main else None)
            if replicas.is_main:
                print(f"vlsae train: no --out given; writing the sweep to {out}")
        result = run_sweep(data, axes, out, resume=args.resume)
        if not replicas.is_main:
            return 0
    print(format_table(result.summary))
    print(f"saved {len(result.arms)} SAEs to {result.out_dir} (sweep.json, sweep.md)")
    return 0


def launch(args: argparse.Namespace, run_config: RunConfig, sweep: bool = False) -> int:
    """``--nproc N``: check what can be checked here, then run this same command in N processes with
    ``python -m torch.distributed.run --standalone --nproc-per-node N -m vlsae train ...``."""
    n = args.nproc
    if n < 1:
        raise VlsaeError(f"--nproc must be at least 1, got {n}")
    if env_world_size() > 1:
        raise VlsaeError("--nproc launches its own processes; under torchrun leave it out (torchrun's "
                         "--nproc-per-node sets the number)")
    check_data_parallel(get_sae_class(run_config.arch), run_config.train.batch_size, n)
    argv = _without_nproc(args._argv)
    if run_config.out is None and not sweep:
        run_config.out = str(fresh_run_dir(run_config.arch))
        print(f"vlsae train: no --out given; writing the run to {run_config.out}")
        argv += ["--out", run_config.out]
    if not sweep:  # a sweep folder is checked by run_sweep in the launched processes
        check_out_dir(run_config.out, args.resume)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # torchrun's default would be 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "vlsae", *argv]
    return subprocess.run(command, env=env).returncode


def _without_nproc(argv: list[str]) -> list[str]:
    """argv less its --nproc N (or --nproc=N, or an abbreviation argparse took for it): torch's launcher
    would read it as its own --nproc-per-node, and the launched processes run as one rank each."""
    out, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 3 and "--nproc".startswith(name):
            skip = "=" not in token
        else:
            out.append(token)
    return out
