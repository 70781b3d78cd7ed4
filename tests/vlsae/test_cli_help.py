"""Every verb's --help is complete: each flag says what it does, and every flag that takes a value states its default."""
from __future__ import annotations

import argparse

import pytest

from vlsae.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path: str = "vlsae"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


PARSERS = list(_parsers(build_parser()))
FLAGLESS = (argparse._HelpAction, argparse._SubParsersAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
            argparse.BooleanOptionalAction)


def test_every_verb_is_reachable():
    names = {path for path, _ in PARSERS}
    for verb in ("demo", "synth", "train", "info", "world", "zoo", "extract", "concepts", "eval"):
        assert f"vlsae {verb}" in names
    assert {"vlsae zoo list", "vlsae zoo train", "vlsae eval synth"} <= names


@pytest.mark.parametrize("path, parser", PARSERS, ids=[p for p, _ in PARSERS])
def test_flags_have_help_with_defaults(path, parser):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or isinstance(action, argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 8, f"{path} {name} has no help"
        if action.option_strings and not isinstance(action, FLAGLESS):
            stated = "default" in action.help.lower() or (action.required and "required" in action.help.lower())
            assert stated, f"{path} {name}: help does not state its default (or that it is required): {action.help!r}"
