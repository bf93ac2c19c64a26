"""A small registry of task families, loaded lazily: an ALFWorld run never imports VirtualHome and vice versa.

Each entry names a module that is a `TaskFamily` (`envs/base.py`): `load_tasks`, `make_env`,
`find_data_root`, `INSTRUCTION` and `ICL_EXAMPLE`.
"""
from __future__ import annotations

import argparse
import importlib
from typing import cast

from eval_agent.envs.base import Env, StepResult, Task, TaskFamily

REGISTRY: dict[str, str] = {
    "alfworld": "eval_agent.envs.alfworld",
    "virtualhome": "eval_agent.envs.virtualhome",
}


def add_task_family_arg(p: argparse.ArgumentParser) -> None:
    """`--task_family` (the older `--task` still works): which environment a stage runs on."""
    p.add_argument("--task_family", "--task", choices=sorted(REGISTRY), required=True, help="the environment family")


def get_task_family(name: str) -> TaskFamily:
    if name not in REGISTRY:
        raise ValueError(f"unknown task family {name!r}; choose from {sorted(REGISTRY)}")
    return cast(TaskFamily, importlib.import_module(REGISTRY[name]))


__all__ = ["Env", "StepResult", "Task", "TaskFamily", "REGISTRY", "add_task_family_arg", "get_task_family"]
