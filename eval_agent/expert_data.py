"""Expert trajectories for training: reading our JSONL (`Trajectory.to_dict()` + `key` a line) and the published
`alfworld_sft.json` format (a JSON list or JSONL of `{"id", "game_file", "conversations"}`, whose instruction
is kept in `meta["instruction"]` so training prompts with the data's own words), writing the published format
back, and the templated thoughts of expert runs (ALFWorld, VirtualHome). A bad row is an error naming the file, row and field.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from eval_agent.cli import UserError
from eval_agent.envs import get_task_family, task_family_of
from eval_agent.store import BadRecord, read_rows
from eval_agent.trajectory import Step, Trajectory, trajectory_from_conversation


def load_expert_data(path: str | Path) -> list[Trajectory]:
    """Every trajectory of an expert file, in file order, with `meta["key"]` set; a file without one is an error."""
    trajs = [_trajectory(row, where) for where, row in read_rows(path)]
    if not trajs:
        raise BadRecord(f"no rows in {path}")
    return trajs


def check_task_family(trajs: list[Trajectory], task_family: str, path: str | Path) -> None:
    """The expert data must be of `task_family`: VirtualHome rows trained under the ALFWorld instruction (or
    replayed in the wrong environment) would be a silent wrong result. Rows whose task text reads like no
    family's (data of another source) pass."""
    for traj in trajs:
        found = task_family_of(traj.task_text)
        if found is not None and found != task_family:
            raise UserError(f"{path}: trajectory {traj.meta.get('key')!r} is a {found} task "
                            f"({traj.task_text[:40]!r}...), but the task family is {task_family}: set "
                            f"TASK_FAMILY={found} (--task_family {found}), or pass {task_family} expert data")


def _trajectory(row: Any, where: str) -> Trajectory:
    if not isinstance(row, dict):
        raise BadRecord(f"{where}: expected a JSON object")
    if "conversations" in row:  # the published format
        key = _published_key(row, where)
        if not isinstance(row["conversations"], list):
            raise BadRecord(f"{where}: 'conversations' must be a list of turns")
        try:
            instruction, traj = trajectory_from_conversation(row["conversations"], where=where)
        except ValueError as e:
            raise BadRecord(str(e)) from None
        if not traj.steps:
            raise BadRecord(f"{where}: no assistant turn after the task")
        traj.success, traj.reward, traj.termination = True, 1.0, "success"  # published expert data
        traj.meta = {"key": key, **({"game_file": row["game_file"]} if "game_file" in row else {}),
                     **({"instruction": instruction} if instruction else {})}
        return traj
    for name in ("key", "task_text", "steps"):
        if name not in row and not (name == "task_text" and "task" in row):
            raise BadRecord(f"{where}: missing field {name!r} (neither a trajectory nor a published row)")
    if not isinstance(row["key"], str):
        raise BadRecord(f"{where}: field 'key' must be text, got {row['key']!r:.60}")
    record = {k: v for k, v in row.items() if k != "key"}
    try:
        traj = Trajectory.from_dict(record)
    except ValueError as e:
        raise BadRecord(f"{where}: {e}") from None
    except TypeError as e:
        raise BadRecord(f"{where}: not a trajectory ({e})") from None
    for i, step in enumerate(traj.steps):
        if not step.text.strip():
            raise BadRecord(f"{where}: step {i} has an empty reply")
    if not traj.task_text.strip() or not traj.steps:
        raise BadRecord(f"{where}: empty task or no steps")
    traj.meta = {**traj.meta, "key": row["key"]}
    return traj


def _published_key(row: dict[str, Any], where: str) -> str:
    """A published row's key: for VirtualHome the tail of its scene path (`path`, in some files `game_file`), the
    key of its task (ids repeat); else its `id`."""
    if "path" in row or "TrimmedTestScene" in str(row.get("game_file", "")):
        from eval_agent.envs.virtualhome import path_tail

        field = "path" if "path" in row else "game_file"
        try:
            return path_tail(str(row[field]))
        except ValueError as e:
            raise BadRecord(f"{where}: field {field!r}: {e}") from None
    if "id" not in row:
        raise BadRecord(f"{where}: missing field 'id' (or a VirtualHome 'path')")
    return str(row["id"])


def task_tail(key: str) -> str:
    """`<task dir>/<trial dir>` of an ALFWorld key or published `game_file` (the original matched on
    absolute-path slices, B4); other keys are used whole."""
    parts = key.strip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 3 and parts[-3] in ("train", "valid_seen", "valid_unseen") else key


def task_of(traj: Trajectory, by_tail: dict[str, Any]) -> Any:
    """The task (from `{task_tail(task.key): task}`) an expert trajectory plays, or None."""
    key = traj.meta["key"]
    return by_tail.get(task_tail(traj.meta.get("game_file", key))) or by_tail.get(task_tail(key))


def check_tasks_matched(trajs: list[Trajectory], task_family: str, split: str, data_root: str | Path | None,
                        source: str | Path) -> None:
    """Every expert trajectory asked for plays a task of the split (`task_of`): an import that matches fewer would be
    accepted and fail only when sampling replays it."""
    family = get_task_family(task_family)
    by_tail = {task_tail(t.key): t for t in family.load_tasks(split, data_root=data_root)}
    unmatched = [t for t in trajs if task_of(t, by_tail) is None]
    if unmatched:
        first = unmatched[0].meta
        raise UserError(f"{source}: {len(trajs) - len(unmatched)} of the {len(trajs)} expert trajectories asked for "
                        f"match a task of {task_family}/{split} (e.g. {first['key']!r} plays "
                        f"{task_tail(first.get('game_file', first['key']))!r}, which is none of the "
                        f"{len(by_tail)} tasks under {family.find_data_root(data_root)}): pass the data root of the "
                        "tasks they were made on, or an expert file of these tasks")


def to_published(trajs: list[Trajectory], instruction: str, id_prefix: str) -> list[dict[str, Any]]:
    """Rows of the published SFT format (instruction + "OK", task, steps; ends with the last answer)."""
    rows = []
    for i, t in enumerate(trajs):
        row: dict[str, Any] = {"id": f"{id_prefix}_{i}"}
        if "game_file" in t.meta:  # as published: data/json_2.1.1/<split>/<task dir>/<trial dir>
            game = Path(t.meta["game_file"])  # .../game.tw-pddl (ours) or the trial folder (published)
            row["game_file"] = "data/json_2.1.1/" + "/".join((game.parent if game.suffix else game).parts[-3:])
        row["conversations"] = t.to_conversation(t.meta.get("instruction", instruction))
        rows.append(row)
    return rows


# ---- ALFWorld: templated thoughts for the handcoded expert's actions ---------------------------------

_ACTION = re.compile(r"^(?P<verb>go to|take|put|open|close|clean|heat|cool|use|examine|look|inventory)\b ?(?P<rest>.*)$")
_TAKE = re.compile(r"^(?P<obj>.+?) from (?P<recep>.+)$")
_WITH = re.compile(r"^(?P<obj>.+?) (?:with|in/on) (?P<recep>.+)$")
_NOOP = ("look", "inventory")  # they change nothing in the game: dropped from the expert data

_SEARCH = ("I need to find {a}. I will check {r}.", "{A} may be in/on {r}. I will go there and look.",
           "I have not found {a} yet. Next I will check {r}.", "No {w} here. I will try {r} next.")
_FETCH = {"clean": "Now I need to clean the {o}, so I will go to {r}.",
          "heat": "Now I need to heat the {o}, so I will go to {r}.",
          "cool": "Now I need to cool the {o}, so I will go to {r}.",
          "put": "Now I will bring the {o} to {r} to put it there.",
          "use": "Now I need a light to look at the {o}. I will go to {r}."}


def _article(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def _kind(action: str) -> tuple[str, str, str]:
    """(verb, object, receptacle) of an ALFWorld command; the unused parts are ''."""
    m = _ACTION.match(action)
    if not m:
        return action, "", ""
    verb, rest = m["verb"], m["rest"]
    if verb == "take" and (t := _TAKE.match(rest)):
        return verb, t["obj"], t["recep"]
    if verb in ("put", "clean", "heat", "cool") and (t := _WITH.match(rest)):
        return verb, t["obj"], t["recep"]
    if verb in ("go to", "open", "close", "use"):
        return verb, "", rest
    return verb, rest, ""


def _class(name: str) -> str:
    return re.sub(r" \d+$", "", name)


def alfworld_thoughts(actions: list[str], seed: str) -> list[str]:
    """One short thought per action, templated by action kind with a look ahead (no LLM): a `go to`
    either searches for what the next take / use / put needs ("I need to find a mug. I will check
    cabinet 1.") or fetches it there ("Now I need to heat the mug 1, so I will go to microwave 1.");
    open / take / put / clean / heat / cool / use say what they do. Wording varies, seeded per task."""
    rng = random.Random(seed)
    kinds = [_kind(a) for a in actions]
    thoughts, held, taken, last_want = [], "", set(), ""
    for i, (verb, obj, recep) in enumerate(kinds):
        later = [k for k in kinds[i + 1:] if k[0] != "open"]
        goal = next((k for k in later if k[0] in ("take", "put", "clean", "heat", "cool", "use")), None)
        if verb == "go to" and goal and goal[0] != "take" and later[0] is goal:
            text = _FETCH[goal[0]].format(o=held or "object", r=recep)
        elif verb == "go to":
            want = _class(goal[1] if goal[0] == "take" else goal[2]) if goal else _class(recep)
            phrase = f"another {want}" if want in taken else _article(want)
            text = rng.choice(_SEARCH if want == last_want else _SEARCH[:2]).format(
                a=phrase, A=phrase[0].upper() + phrase[1:], w=want, r=recep)
            last_want = want
        elif verb == "open" and held and goal and goal[0] != "use":
            text = f"The {recep} is closed. I will open it to {goal[0]} the {held} " + ("in it." if goal[0] == "put" else "there.")
        elif verb == "open":
            text = f"The {recep} is closed. I will open it to see what is inside."
        elif verb == "close":
            text = f"I will close the {recep} again."
        elif verb == "take":
            text, held = f"I found the {obj} in/on the {recep}. I will take it.", obj
            taken.add(_class(obj))
        elif verb == "put":
            text, held = f"Now I put the {obj} in/on the {recep}.", ""
        elif verb in ("clean", "heat", "cool"):
            text = f"I will {verb} the {obj} with the {recep}."
        elif verb == "use":
            text = f"I will turn on the {recep} and look at the {held or 'object'} under its light."
        else:
            text = f"I will {verb} {obj}".rstrip() + "."
        thoughts.append(text)
    return thoughts


def alfworld_expert_trajectory(traj: Trajectory, key: str) -> Trajectory:
    """An expert run with the runner's placeholder thoughts rewritten as templated ones and the no-op
    commands (`look`, `inventory`) left out; observations stay the game's own."""
    steps = [s for s in traj.steps if s.action not in _NOOP]
    thoughts = alfworld_thoughts([s.action for s in steps], seed=key)
    return Trajectory(
        task_text=traj.task_text,
        steps=[Step.expert(t, s.action, s.observation) for t, s in zip(thoughts, steps)],
        success=traj.success, reward=traj.reward, termination=traj.termination,
        meta={**traj.meta, "key": key},
    )


# ---- VirtualHome: templated thoughts for the expert program's lines --------------------------------------


def virtualhome_thought(task: str, action: str, i: int, n: int) -> str:
    """The thought of step i of an n-step program for task name `task` (scripts/make_vh_tasks.py's training data)."""
    act = action[0].lower() + action[1:]
    if i == 0:
        return f"My task is to {task[0].lower() + task[1:]}. First, I {act}."
    if i == n - 1:
        return f"Finally, I {act}, which should complete the task."
    return f"Next, I {act}."


def virtualhome_expert_trajectory(traj: Trajectory, key: str) -> Trajectory:
    """An expert run (the task's program played through the runner) with the training data's thoughts."""
    task, n = traj.meta["task"], len(traj.steps)
    return Trajectory(
        task_text=traj.task_text,
        steps=[Step.expert(virtualhome_thought(task, s.action, i, n), s.action, s.observation)
               for i, s in enumerate(traj.steps)],
        success=traj.success, reward=traj.reward, termination=traj.termination,
        meta={**traj.meta, "key": key},
    )


# The built-in expert's run of a task, as each family's training data shows expert trajectories.
AS_TRAINING_DATA = {"alfworld": alfworld_expert_trajectory, "virtualhome": virtualhome_expert_trajectory}
