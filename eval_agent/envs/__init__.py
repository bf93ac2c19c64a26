"""A small registry of task families, loaded lazily: an ALFWorld run never imports VirtualHome and vice versa.

Each entry names a module that is a `TaskFamily` (`envs/base.py`): `load_tasks`, `make_env`,
`find_data_root`, `data_identity`, `INSTRUCTION` and `ICL_EXAMPLE`.
"""
from __future__ import annotations

import argparse
import importlib
import re
from typing import cast

from eval_agent.envs.base import Env, StepResult, Task, TaskFamily

REGISTRY: dict[str, str] = {
    "alfworld": "eval_agent.envs.alfworld",
    "virtualhome": "eval_agent.envs.virtualhome",
}

# How each family's task text reads (ours and the published data's), to tell data of one family from another's.
TASK_TEXT_MARKS: dict[str, re.Pattern[str]] = {
    "alfworld": re.compile(r"Your task is to: "),
    "virtualhome": re.compile(r"^The task is "),
}


def task_family_of(task_text: str) -> str | None:
    """The family whose task text this is, None when it reads like none of them (data of another source)."""
    found = [name for name, mark in TASK_TEXT_MARKS.items() if mark.search(task_text)]
    return found[0] if len(found) == 1 else None


def add_task_family_arg(p: argparse.ArgumentParser) -> None:
    """`--task_family` (the older `--task` still works): which environment a stage runs on."""
    p.add_argument("--task_family", "--task", choices=sorted(REGISTRY), required=True, help="the environment family")


def get_task_family(name: str) -> TaskFamily:
    if name not in REGISTRY:
        raise ValueError(f"unknown task family {name!r}; choose from {sorted(REGISTRY)}")
    return cast(TaskFamily, importlib.import_module(REGISTRY[name]))


__all__ = ["Env", "StepResult", "Task", "TaskFamily", "REGISTRY", "add_task_family_arg", "get_task_family",
           "task_family_of"]
