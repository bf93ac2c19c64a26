"""The training rows: calibration (D_c), expert sub-trajectories (D_s: `expert_sub` suffixes and
`expert_full` whole trajectories) and explored successes (D_e), their nDTW weights, and the published export.

Rows are built from structured trajectories into the published `from`/`value` turns: `prompt` (instruction,
"OK", task, expert steps 0..t-1, and for D_c the deviated step with its real observation), `chosen` (the
trained continuation, ending with an answer) and `rejected` (the compared one). A row whose `chosen` has an
empty turn is dropped and counted: it would train the model to say nothing.
"""
from __future__ import annotations

from typing import Any, Iterable

from data_collection.embeddings import ActionEmbeddings
from data_collection.ndtw import action_deviation, weight
from eval_agent.parsing import parse_reply
from eval_agent.prompts import PromptBuilder
from eval_agent.records import StepRecord, task_step_key
from eval_agent.trajectory import Step, Trajectory, messages_to_conversation

SETS = ("calibration", "expert_sub", "expert_full", "explored")
FALLBACK_THOUGHT = ("Thought: My last action did not bring me closer to the goal and may lead in a wrong direction. "
                    "I should {action} instead.\nAction: {action}")

Messages = list[dict[str, str]]


def turns(messages: Messages) -> list[dict[str, str]]:
    return [{"from": t["from"], "value": t["value"].strip()} for t in messages_to_conversation(messages)]


def history(instruction: str, task_text: str, steps: list[Step]) -> Messages:
    """Instruction, "OK", task, then each step with its observation (no in-context example: the
    training rows have none, as the original's)."""
    return PromptBuilder(instruction).messages(Trajectory(task_text=task_text, steps=steps))


def expert_prompt(instruction: str, expert: Trajectory, t: int) -> Messages:
    """The history before expert step t."""
    return history(instruction, expert.task_text, expert.steps[:t])


def continuation(steps: Iterable[Step]) -> Messages:
    """Assistant/observation turns of `steps`, ending with the last answer."""
    return Trajectory(task_text="", steps=list(steps)).to_messages(include_last_observation=False)[1:]


def policy_steps(rec: StepRecord, start: int) -> list[Step]:
    """The explore record's greedy episode from step `start` on (its steps 0..t-1 are the replayed prefix)."""
    return rec.trajectory_obj().steps[start:] if rec.trajectory else []


def step_history(instruction: str, expert: Trajectory, rec: StepRecord) -> Messages:
    """The expert prefix, then the record's step t and the observation the environment really gave it (what an
    LLM step reward reads)."""
    return history(instruction, expert.task_text, expert.steps[: rec.t] + [rec.step_obj])


def calibration_prompt(instruction: str, expert: Trajectory, rec: StepRecord) -> Messages:
    """The D_c prompt and the reflection history: the history through the deviated step t."""
    return step_history(instruction, expert, rec)


def make_row(set_name: str, task_key: str, t: int, prompt: Messages, chosen: Messages, rejected: Messages,
             **meta: Any) -> dict[str, Any]:
    return {"key": f"{set_name}|{task_step_key(task_key, t)}", "set": set_name, "task_key": task_key, "t": t,
            "prompt": turns(prompt), "chosen": turns(chosen), "rejected": turns(rejected),
            "deviation": None, "reward": None, "kept": False, "meta": meta}


def calibration_row(instruction: str, expert: Trajectory, rec: StepRecord, thought_and_action: str, **meta: Any) -> dict[str, Any]:
    """prompt = expert prefix + deviated step and its observation; chosen = the reflective thought
    with the expert action at t, then the expert's remaining steps; rejected = the policy's own
    continuation after the deviated step."""
    chosen = [{"role": "assistant", "content": thought_and_action}] + continuation(expert.steps[rec.t:])[1:]
    return make_row("calibration", rec.task_key, rec.t, calibration_prompt(instruction, expert, rec), chosen,
                    continuation(policy_steps(rec, rec.t + 1)), **meta)


def expert_sub_row(instruction: str, expert: Trajectory, rec: StepRecord) -> dict[str, Any]:
    """IPR's `step_pm` lose pair: the expert suffix from step t over the policy's suffix from its step t."""
    return make_row("expert_sub", rec.task_key, rec.t, expert_prompt(instruction, expert, rec.t),
                    continuation(expert.steps[rec.t:]), continuation(policy_steps(rec, rec.t)))


def expert_full_row(instruction: str, expert: Trajectory, rec: StepRecord) -> dict[str, Any]:
    """ETO's `traj_pm` lose pair: the whole expert trajectory over the policy's failed greedy episode."""
    return make_row("expert_full", rec.task_key, 0, expert_prompt(instruction, expert, 0),
                    continuation(expert.steps), continuation(policy_steps(rec, 0)))


def explored_row(instruction: str, expert: Trajectory, rec: StepRecord) -> dict[str, Any]:
    """D_e: the policy's successful greedy episode, compared with the expert trajectory."""
    return make_row("explored", rec.task_key, 0, expert_prompt(instruction, expert, 0),
                    continuation(policy_steps(rec, 0)), continuation(expert.steps))


def has_empty_chosen_turn(row: dict[str, Any]) -> bool:
    return any(not t["value"] for t in row["chosen"])


def actions(turns_: list[dict[str, str]]) -> list[str | None]:
    """The `Action:` of every gpt turn (None where a reply has none)."""
    return [parse_reply(t["value"]).action for t in turns_ if t["from"] == "gpt"]


def weigh(rows: list[dict[str, Any]], embeddings: ActionEmbeddings, k: float, keep_threshold: float) -> None:
    """Set each row's nDTW deviation (chosen vs rejected actions), reward and `kept`:
    calibration / expert rows get 1 + k*dev and are kept; explored rows get 1 - k*dev and are kept
    when dev < keep_threshold. A row with no action on one side has no deviation and is not kept."""
    embeddings.add(a for row in rows for side in ("chosen", "rejected") for a in actions(row[side]))
    for row in rows:
        dev = action_deviation(embeddings, actions(row["chosen"]), actions(row["rejected"]))
        row["deviation"] = dev
        if dev is None:
            row["kept"] = False
        elif row["set"] == "explored":
            row["reward"], row["kept"] = weight(dev, k, -1), dev < keep_threshold
        else:
            row["reward"], row["kept"] = weight(dev, k, +1), True


def published(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The original's `final_data_rft_train.json` rows: id re-assigned to str(i), values stripped."""
    return [{"id": str(i), "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
             "deviation": r["deviation"], "reward": r["reward"]} for i, r in enumerate(rows)]
