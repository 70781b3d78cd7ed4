"""What every evaluation task shares: a config dataclass, a run function, a printed summary.

A task is one module in :mod:`evals.tasks` with a :class:`Task` subclass
decorated by ``@register_task("name")``. Its ``config_class`` is a dataclass
whose every field carries a help line (:func:`vlsae.config.option`); that one
dataclass gives the Python defaults, the YAML schema of ``vlsae eval NAME
--config FILE`` and the generated ``--flag`` help. ``run`` does the work and
returns a JSON-safe dict; ``describe`` turns it into the lines the CLI prints.
"""
from __future__ import annotations

import json
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar


class Task:
    """Base of registered evaluation tasks."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    config_class: ClassVar[type]
    #: config fields naming output folders, checked for writability before any work starts
    output_fields: ClassVar[tuple[str, ...]] = ("out",)
    #: config fields naming output files (their folders are checked)
    output_file_fields: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def run(cls, config: Any) -> dict[str, Any]:
        """Do the work; return a JSON-safe dict of results (paths as strings)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, result: dict[str, Any]) -> list[str]:
        """Lines the CLI prints after a run (default: the result as JSON)."""
        return [json.dumps(result, indent=1, default=str)]

    @classmethod
    def outputs(cls, config: Any) -> list[tuple[str, Path, bool]]:
        """(flag, path, is_file) for every output this run will write, for the pre-flight check."""
        assert is_dataclass(config)
        names = {f.name for f in fields(config)}
        out = []
        for is_file, group in ((False, cls.output_fields), (True, cls.output_file_fields)):
            for name in group:
                if name in names and getattr(config, name):
                    out.append((f"--{name.replace('_', '-')}", Path(getattr(config, name)), is_file))
        return out
