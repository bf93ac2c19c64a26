"""Step rewards: per step record (task, step t, kind), how likely the task is to succeed after step t.

- `mc` (the paper): the mean success of the record's Monte-Carlo rollouts and how many there were. A record
  without rollouts has no reward (None: a counted skip wherever it is needed); one with fewer or more than the
  expected N is reported.
- `llm` (Table 3's "step reward by GPT-4o"): the reflecting model (--reflect_backend: GPT-4o, or the policy
  itself) reads the interaction up to step t and its observation and answers `Score: N`, N from 0 to 10; the
  reward is N / 10. Greedy, one reply per record, asked again while it holds no score, every raw reply cached
  on disk like the reflections (data_collection/reflection.py), so a rerun asks nothing.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from data_collection.reflection import CachedAsker, Cleaned
from eval_agent.records import MIN_STEP, Rollout, StepRecord, judged, mc_values

SOURCES = ("mc", "llm")
SCORE_REQUEST = (
    "Above is the interaction so far, up to the agent's latest step and what it observed. How likely is the agent "
    "to complete the task from here, acting well from now on? Answer with one line:\n"
    "Score: <an integer from 0 (it cannot succeed any more) to 10 (it will certainly succeed)>"
)
SCORE_SETTINGS = {"temperature": 0.0, "max_tokens": 32, "seed": 0}  # greedy: one reading per step
_SCORE = re.compile(r"\bscore\**\s*[:=]?\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass
class StepReward:
    key: str
    task_key: str
    t: int
    kind: str
    reward: float | None  # None: no rollout / no score
    source: str  # mc | llm
    samples: int  # mc: the rollouts averaged; llm: 1 when scored, else 0
    error: str | None = None  # llm: why there is no score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_rewards(records: list[StepRecord], rollouts: list[Rollout], n: int | None,
                 min_step: int = MIN_STEP) -> tuple[dict[str, StepReward], dict[str, Any]]:
    """Monte-Carlo rewards by record key, and the counts for the summary. A rollout key seen twice counts once
    (the last copy, as `JsonlStore` reads it); rollouts of unknown records are counted, not used. Records before
    the steps data collection judges (`judged`) need none: MC leaves them out, and they are counted apart."""
    unique = {r.key: r for r in rollouts}
    known = {rec.key for rec in records}
    used = [r for r in unique.values() if r.record_key in known]
    means = mc_values(used)
    samples = Counter(r.record_key for r in used)
    out = {rec.key: StepReward(rec.key, rec.task_key, rec.t, rec.kind, means.get(rec.key), "mc", samples[rec.key])
           for rec in records}
    needed = {rec.key for rec in records if judged(rec.kind, rec.t, min_step)}
    missing = [k for k, s in out.items() if s.samples == 0 and k in needed]
    stats = {"records": len(records), "rollouts": len(rollouts), "duplicate_rollout_keys": len(rollouts) - len(unique),
             "rollouts_of_unknown_records": len(unique) - len(used),
             "with_reward": sum(s.samples > 0 for s in out.values()), "missing_samples": len(missing),
             "missing_examples": missing[:5],
             "not_judged_without_samples": sum(s.samples == 0 and k not in needed for k, s in out.items())}
    if n is not None:
        stats["expected_samples"] = n
        stats["fewer_samples"] = sum(0 < s.samples < n for s in out.values())
        stats["more_samples"] = sum(s.samples > n for s in out.values())
    return out, stats


def score_messages(history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The interaction through step t (ending with its observation, a user turn) with the request appended."""
    if not history or history[-1]["role"] != "user":
        raise ValueError("a scored history must end with the step's observation (a user turn)")
    return [dict(m) for m in history[:-1]] + [
        {"role": "user", "content": history[-1]["content"].rstrip() + "\n\n" + SCORE_REQUEST}]


def clean_score(text: str | None, truncated: bool = False) -> Cleaned:
    """The reward in the reply (`Score: 7` -> "0.7"), or why there is none."""
    m = _SCORE.search(text or "")
    if m is None:
        return Cleaned(None, "cut at the token limit before a score" if truncated else "no 'Score: N' in the reply")
    value = float(m[1])
    if not 0 <= value <= 10:
        return Cleaned(None, f"score {m[1]} is outside 0..10")
    return Cleaned(repr(value / 10), None)


class StepScorer(CachedAsker):
    """LLM step rewards, asked through the reflections' cache machinery."""

    what = "score steps"

    def score(self, histories: list[list[dict[str, str]]]) -> list[tuple[float | None, str | None]]:
        """(reward, why none) per history, in order."""
        prompts = [self.model.prompt_text(score_messages(h)) for h in histories]
        answers = self.ask(prompts, lambda i, text, truncated: clean_score(text, truncated))
        return [(None if a.cleaned.text is None else float(a.cleaned.text), a.cleaned.error) for a in answers]


def llm_step_rewards(records: list[StepRecord], histories: dict[str, list[dict[str, str]]], scorer: StepScorer
                     ) -> tuple[dict[str, StepReward], dict[str, Any]]:
    """LLM rewards by record key (`histories`: the interaction through each record's step t, by record key; a
    record whose episode ended before step t has none and gets no reward), and the counts for the summary."""
    asked = [rec for rec in records if rec.key in histories]
    scores = dict(zip((rec.key for rec in asked), scorer.score([histories[rec.key] for rec in asked])))
    out = {}
    for rec in records:
        reward, error = scores.get(rec.key, (None, "no step: the episode ended before it"))
        out[rec.key] = StepReward(rec.key, rec.task_key, rec.t, rec.kind, reward, "llm", int(reward is not None), error)
    missing = [k for k, s in out.items() if s.reward is None]
    stats = {"records": len(records), "asked": len(asked), "with_reward": len(out) - len(missing),
             "missing": len(missing), "missing_examples": missing[:5],
             "why_missing": dict(Counter(out[k].error for k in missing))}
    return out, stats
