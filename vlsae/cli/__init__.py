"""The ``vlsae`` command line: a thin skin over the Python API.

Each verb lives in its own module in this package and exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``;
adding a verb means adding its module (``vlsae/cli/ood.py`` is ``vlsae ood``).
This is the one place allowed to tie every vlsae package together. User
errors (:class:`vlsae.VlsaeError`) print one line on stderr and exit with 2;
anything else is a bug and keeps its traceback. A verb that runs data-parallel under
``torchrun`` sets ``DATA_PARALLEL = True`` (train, extract, filter, ood); every other verb refuses a
multi-process launch. Under torchrun only rank 0 prints a user error: the checks read the same
config and data on every rank (and a step's checks are all-reduced), so its line speaks for all.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from vlsae.errors import VlsaeError
from vlsae.rendezvous import UnreachableError
from vlsae.training.distributed import end_process, env_world_size, is_main_process

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
        verb_parser.set_defaults(_run=module.run, _data_parallel=getattr(module, "DATA_PARALLEL", False))
    return parser


def _refuse_multi_process_launch(verb: str) -> None:
    """Under ``torchrun --nproc-per-node N`` a verb that is not data-parallel would run the whole job
    in every rank and race into the same output, so refuse before any work instead of writing N copies."""
    world = env_world_size()
    if world > 1:
        parallel = ", ".join(f"`vlsae {name}`" for name, module in _available_verbs().items()
                             if getattr(module, "DATA_PARALLEL", False))
        raise VlsaeError(f"launched as {world} processes (WORLD_SIZE={world}, e.g. by torchrun), but `vlsae {verb}` "
                         f"does not run data-parallel (only {parallel} do): each process would do the whole job "
                         "into the same output; run it as one process")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help()
        return 2
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for a verb that re-launches itself (train --nproc)
    return end_process(_run_verb(args))  # a torchrun rank ends here (see end_process); otherwise returns


def _run_verb(args: argparse.Namespace) -> int:
    try:
        if not args._data_parallel:
            _refuse_multi_process_launch(args.verb)
        return int(args._run(args) or 0)
    except VlsaeError as exc:
        if is_main_process() or isinstance(exc, UnreachableError):  # otherwise rank 0 says it for every rank
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
