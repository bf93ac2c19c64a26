"""Step rewards: per step record (task, step t, kind), the mean success of its Monte-Carlo rollouts and how
many there were. A record without rollouts has no reward (None: a counted skip wherever it is needed); one
with fewer or more than the expected N is reported.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from eval_agent.records import Rollout, StepRecord, mc_values


@dataclass
class StepReward:
    key: str
    task_key: str
    t: int
    kind: str
    mc_reward: float | None
    mc_samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_rewards(records: list[StepRecord], rollouts: list[Rollout], n: int | None) -> tuple[dict[str, StepReward], dict[str, Any]]:
    """Rewards by record key, and the counts for the summary. A rollout key seen twice counts once
    (the last copy, as `JsonlStore` reads it); rollouts of unknown records are counted, not used."""
    unique = {r.key: r for r in rollouts}
    known = {rec.key for rec in records}
    used = [r for r in unique.values() if r.record_key in known]
    means = mc_values(used)
    samples = Counter(r.record_key for r in used)
    out = {rec.key: StepReward(rec.key, rec.task_key, rec.t, rec.kind, means.get(rec.key), samples[rec.key])
           for rec in records}
    missing = [k for k, s in out.items() if s.mc_samples == 0]
    stats = {"records": len(records), "rollouts": len(rollouts), "duplicate_rollout_keys": len(rollouts) - len(unique),
             "rollouts_of_unknown_records": len(unique) - len(used), "with_reward": len(out) - len(missing),
             "missing_samples": len(missing), "missing_examples": missing[:5]}
    if n is not None:
        stats["expected_samples"] = n
        stats["fewer_samples"] = sum(0 < s.mc_samples < n for s in out.values())
        stats["more_samples"] = sum(s.mc_samples > n for s in out.values())
    return out, stats
