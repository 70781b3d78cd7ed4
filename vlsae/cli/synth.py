"""``vlsae synth``: the planted-feature leaderboard.

Trains each architecture on one synthetic suite with known ground truth (equal
width, equal L0 target), scores recovery, absorption, splitting and
cross-modal agreement, prints the table and optionally writes the rows as JSON.
All the work is the ``synth`` task (:mod:`evals.tasks.synth`).
"""
from __future__ import annotations

import argparse

from evals.synthetic.generators import list_suites
from evals.tasks import run_task
from evals.tasks.synth import SynthConfig, SynthTask
from vlsae.config import parse_key_values
from vlsae.errors import VlsaeError

HELP = "train SAEs on a planted-feature suite and print the recovery leaderboard"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", required=True, choices=list_suites(), help="which planted-feature suite (required)")
    parser.add_argument("--preset", default=None,
                        help="suite preset: independent light|heavy|gba, hierarchical A|B, bidirectional default, "
                             "multimodal shared|separate (default: the first)")
    parser.add_argument("--archs", default=None,
                        help="comma-separated architectures (default: every registered one that fits the suite)")
    parser.add_argument("--latents", type=int, default=None, help="dictionary width for every arch (default: the number of planted features; "
                             "bidirectional: 2 x axes + unipolar, room to split every axis)")
    parser.add_argument("--k", type=int, default=None, help="L0 target: k of TopK-family archs, calibration target of penalty archs (default: "
                             "hierarchical 2, preset B 3; independent 5, gba 12; bidirectional 6; multimodal 6)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per SAE (default 1500)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default 512)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the trainer's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every SAE (default: 0)")
    parser.add_argument("--seeds", type=int, default=1, help="repeat for seeds seed..seed+N-1 and report mean and sd (default: 1)")
    parser.add_argument("--noise", type=float, default=0.0, help="noise sigma added to the activations (default: 0)")
    parser.add_argument("--n-train", type=int, default=None, help="training rows to draw (default 20000)")
    parser.add_argument("--n-test", type=int, default=None, help="test rows to draw (default 5000)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="suite option, e.g. correlation=0.3, spectrum=zipf, p_plus=0.8, rho=0.6 (repeatable; default: none)")
    parser.add_argument("--sae-option", action="append", default=[], metavar="ARCH.KEY=VALUE",
                        help="SAE config value for one arch, e.g. mp.residual_threshold=0.05 (repeatable; default: none)")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                        help="trainer setting, e.g. betas=[0.5,0.9375] or b_dec_init=zeros (repeatable; default: none)")
    parser.add_argument("--readout", action="append", default=[], metavar="KEY=VALUE",
                        help="planted linear readout every arch gets, feature=J and scale=c (feature J's codes times c: a "
                             "small-norm feature that drives the readout); g-SAE needs one (repeatable; default: none, "
                             "feature=0 scale=1 when an arch needs it)")
    parser.add_argument("--device", default="auto", help="training device: auto, cpu or cuda (default: auto)")
    parser.add_argument("--out", default=None, help="write the leaderboard rows to this JSON file (default: none, table only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _sae_options(items: list[str]) -> dict:
    out: dict = {}
    for key, value in parse_key_values(items, "--sae-option", "mp.residual_threshold=0.05").items():
        arch, dot, name = key.partition(".")
        if not dot or not arch or not name:
            raise VlsaeError(f"--sae-option '{key}' must name the arch: ARCH.KEY=VALUE, e.g. jumprelu.init_threshold=1")
        out.setdefault(arch, {})[name] = value
    return out


def run(args: argparse.Namespace) -> int:
    archs = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else None
    if args.archs is not None and not archs:
        raise VlsaeError("--archs is empty; give names like topk,relu or leave it out")
    config = SynthConfig(suite=args.suite, preset=args.preset, archs=archs, latents=args.latents, k=args.k,
                         steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, seeds=args.seeds,
                         noise=args.noise, n_train=args.n_train, n_test=args.n_test,
                         options=parse_key_values(args.option, "--option", "correlation=0.3"),
                         sae_options=_sae_options(args.sae_option),
                         train_options=parse_key_values(args.train_option, "--train-option", "b_dec_init=zeros"),
                         readout=parse_key_values(args.readout, "--readout", "feature=0") or None,
                         device=args.device, out=args.out, overwrite=args.overwrite)
    result = run_task("synth", config)
    for line in SynthTask.describe(result):
        print(line)
    return 0
