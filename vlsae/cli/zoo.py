"""``vlsae zoo``: the small models of the embedded default.

``vlsae zoo list [NAME]`` shows the zoo models (or one) and whether each is
trained (cached) or shipped with the repository, ``vlsae zoo train NAME [--set
key=value ...]`` trains one (seeded) into the cache and prints its evaluation,
``vlsae zoo eval NAME`` re-evaluates the model the loaders would use, ``vlsae
zoo path NAME`` prints its folder, ``vlsae zoo ship NAME`` copies the cached
model into the repository's shipped folder with fp16 weights (maintainers).
Each action has its own ``--help``. The work is in :mod:`multimodal.zoo`.
"""
from __future__ import annotations

import argparse
import json

from multimodal import zoo
from vlsae.config import parse_key_values

HELP = "list, train or evaluate the small models of the embedded default (shapes-clip, ...)"
ACTIONS = {
    "list": "list the zoo models (or one) with where each loads from",
    "train": "train a zoo model (seeded) into the cache or --out and print its evaluation",
    "eval": "evaluate the trained model the loaders would use (or the one in --out)",
    "path": "print the folder the model loads from",
    "ship": "copy the cached model into the repository's shipped folder with fp16 weights (maintainers)",
}


def _name(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    names = ", ".join(zoo.list_models())
    if optional:
        parser.add_argument("name", nargs="?", default=None, help=f"one zoo model ({names}; default: all)")
    else:
        parser.add_argument("name", help=f"zoo model: {names}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    parsers = {name: actions.add_parser(name, help=text, description=text) for name, text in ACTIONS.items()}
    _name(parsers["list"], optional=True)
    for name in ("train", "eval", "path", "ship"):
        _name(parsers[name])
    train = parsers["train"]
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="training setting, e.g. steps=500 or seed=1 (repeatable; see the model's config; default: none)")
    train.add_argument("--out", default=None, help="train into this folder (default: the cache, $VLSAE_CACHE/zoo/NAME)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    parsers["eval"].add_argument("--out", default=None, help="evaluate the model in this folder (default: the one the loaders use)")
    parsers["ship"].add_argument("--out", default=None, help="ship the model in this folder (default: the cached one)")
    for name in ("train", "eval"):
        parsers[name].add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name in [zoo.get_zoo_class(args.name).name] if args.name else zoo.list_models():
            cls = zoo.get_zoo_class(name)
            state = "cached" if zoo.is_trained(name) else "shipped" if zoo.is_shipped(name) else "not trained"
            if zoo.cache_differs_from_shipped(name):
                state += " (other settings than the shipped copy, which it shadows)"
            print(f"{name:<18} {state:<12} {cls.summary}  [{zoo.resolve_model_dir(name) or zoo.model_dir(name)}]")
        return 0
    cls = zoo.get_zoo_class(args.name)
    if args.action == "path":
        print(zoo.resolve_model_dir(args.name) or zoo.model_dir(args.name))
        return 0
    if args.action == "ship":
        target = zoo.ship_model(args.name, source=args.out)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"shipped {args.name} -> {target} ({size / 2**20:.1f} MiB)")
        return 0
    if args.action == "train":
        result = zoo.train_model(args.name, parse_key_values(args.overrides, example="steps=500"), out=args.out,
                                 progress=not args.no_progress)
        report = result.report
        print(f"trained {result.name} in {result.seconds:.0f} s -> {result.path}")
    else:
        report = {"metrics": zoo.evaluate_model(args.name, folder=args.out)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(cls.describe_report(report))
    return 0
