"""The prompt as the original builds it: instruction, "OK", one in-context example as a
conversation, then the task and the episode so far.

    [user: instruction, assistant: "OK", <ICL example turns>, user: task, assistant: step 0, ...]

Each task family ships its own instruction and example (`INSTRUCTION`, `ICL_EXAMPLE`). When the
model was trained on data whose first turn is an instruction (the published SFT files), pass that
instruction (`instruction_from_data`) so training and inference prompts match.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eval_agent.cli import UserError
from eval_agent.envs import get_task_family
from eval_agent.store import BadRecord
from eval_agent.trajectory import Trajectory, trajectory_from_conversation


@dataclass
class PromptBuilder:
    instruction: str
    icl_example: Trajectory | None = None  # None = zero-shot (how the original trains)

    @classmethod
    def for_task(cls, task_family: str, icl_num: int = 1, instruction: str | None = None) -> "PromptBuilder":
        family = get_task_family(task_family)
        if icl_num not in (0, 1):
            raise UserError("icl_num must be 0 or 1 (the original uses one example)")
        return cls(instruction=instruction or family.INSTRUCTION, icl_example=family.ICL_EXAMPLE if icl_num else None)

    def messages(self, traj: Trajectory, include_last_observation: bool = True) -> list[dict[str, str]]:
        """Messages to prompt the next step of `traj` (ends with a user turn); without the last
        observation, the conversation a model is trained on (ends with the last answer)."""
        msgs = [{"role": "user", "content": self.instruction}, {"role": "assistant", "content": "OK"}]
        if self.icl_example is not None:
            msgs += self.icl_example.to_messages(include_last_observation=False)
        return msgs + traj.to_messages(include_last_observation=include_last_observation)


def instruction_from_data(path: str | Path) -> str:
    """The instruction (first human turn) of a published-format expert file (JSON list or JSONL)."""
    path = Path(path)
    text = path.read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(text.splitlines()[0])]
    if not rows or "conversations" not in rows[0]:
        raise BadRecord(f"{path}: row 0 has no 'conversations' field")
    instruction, _ = trajectory_from_conversation(rows[0]["conversations"], where=f"{path}: row 0")
    if instruction is None:
        raise BadRecord(f"{path}: row 0 does not start with an instruction + 'OK' exchange")
    return instruction
