"""Flags generated from a config dataclass: one ``--field-name`` per field, help with its default.

Used by ``vlsae eval TASK``: the task's config dataclass is the only place its
options are declared. Values are read as YAML (``--archs '[topk, relu]'``,
``--k 8``) and checked by :func:`vlsae.config.from_dict`, so a flag and a YAML
key accept the same things. Precedence, lowest first: the dataclass defaults,
``--config FILE``, the flags, then ``--set key=value``.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml

from vlsae.config import apply_overrides, field_help, load_yaml


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if value is None:
        return "none"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """``--config``, ``--set`` and one flag per field of ``config_class``."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of this task's settings; flags and --set override it (default: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, values read as YAML, e.g. --set steps=200 (repeatable; default: none)")
    helps = field_help(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        default = _default_text(field)
        help_text = f"{helps.get(field.name) or field.name} (default: {default})"
        if field.type in (bool, "bool"):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, default=None, metavar="VALUE", help=help_text)


def config_values(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The mapping of settings the flags, ``--config`` and ``--set`` give (defaults left to the dataclass)."""
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for field in dataclasses.fields(config_class):
        given = getattr(args, field.name, None)
        if given is None:
            continue
        if isinstance(given, bool):
            values[field.name] = given
            continue
        try:
            values[field.name] = yaml.safe_load(given)
        except yaml.YAMLError:
            values[field.name] = given
        if field.type in (str, "str", "str | None") and values[field.name] is not None:
            values[field.name] = str(given)  # a name like '1e3' or 'null.tar' stays the text it was
    return apply_overrides(values, args.set)
