"""The ``vlsae`` command line: a thin skin over the Python API.

Each verb lives in its own module in this package and exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
This is the one place allowed to tie every vlsae package together. User
errors (:class:`vlsae.VlsaeError`) print one line on stderr and exit with 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from vlsae.errors import VlsaeError

# verb -> module in this package; listed here so `vlsae --help` shows the order we want.
VERBS: dict[str, str] = {
    "demo": "demo",
    "synth": "synth",
    "train": "train",
    "info": "info",
    "world": "world",
    "zoo": "zoo",
    "extract": "extract",
    "concepts": "concepts",
    "eval": "eval",
}


def _available_verbs() -> dict[str, object]:
    found = {}
    for verb, module_name in VERBS.items():
        try:
            found[verb] = importlib.import_module(f"{__name__}.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module_name}":
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlsae",
        description="Multimodal sparse autoencoders: train shared-concept SAEs on vision-language activations and use them.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, module in _available_verbs().items():
        verb_parser = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except VlsaeError as exc:
        print(f"vlsae {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlsae {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
