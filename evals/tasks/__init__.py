"""Evaluation tasks: one registered task per evaluation or application.

    from evals.tasks import run_task, list_tasks
    list_tasks()                                     # ['concepts', 'demo', 'synth', ...]
    result = run_task("synth", {"suite": "hierarchical", "archs": ["topk"]})

``vlsae eval NAME --config FILE.yaml --set key=value`` runs the same thing
from the command line, with one ``--flag`` per config field; the applications
(OOD detection, zero-shot, filtering, steering) each add a module here plus,
where they want their own flag layout, a thin verb in ``vlsae/cli``. Every run
checks its output paths before doing any work.
"""
from __future__ import annotations

from typing import Any, Callable

from vlsae.config import from_dict
from vlsae.files import check_writable_dir, check_writable_file
from vlsae.registry import Registry

from evals.tasks.base import Task

TASKS: Registry[type[Task]] = Registry("evaluation task", packages=[__name__])


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a task runnable as ``run_task(name)`` and ``vlsae eval name``."""
    return TASKS.register(name)


def list_tasks() -> list[str]:
    return TASKS.names()


def get_task(name: str) -> type[Task]:
    return TASKS.get(name)


def task_config(name: str, values: dict[str, Any] | Any | None = None) -> Any:
    """The task's config dataclass from a mapping (unknown keys are one-line errors) or as given."""
    cls = get_task(name)
    if isinstance(values, cls.config_class):
        return values
    return from_dict(cls.config_class, values or {}, where=f"{name} config")


def check_outputs(name: str, config: Any) -> None:
    """One-line error now if an output path of this run cannot be written."""
    for flag, path, is_file in get_task(name).outputs(config):
        (check_writable_file if is_file else check_writable_dir)(path, flag=flag)


def run_task(name: str, config: dict[str, Any] | Any | None = None) -> dict[str, Any]:
    """Run the task ``name`` with ``config`` (a mapping or its config dataclass)."""
    cls = get_task(name)
    config = task_config(name, config)
    check_outputs(name, config)
    return cls.run(config)


__all__ = ["TASKS", "Task", "register_task", "list_tasks", "get_task", "task_config", "check_outputs", "run_task"]
