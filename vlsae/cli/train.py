"""``vlsae train``: train any registered SAE from a YAML run config and/or flags.

Precedence, lowest first: the run folder's saved ``run.yaml`` (with --resume),
the --config file, the flags, then --set overrides.
"""
from __future__ import annotations

import argparse

from vlsae.errors import VlsaeError
from vlsae.saes import list_archs

HELP = "train an SAE on a tensor file, an activation cache or a planted-feature suite"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (see configs/); flags and --set override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any run-config key, e.g. --set sae.k=16 --set train.lr=3e-4 (repeatable)")
    data = parser.add_argument_group("data (one of)")
    data.add_argument("--data", help="a .safetensors or .npy tensor file (one tensor, or tensors named by modality)")
    data.add_argument("--acts", help="an activation cache folder from `vlsae extract`")
    data.add_argument("--synthetic", help="a planted-feature suite: independent, hierarchical, bidirectional, multimodal")
    data.add_argument("--modality", help="train a single-stream SAE on one modality of paired data")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", help=f"architecture: {', '.join(list_archs())}")
    model.add_argument("--latents", type=int, help="number of latents (sae.n_latents)")
    model.add_argument("--k", type=int, help="active latents per input (sae.k)")
    run = parser.add_argument_group("training")
    run.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    run.add_argument("--batch-size", type=int, help="rows per batch (train.batch_size)")
    run.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 / sqrt(n_latents / 2^14))")
    run.add_argument("--seed", type=int, help="seed of the SAE's init, batch order and everything random")
    run.add_argument("--device", help="auto, cpu or cuda")
    run.add_argument("--align-steps", type=int, help="train the contrastive alignment stage first for this many steps")
    run.add_argument("--out", help="run folder (never overwritten)")
    run.add_argument("--resume", action="store_true", help="continue the interrupted run in --out from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary table")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [("data.path", args.data), ("data.acts", args.acts), ("data.synthetic", args.synthetic),
             ("data.modality", args.modality), ("arch", args.arch), ("sae.n_latents", args.latents), ("sae.k", args.k),
             ("train.steps", args.steps), ("train.batch_size", args.batch_size), ("train.lr", args.lr),
             ("train.seed", args.seed), ("train.device", args.device), ("align.steps", args.align_steps),
             ("out", args.out)]
    out = [f"{key}={value}" for key, value in pairs if value is not None]
    if args.quiet:
        out.append("train.progress=false")
    return out


def run(args: argparse.Namespace) -> int:
    from vlsae.training.run import load_run_config, run_training, saved_run_config
    from vlsae.training.trainer import check_out_dir

    base = None
    if args.resume:
        if not args.out:
            raise VlsaeError("--resume needs --out (the folder of the interrupted run)")
        check_out_dir(args.out, resume=True)
        base = saved_run_config(args.out)
        if base is None and args.config is None:
            raise VlsaeError(f"{args.out} has a checkpoint but no run.yaml; pass the run's --config and flags again with --resume")
    elif args.config is None and not (args.data or args.acts or args.synthetic):
        raise VlsaeError("no training data: pass --config FILE, --data FILE, --acts DIR or --synthetic SUITE")
    run_config = load_run_config(args.config, overrides=[*_flag_overrides(args), *args.set], base=base)
    result = run_training(run_config, resume=args.resume)
    s = result.summary
    print(f"fvu {s['fvu']:.4f}  l0 {s['l0']:.2f}  dead {s['dead_fraction']:.3f}  ({s['eval_split']}, {s['eval_rows']} rows)")
    if result.out_dir is not None:
        print(f"saved {result.sae.arch} SAE to {result.out_dir}")
    return 0
