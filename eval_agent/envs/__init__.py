"""A small registry of task families, loaded lazily: an ALFWorld run never imports VirtualHome
and vice versa (the original imported both and broke on whichever was missing).

Each entry names a module exposing `load_tasks(split, **kw) -> list[Task]`, `make_env(**kw) -> Env`,
`INSTRUCTION` and `ICL_EXAMPLE` (a Trajectory).
"""
from __future__ import annotations

import importlib
from types import ModuleType

from eval_agent.envs.base import Env, StepResult, Task

REGISTRY: dict[str, str] = {
    "alfworld": "eval_agent.envs.alfworld",
    "virtualhome": "eval_agent.envs.virtualhome",
}


def get_task_family(name: str) -> ModuleType:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


__all__ = ["Env", "StepResult", "Task", "REGISTRY", "get_task_family"]
