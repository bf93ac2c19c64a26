"""The prompt as the original builds it: instruction, "OK", one in-context example as a
conversation, then the task and the episode so far.

    [user: instruction, assistant: "OK", <ICL example turns>, user: task, assistant: step 0, ...]

Each task family ships its own instruction and example (`INSTRUCTION`, `ICL_EXAMPLE`). When the
model was trained on data whose first turn is an instruction (the published SFT files), prompt with
that instruction (`instruction_from`: the published `*_inst.txt`, or an expert file's first row) and
the published example (`icl_from`: ETO/STeCa's `*_icl.json`, or an expert file's first row, which for
ALFWorld is the same trajectory), so training and inference prompts match.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_agent.cli import UserError
from eval_agent.envs import get_task_family
from eval_agent.store import BadRecord, read_rows
from eval_agent.trajectory import Trajectory, trajectory_from_conversation


@dataclass
class PromptBuilder:
    instruction: str
    icl_example: Trajectory | None = None  # None = zero-shot (how the original trains)

    @classmethod
    def for_task(cls, task_family: str, icl_num: int = 1, instruction: str | None = None,
                 icl_example: Trajectory | None = None) -> "PromptBuilder":
        family = get_task_family(task_family)
        if icl_num not in (0, 1):
            raise UserError("icl_num must be 0 or 1 (the original uses one example)")
        return cls(instruction=instruction or family.INSTRUCTION,
                   icl_example=(icl_example or family.ICL_EXAMPLE) if icl_num else None)

    def messages(self, traj: Trajectory, include_last_observation: bool = True) -> list[dict[str, str]]:
        """Messages to prompt the next step of `traj` (ends with a user turn); without the last
        observation, the conversation a model is trained on (ends with the last answer)."""
        msgs = [{"role": "user", "content": self.instruction}, {"role": "assistant", "content": "OK"}]
        if self.icl_example is not None:
            msgs += self.icl_example.to_messages(include_last_observation=False)
        return msgs + traj.to_messages(include_last_observation=include_last_observation)


def _first_row(path: Path) -> tuple[str, Any]:
    try:
        return next(iter(read_rows(path)))
    except StopIteration:
        raise BadRecord(f"{path}: no rows") from None


def _conversation(turns: Any, where: str) -> tuple[str | None, Trajectory]:
    try:
        return trajectory_from_conversation(turns, where=where)
    except ValueError as e:  # a bad turn: named by file, row, turn and field
        raise BadRecord(str(e)) from None


def instruction_from(path: str | Path) -> str:
    """The instruction to prompt with, from a published `*_inst.txt` (the whole file, as the original
    reads it) or an expert file: a published SFT file's first human turn, or our JSONL's recorded one."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith(("[", "{")):
        if not text.strip():
            raise BadRecord(f"{path}: the instruction file is empty")
        return text
    where, row = _first_row(path)
    if isinstance(row, dict) and "conversations" in row:
        instruction, _ = _conversation(row["conversations"], where)
        if instruction is None:
            raise BadRecord(f"{where}: does not start with an instruction + 'OK' exchange")
        return instruction
    instruction = row.get("meta", {}).get("instruction") if isinstance(row, dict) else None
    if not isinstance(instruction, str):
        raise BadRecord(f"{where}: neither a published row (field 'conversations') nor an expert trajectory "
                         "with meta.instruction")
    return instruction


def icl_from(path: str | Path) -> Trajectory:
    """The in-context example: the first example of ETO/STeCa's `*_icl.json` (a list of examples, each a
    list of turns starting with the task), or the first trajectory of an expert file (published or ours)."""
    from eval_agent.expert_data import load_expert_data

    path = Path(path)
    where, row = _first_row(path)
    if isinstance(row, list):  # the *_icl.json format
        instruction, traj = _conversation(row, f"{where}: example 0")
        if instruction is not None:
            traj = Trajectory(task_text=traj.task_text, steps=traj.steps)
        if not traj.steps:
            raise BadRecord(f"{where}: example 0 has no assistant turn")
        return traj
    traj = load_expert_data(path)[0]
    traj.meta = {"key": traj.meta.get("key")}
    return traj
