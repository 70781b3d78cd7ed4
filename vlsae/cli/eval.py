"""``vlsae eval``: run any registered evaluation task.

``vlsae eval --list`` names the tasks; ``vlsae eval TASK --help`` lists the
task's settings, one flag each, generated from its config dataclass;
``vlsae eval TASK --config FILE.yaml --set key=value`` runs it. The work is
:func:`evals.tasks.run_task`, the same call a Python user makes.
"""
from __future__ import annotations

import argparse

from evals.tasks import TASKS, get_task, run_task
from vlsae.cli.configargs import add_config_arguments, config_values

HELP = "run a registered evaluation task (vlsae eval --list; vlsae eval TASK --help)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="list the registered tasks and exit")
    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    for name, summary in TASKS.summaries().items():
        task_parser = tasks.add_parser(name, help=summary, description=summary)
        add_config_arguments(task_parser, get_task(name).config_class)


def run(args: argparse.Namespace) -> int:
    if args.list or not args.task:
        width = max(len(name) for name in TASKS.names())
        for name, summary in TASKS.summaries().items():
            print(f"{name:<{width}}  {summary}")
        return 0 if args.list else 2
    task = get_task(args.task)
    result = run_task(args.task, config_values(args, task.config_class))
    for line in task.describe(result):
        print(line)
    return 0
