"""``vlsae zoo``: the small models of the embedded default.

``vlsae zoo list`` shows every zoo model and whether it is trained (cached)
or shipped with the repository, ``vlsae zoo train NAME [--set key=value ...]``
trains one (seeded) into the cache and prints its evaluation, ``vlsae zoo eval
NAME`` re-evaluates the model the loaders would use, ``vlsae zoo path NAME``
prints its folder, ``vlsae zoo ship NAME`` copies the cached model into the
repository's shipped folder with fp16 weights (maintainers). The work is in
:mod:`multimodal.zoo`.
"""
from __future__ import annotations

import argparse
import json

from vlsae.config import parse_key_values
from vlsae.errors import VlsaeError

HELP = "list, train or evaluate the small models of the embedded default (shapes-clip, ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "train", "eval", "path", "ship"], help="what to do")
    parser.add_argument("name", nargs="?", default=None, help="zoo model name, e.g. shapes-clip")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="training setting, e.g. steps=500 or seed=1 (repeatable; see the model's config)")
    parser.add_argument("--out", default=None, help="train into (ship from, evaluate) this folder instead of the cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from multimodal import zoo

    if args.action == "list":
        for name in zoo.list_models():
            cls = zoo.get_zoo_class(name)
            state = "cached" if zoo.is_trained(name) else "shipped" if zoo.is_shipped(name) else "not trained"
            if zoo.cache_differs_from_shipped(name):
                state += " (other settings than the shipped copy, which it shadows)"
            print(f"{name:<18} {state:<12} {cls.summary}  [{zoo.resolve_model_dir(name) or zoo.model_dir(name)}]")
        return 0
    if not args.name:
        raise VlsaeError(f"vlsae zoo {args.action} needs a model name; available: {', '.join(zoo.list_models())}")
    cls = zoo.get_zoo_class(args.name)
    if args.action == "path":
        print(zoo.resolve_model_dir(args.name) or zoo.model_dir(args.name))
        return 0
    if args.action == "ship":
        if args.overrides:
            raise VlsaeError("--set applies to vlsae zoo train only")
        target = zoo.ship_model(args.name, source=args.out)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"shipped {args.name} -> {target} ({size / 2**20:.1f} MiB)")
        return 0
    if args.action == "train":
        result = zoo.train_model(args.name, parse_key_values(args.overrides, example="steps=500"), out=args.out, progress=not args.no_progress)
        report = result.report
        print(f"trained {result.name} in {result.seconds:.0f} s -> {result.path}")
    else:
        if args.overrides:
            raise VlsaeError("--set applies to vlsae zoo train only")
        report = {"metrics": zoo.evaluate_model(args.name, folder=args.out)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(cls.describe_report(report))
    return 0
