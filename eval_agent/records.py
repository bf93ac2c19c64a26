"""Stage-2 records (sampling) as stage 3 reads them: step records and Monte-Carlo rollouts.

A *step record* is one (task, expert step t, kind): expert steps 0..t-1 replayed in the real
environment, then step t taken by the expert (`kind="expert"`) or by the SFT policy's greedy choice
(`kind="explore"`), with the observation the environment gave. Explore records also carry the greedy
continuation to the end of the episode. A *rollout* is one temperature-1 continuation after step t;
the mean success of a record's N rollouts is its Monte-Carlo step reward.

Keys are stable strings, so every stage can skip what is done and merge shards:
    step t of a task:  f"{task_key}|t{t}" (also the evaluations' step accuracy records and histories)
    step record:  f"{task_key}|t{t}|{kind}"      rollout:  f"{record_key}|s{i}"
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from eval_agent.store import BadRecord, read_jsonl
from eval_agent.trajectory import Step, Trajectory

KINDS = ("expert", "explore")
# The first explored step data collection judges (the original skips iterations 0 and 1): its deviation test
# compares an explored step t with the expert's step t-1, and D_s pairs steps t >= MIN_STEP. Monte-Carlo rollouts
# are made for those records only (`judged`), a default both stages read.
MIN_STEP = 2


def judged(kind: str, t: int, min_step: int = MIN_STEP) -> bool:
    """Whether data collection reads the step reward of a record of `kind` at step t: an explored step from
    `min_step` on, an expert step from one before it."""
    return t >= (min_step if kind == "explore" else min_step - 1)


def task_step_key(task_key: str, t: int) -> str:
    return f"{task_key}|t{t}"


def step_key(task_key: str, t: int, kind: str) -> str:
    return f"{task_step_key(task_key, t)}|{kind}"


def rollout_key(record_key: str, sample: int) -> str:
    return f"{record_key}|s{sample}"


@dataclass
class StepRecord:
    key: str
    task_key: str  # the environment task (e.g. `train/<task dir>/<trial dir>`)
    expert_key: str  # the expert trajectory this record replays (its `key` in the expert file)
    env: str  # alfworld | virtualhome
    task_type: str | None
    t: int  # index of the step taken, 0-based; expert steps 0..t-1 were replayed before it
    kind: str  # expert | explore
    task_text: str  # the task text the environment showed (initial observation + goal)
    prefix: list[str]  # the expert replies 0..t-1 that were replayed (Step.text)
    step: dict[str, Any] | None  # Step.to_dict of step t; None when the episode ended before it
    done: bool  # the episode ended at or before step t: nothing to roll out after it
    step_success: bool  # the episode was won exactly at step t
    step_termination: str | None  # why the episode ended at step t (see Trajectory.termination), else None
    success: bool  # final success of what was run: after step t (expert) / after the greedy continuation (explore)
    termination: str | None  # final termination of what was run (None: an expert record still going after step t)
    trajectory: dict[str, Any] | None  # explore: the whole greedy episode (Trajectory.to_dict); expert: None
    error: str | None  # environment error message, if an error ended the episode

    @property
    def step_obj(self) -> Step | None:
        return Step(**self.step) if self.step is not None else None

    def rollout_prefix(self) -> list[str]:
        """The replies an MC rollout replays before sampling: expert steps 0..t-1 and this step t."""
        return self.prefix + ([self.step["text"]] if self.step is not None else [])

    def trajectory_obj(self) -> Trajectory | None:
        return Trajectory.from_dict(self.trajectory) if self.trajectory is not None else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Rollout:
    key: str
    record_key: str  # the StepRecord continued
    task_key: str
    t: int
    kind: str
    sample: int  # 0..N-1
    success: bool
    reward: float
    steps: int  # agent steps taken after the replayed prefix
    termination: str | None
    actions: list[str | None]  # the sampled actions after the prefix (None: a reply without `Action:`)
    from_record: bool  # the record had already ended at step t: its outcome copied, no agent step taken
    error: str | None
    seed: int | None = None  # the seed its requests were derived from (over HTTP; None: the in-process sampler)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read(path: str | Path, cls: type) -> list[Any]:
    """Records of `cls`; every field without a default is required (files written before a field existed still read)."""
    names = [f.name for f in fields(cls)]
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    return [cls(**{n: rec[n] for n in names if n in rec}) for rec in read_jsonl(path, required=required)]


def read_step_records(path: str | Path) -> list[StepRecord]:
    """Step records of a JSONL file; a line without a field raises naming file, line and field."""
    return _read(path, StepRecord)


def read_rollouts(path: str | Path) -> list[Rollout]:
    return _read(path, Rollout)


def mc_values(rollouts: Iterable[Rollout], n: int | None = None) -> dict[str, float]:
    """Monte-Carlo step reward per record key: the mean success of its rollouts. With `n`, a record
    with another number of rollouts is an error (an incomplete or duplicated sampling run)."""
    by_record: dict[str, list[bool]] = defaultdict(list)
    for r in rollouts:
        by_record[r.record_key].append(r.success)
    if n is not None:
        bad = {k: len(v) for k, v in by_record.items() if len(v) != n}
        if bad:
            example = next(iter(bad.items()))
            raise BadRecord(f"{len(bad)} records do not have {n} rollouts (e.g. {example[0]!r}: {example[1]})")
    return {k: sum(v) / len(v) for k, v in by_record.items()}
