"""The environment interface every task family implements.

An `Env` plays one episode at a time: `reset(task)` returns the task text the agent sees first
(initial observation + goal); `step(action)` executes one action text. The episode runner owns
step counting, the 40-step budget and invalid replies, so environments stay small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


class Env(Protocol):
    name: str

    def reset(self, task: Task) -> str:
        """Load `task` in its initial state; return the first user message (observation + goal)."""

    def step(self, action: str) -> StepResult:
        """Execute one action text (already parsed from the reply)."""

    def expert_action(self) -> str | None:
        """The built-in expert's next action in the current state (None when it has none)."""

    def close(self) -> None:
        """Release resources."""
