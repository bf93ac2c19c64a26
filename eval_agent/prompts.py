"""The prompt as the original builds it: instruction, "OK", one in-context example as a
conversation, then the task and the episode so far.

    [user: instruction, assistant: "OK", <ICL example turns>, user: task, assistant: step 0, ...]

One instruction and one example per run, decided once by `prompt_files` and read by every stage that renders
a prompt (SFT, step records, MC, evaluation, calibration, step accuracy, training rows; `PromptBuilder.for_run`):
the files the run names (INSTRUCTION_FROM / ICL_FROM), else the published ones beside the family's data
($ALFWORLD_DATA / $VH_DATA: the original's `*_inst.txt` and `*_icl.json`, else the published SFT file's first
row), else the family's own (`INSTRUCTION`, `ICL_EXAMPLE`). So a model is prompted with the instruction it was
trained on. The original trained each row with its own first turn and prompted with `*_inst.txt`; `own=True`
in `training_instruction` (ROW_INSTRUCTION=1) keeps that (docs/fidelity.md).
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
    def for_run(cls, task_family: str, icl_num: int = 1, instruction_file: str | Path | None = None,
                icl_file: str | Path | None = None) -> "PromptBuilder":
        """The run's prompt: the instruction and example `prompt_files` decides (the files named, else the
        published ones, else the family's own); a file that cannot be read is a BadRecord naming it."""
        family = get_task_family(task_family)
        if icl_num not in (0, 1):
            raise UserError("icl_num must be 0 or 1 (the original uses one example)")
        instruction, example = prompt_files(task_family, instruction_file, icl_file)
        return cls(instruction=instruction_from(instruction) if instruction else family.INSTRUCTION,
                   icl_example=(icl_from(example) if example else family.ICL_EXAMPLE) if icl_num else None)

    def messages(self, traj: Trajectory, include_last_observation: bool = True) -> list[dict[str, str]]:
        """Messages to prompt the next step of `traj` (ends with a user turn); without the last
        observation, the conversation a model is trained on (ends with the last answer)."""
        msgs = [{"role": "user", "content": self.instruction}, {"role": "assistant", "content": "OK"}]
        if self.icl_example is not None:
            msgs += self.icl_example.to_messages(include_last_observation=False)
        return msgs + traj.to_messages(include_last_observation=include_last_observation)


def prompt_files(task_family: str, instruction_file: str | Path | None = None,
                 icl_file: str | Path | None = None) -> tuple[Path | None, Path | None]:
    """(instruction file, example file) of the run, None for the family's own: the one decision every stage
    reads. The files named, else those eval_agent.published finds beside the family's data folder as the
    environment gives it ($ALFWORLD_DATA / $VH_DATA, never a stage's --data_root, so all stages agree)."""
    from eval_agent.published import published_files

    found = published_files(task_family)
    return (Path(instruction_file) if instruction_file else found.get("INSTRUCTION_FROM"),
            Path(icl_file) if icl_file else found.get("ICL_FROM"))


def training_instruction(traj: Trajectory, run_instruction: str, own: bool = False) -> str:
    """The instruction a training row of `traj` is rendered with (SFT, the reinforced-training rows): the run's,
    the one every stage prompts with; with `own` (the original's way) the trajectory's own first turn when it
    has one (a published SFT row)."""
    return (traj.meta.get("instruction") or run_instruction) if own else run_instruction


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
