"""Deviation detection: is the policy's explored step t a deviated action?

Deviated when every criterion holds (each is recorded): reward_not_higher (r(explored t) <= r(expert t-1) +
delta; `strict`: <), continuation_failed, action_differs, dissimilar (action similarity below sim_threshold) and
has_continuation (else the pair's `rejected` side is empty); steps t < min_step are not considered. A reply
without `Action:` is a different action with similarity 0. A record that cannot be judged is skipped with its
reason, never a crash.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from data_collection.embeddings import ActionEmbeddings
from eval_agent.records import MIN_STEP, StepRecord
from eval_agent.trajectory import Step

CRITERIA = ("reward_not_higher", "continuation_failed", "action_differs", "dissimilar", "has_continuation")


@dataclass(frozen=True)
class DeviationConfig:
    delta: float = 0.0
    strict: bool = False  # `<` instead of the original's `<=`
    sim_threshold: float = 0.95
    min_step: int = MIN_STEP

    def reward_not_higher(self, explored: float, expert_prev: float) -> bool:
        """r(explored) - r(expert prev) <= delta (< when strict); a difference within 1e-9 of delta
        counts as equal, so float sums like 0.4 + 0.2 meet an MC mean of 0.6 at the boundary."""
        diff = explored - expert_prev
        if math.isclose(diff, self.delta, rel_tol=0.0, abs_tol=1e-9):
            return not self.strict
        return diff < self.delta


def skip_reason(rec: StepRecord, expert_step: Step | None, explored_reward: float | None,
                expert_prev_reward: float | None, cfg: DeviationConfig) -> str | None:
    """Why the record cannot be judged, checked in this order; None when it can."""
    if rec.t < cfg.min_step:
        return "before_min_step"
    if rec.step is None:
        return "no_step"
    if rec.error:
        return "env_error"
    if expert_step is None:
        return "no_expert_step"
    if expert_step.action is None:
        return "expert_action_missing"
    if explored_reward is None:
        return "missing_mc_explored"
    if expert_prev_reward is None:
        return "missing_mc_expert_prev"
    return None


def check_deviation(rec: StepRecord, expert_step: Step | None, explored_reward: float | None,
                    expert_prev_reward: float | None, embeddings: ActionEmbeddings, cfg: DeviationConfig) -> dict[str, Any]:
    """The row of deviations.jsonl for one explore record: inputs, every criterion and the verdict."""
    skip = skip_reason(rec, expert_step, explored_reward, expert_prev_reward, cfg)
    explored_action = rec.step["action"] if rec.step else None
    expert_action = expert_step.action if expert_step else None
    row: dict[str, Any] = {"key": rec.key, "task_key": rec.task_key, "t": rec.t, "explored_action": explored_action,
                           "expert_action": expert_action, "explored_reward": explored_reward,
                           "expert_prev_reward": expert_prev_reward, "similarity": None,
                           **{c: None for c in CRITERIA}, "skip": skip, "deviated": False}
    if skip is not None:
        return row
    similarity = embeddings.similarity(explored_action, expert_action)
    continuation = rec.trajectory["steps"][rec.t + 1:] if rec.trajectory else []
    row.update(similarity=similarity,
               reward_not_higher=cfg.reward_not_higher(explored_reward, expert_prev_reward),
               continuation_failed=not rec.success,
               action_differs=explored_action != expert_action,
               dissimilar=similarity < cfg.sim_threshold,
               has_continuation=bool(continuation))
    row["deviated"] = all(row[c] for c in CRITERIA)
    return row
