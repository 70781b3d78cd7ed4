"""The ``vlsae`` command line: a thin skin over the Python API.

Each verb lives in its own module in this package and exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``;
adding a verb means adding its module (``vlsae/cli/ood.py`` is ``vlsae ood``).
This is the one place allowed to tie every vlsae package together. User
errors (:class:`vlsae.VlsaeError`) print one line on stderr and exit with 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from vlsae.errors import VlsaeError

# The order `vlsae --help` lists verbs in; a verb module not named here (a new application's) follows them.
ORDER = ("demo", "synth", "train", "info", "world", "zoo", "extract", "concepts", "eval")
NOT_VERBS = {"configargs"}


def _available_verbs() -> dict[str, object]:
    """verb -> its module: every module of this package with ``HELP``, ``add_arguments`` and ``run``."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name not in NOT_VERBS]
    ordered = [n for n in ORDER if n in names] + sorted(n for n in names if n not in ORDER)
    found = {}
    for name in ordered:
        module = importlib.import_module(f"{__name__}.{name}")
        if all(hasattr(module, attr) for attr in ("HELP", "add_arguments", "run")):
            found[name.replace("_", "-")] = module
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


def _refuse_multi_process_launch() -> None:
    """No verb is data-parallel yet: under ``torchrun --nproc-per-node N`` every rank would run the whole
    job and race into the same --out, so refuse before any work instead of writing N copies."""
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if world.isdigit() and int(world) > 1:
        raise VlsaeError(f"launched as {world} processes (WORLD_SIZE={world}, e.g. by torchrun), but vlsae does not run "
                         "data-parallel yet: each process would train its own copy into the same --out; run it as "
                         "one process")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    try:
        _refuse_multi_process_launch()
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
