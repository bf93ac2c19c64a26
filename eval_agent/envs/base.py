"""What a task family (an environment such as ALFWorld) provides; adding one means filling in one module.

A `TaskFamily` module lists its tasks per split and makes environments. An `Env` plays one episode at a
time: `reset(task)` returns the task text the agent sees first (initial observation + goal);
`step(action)` executes one action text. The episode runner owns step counting, the step budget and
invalid replies, so environments stay small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class Task:
    """One task of a split. `key` is stable across runs and machines (used for resuming)."""

    key: str
    env: str
    split: str
    meta: dict[str, Any] = field(default_factory=dict)  # task_type, game_file / path, ...


@dataclass
class StepResult:
    observation: str
    done: bool
    success: bool
    reward: float = 0.0
    valid: bool = True  # the environment accepted the action (False: it refused it, e.g. "Nothing happens.")


class Env(Protocol):
    name: str

    def reset(self, task: Task) -> str:
        """Load `task` in its initial state; return the first user message (observation + goal)."""

    def step(self, action: str) -> StepResult:
        """Execute one action text (already parsed from the reply); `valid` says whether it was accepted."""

    def expert_action(self) -> str | None:
        """The built-in expert's next action in the current state (None when it has none)."""

    def close(self) -> None:
        """Release resources."""


class TaskFamily(Protocol):
    """The module-level names a task family module (`eval_agent/envs/<name>.py`) defines; register the
    module in `eval_agent.envs.REGISTRY`."""

    INSTRUCTION: str  # the first user turn of every prompt
    ICL_EXAMPLE: Any  # the one-shot example, an `eval_agent.trajectory.Trajectory`

    def find_data_root(self, root: str | Path | None = None) -> Path:
        """The data folder: `root`, else the family's environment variable, else the generated set."""

    def data_identity(self, split: str, data_root: str | Path | None = None) -> dict[str, Any]:
        """What the tasks of `split` are, cheaply (no game loaded), for the fingerprint of a stage that plays them."""

    def load_tasks(self, split: str, data_root: str | Path | None = None, limit: int | None = None) -> list[Task]:
        """The tasks of `split` (train | seen | unseen) in a stable order; the first `limit` only."""

    def make_env(self, expert: bool = False, **options: Any) -> Env:
        """A fresh environment; `expert` prepares the built-in expert's state tracking."""
