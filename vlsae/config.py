"""Dataclass configs that document themselves.

Every config field is declared with :func:`option`, which carries a one-line
help text. The same dataclass then serves as code defaults, as the schema of
the YAML files in ``configs/`` and as ``--help`` text. Unknown keys are an
error naming the closest valid key, so a typo never silently does nothing.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlsae.errors import VlsaeError

T = TypeVar("T")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a help line (``factory`` for mutable defaults)."""
    meta = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_help(cls: type) -> dict[str, str]:
    """name -> help line, for every field of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{match[0]}'? " if match else ""
    return f"{hint}valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check a YAML/JSON value against a field type, converting ints to floats
    and lists to tuples where the annotation asks; a mismatch is a user error."""
    if isinstance(annotation, str):
        return value  # unresolved forward reference: trust the value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except VlsaeError as exc:
                errors.append(str(exc))
        raise VlsaeError(errors[0] if errors else f"bad value for '{name}': {value!r}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise VlsaeError(f"'{name}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise VlsaeError(f"'{name}' must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise VlsaeError(f"'{name}' must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise VlsaeError(f"'{name}' must be a string, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise VlsaeError(f"'{name}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, name) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise VlsaeError(f"'{name}' must be a mapping, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build ``cls`` from a mapping; unknown keys and wrong types are VlsaeErrors."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise VlsaeError(f"unknown key '{unknown[0]}' in {where}: {_closest(unknown[0], list(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints.get(name, Any), f"{where}.{name}")
    missing = [n for n, f in fields.items()
               if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise VlsaeError(f"{where} is missing required key '{missing[0]}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise VlsaeError(f"invalid {where}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-safe dict of a config dataclass (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a VlsaeError."""
    path = Path(path)
    if not path.is_file():
        raise VlsaeError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise VlsaeError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VlsaeError(f"config {path} must be a mapping of keys to values")
    return data


def parse_key_values(items: list[str], flag: str = "--set", example: str = "sae.k=16") -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b.c": "x"}``: the one parser of ``key=value`` flags.

    Values are read as YAML (``16`` is an int, ``[1, 2]`` a list, ``true`` a bool);
    anything YAML cannot read stays a string. A later key wins over an earlier one.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise VlsaeError(f"{flag} '{item}' must look like key=value, e.g. {example}")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, value = next(iter(parse_key_values([item], flag="override").items()))
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise VlsaeError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data
