"""ALFWorld on the real `alfworld` TextWorld engine (PyPI alfworld 0.4.2), game files in the official
`json_2.1.1` layout under `ALFWORLD_DATA` (else the generated set).

The agent sees the published data's format whatever grammar a game file embeds: the arrival sentence is
dropped, `put X in/on Y` and `move X to Y` are sent in the game's own syntax, and a move is reported as a put.
The task text keeps the intro's paragraphs apart as the SFT data does (`task_text="original"`: one newline, as
the original evaluation). The built-in expert is alfworld's handcoded expert, fed the game state in the syntax
it was written for, so it also solves the official games whose grammar says `put`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

from eval_agent.cli import UserError
from eval_agent.envs.base import StepResult, Task
from eval_agent.store import BadRecord
from eval_agent.trajectory import Step, Trajectory

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ALFWORLD_CACHE = Path("~/.cache/alfworld").expanduser()  # alfworld.info's default for $ALFWORLD_DATA
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
# Our split names, the original code's (`dev`/`test`) and alfworld's folder names.
SPLITS = {
    "train": "train",
    "seen": "valid_seen", "dev": "valid_seen", "valid_seen": "valid_seen",
    "unseen": "valid_unseen", "test": "valid_unseen", "valid_unseen": "valid_unseen",
}
TASK_TEXT = ("data", "original")

_PUT = re.compile(r"^put (?P<obj>.+?) in/on (?P<recep>.+)$")
_MOVE = re.compile(r"^move (?P<obj>.+?) to (?P<recep>.+)$")
_MOVED = re.compile(r"^You move the (?P<obj>.+?) to the (?P<recep>.+?)\.")
_ARRIVAL = re.compile(r"^You arrive at [^.]*\.\s*")
# The engine's answer to a command it does not accept: exactly the commands outside the state's
# admissible commands (tests/test_alfworld_env.py checks the two agree).
NOTHING_HAPPENS = "Nothing happens."


def user_data_root(value: str | None) -> str | None:
    """An $ALFWORLD_DATA value the user chose: importing alfworld sets it to its empty cache folder when the
    user did not (and child processes inherit that)."""
    if value and Path(value) == ALFWORLD_CACHE and not (ALFWORLD_CACHE / "json_2.1.1").is_dir():
        return None
    return value or None


def find_data_root(root: str | Path | None = None) -> Path:
    """`root`, else $ALFWORLD_DATA, else the generated games in data/alfworld (scripts/setup.sh)."""
    path = Path(root or user_data_root(os.environ.get("ALFWORLD_DATA")) or REPO / "data" / "alfworld")
    if not (path / "json_2.1.1").is_dir():
        raise FileNotFoundError(
            f"no json_2.1.1 folder under {path}: run scripts/setup.sh (generated games) or "
            "scripts/download_data.sh and set ALFWORLD_DATA to the folder that contains json_2.1.1"
        )
    return path


def data_identity(split: str, data_root: str | Path | None = None) -> dict[str, Any]:
    """What the games of a split are, for a stage's fingerprint: their folder names (the games themselves are
    thousands of files, never rewritten in place)."""
    if split not in SPLITS:
        raise UserError(f"unknown ALFWorld split {split!r}; choose from {sorted(SPLITS)}")
    root = find_data_root(data_root)
    games = sorted(str(p.relative_to(root)) for p in (root / "json_2.1.1" / SPLITS[split]).glob("*/*/game.tw-pddl"))
    return {"path": str(root.resolve()), "games": hashlib.sha256("\n".join(games).encode()).hexdigest()[:16]}


def load_tasks(split: str, data_root: str | Path | None = None, limit: int | None = None) -> list[Task]:
    """Solvable games of a split in sorted path order, keyed `<split dir>/<task dir>/<trial dir>`.

    Skips what alfworld's own loader skips (movable/sliced tasks, games without traj_data.json or
    not marked solvable) and logs the count. The original ordered tasks by filesystem walk order
    shuffled with seed 1234 (docs/fidelity.md, D9); sorted order is the same on every machine.
    """
    if split not in SPLITS:
        raise UserError(f"unknown ALFWorld split {split!r}; choose from {sorted(SPLITS)}")
    folder = find_data_root(data_root) / "json_2.1.1" / SPLITS[split]
    tasks, skipped = [], 0
    for game in sorted(folder.glob("*/*/game.tw-pddl")):
        trial = game.parent
        traj_file = trial / "traj_data.json"
        if "movable" in str(trial) or "Sliced" in str(trial) or not traj_file.is_file():
            skipped += 1
            continue
        try:
            solvable = json.loads(game.read_text()).get("solvable", False)
            task_type = json.loads(traj_file.read_text())["task_type"]
        except (json.JSONDecodeError, KeyError) as e:
            raise BadRecord(f"{trial}: unreadable game or traj_data.json ({e})") from None
        if not solvable:
            skipped += 1
            continue
        key = f"{SPLITS[split]}/{trial.parent.name}/{trial.name}"
        tasks.append(Task(key=key, env="alfworld", split=split,
                          meta={"game_file": str(game), "task_type": task_type}))
        if limit is not None and len(tasks) >= limit:
            break
    if skipped:
        log.info("%s: skipped %d games (movable/sliced, unsolvable or without traj_data.json)", folder, skipped)
    if not tasks:
        raise FileNotFoundError(f"no solvable games under {folder}")
    return tasks


def to_published(command: str) -> str:
    """A command in the published data's syntax (`put X in/on Y`)."""
    m = _MOVE.match(command)
    return f"put {m['obj']} in/on {m['recep']}" if m else command


def to_move_syntax(command: str) -> str:
    m = _PUT.match(command)
    return f"move {m['obj']} to {m['recep']}" if m else command


def clean_observation(obs: str) -> str:
    """The observation as the data shows it: no arrival sentence, `put` wording."""
    obs = obs.strip()
    rest = _ARRIVAL.sub("", obs, count=1)
    obs = rest or obs
    m = _MOVED.match(obs)
    return f"You put the {m['obj']} in/on the {m['recep']}." + obs[m.end():] if m else obs


class AlfWorldEnv:
    """One game at a time in one TextWorld engine; `reset` loads the task's game file.

    With `expert=True` the handcoded expert follows every step (it needs the state's facts), so
    `expert_action()` is ready at any time; it costs a little per step, hence opt-in.
    """

    name = "alfworld"

    def __init__(self, expert: bool = False, task_text: str = "data"):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos

        if task_text not in TASK_TEXT:
            raise ValueError(f"task_text must be one of {TASK_TEXT}, got {task_text!r}")
        self.task_text = task_text
        self.expert = expert
        infos = textworld.EnvInfos(won=True, admissible_commands=expert, facts=expert, extras=["gamefile"])
        self._infos = infos
        self._wrappers = [AlfredDemangler(), AlfredInfos]
        self._textworld = textworld
        self._env = None
        self._game: str | None = None  # the game file loaded in the engine
        self._move_syntax: dict[str, bool] = {}
        self._state = None
        self._agent = None
        self._expert_next: str | None = None

    def reset(self, task: Task) -> str:
        game = task.meta["game_file"]
        if self._env is None:
            self._env = self._textworld.start(game, request_infos=self._infos, wrappers=self._wrappers)  # loads it
        elif game != self._game:
            self._env.load(game)
        # The game loaded already resets to its initial state without being parsed again (the parse costs about
        # half of a reset; the N rollouts of every step of a task reset its game again and again).
        self._game = game
        if game not in self._move_syntax:
            self._move_syntax[game] = '"move {o} to {r}"' in json.loads(Path(game).read_text())["grammar"]
        self._state = self._env.reset()
        if self.expert:
            from alfworld.agents.expert import HandCodedTWAgent

            self._expert_rng = random.Random(task.key).getstate()
            self._agent = HandCodedTWAgent(max_steps=200)
            self._agent.reset(game)
            self._agent.observe(self._state["feedback"])
            self._expert_next = "look"  # as alfworld's AlfredExpert: the expert starts by looking
        paragraphs = self._state["feedback"].strip().split("\n\n")[1:]  # drop the welcome banner
        return ("\n\n" if self.task_text == "data" else "\n").join(p.strip() for p in paragraphs)

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise RuntimeError("step() before reset()")
        command = to_move_syntax(action) if self._move_syntax[self._game] else to_published(action)
        self._state, _, done = self._env.step(command)
        won = bool(self._state["won"])
        if self.expert:
            self._follow_expert(to_published(command))
        feedback = self._state["feedback"]
        return StepResult(clean_observation(feedback), done=bool(done), success=won, reward=float(won),
                          valid=feedback.strip() != NOTHING_HAPPENS)

    def _follow_expert(self, last_command: str) -> None:
        """Advance the handcoded expert by one step; it reads commands in the wheel's syntax."""
        from alfworld.agents.expert import HandCodedAgentFailed, HandCodedAgentTimeout

        view = dict(self._state)
        view["admissible_commands"] = [to_move_syntax(c) for c in self._state["admissible_commands"]]
        # The expert breaks ties with the global `random`; give it this episode's own stream so its
        # choices do not depend on which other episodes run beside it.
        outer = random.getstate()
        random.setstate(self._expert_rng)
        try:
            nxt = self._agent.act(view, 0, view["won"], last_command)
        except (HandCodedAgentTimeout, HandCodedAgentFailed):
            nxt = None
        finally:
            self._expert_rng = random.getstate()
            random.setstate(outer)
        self._expert_next = None if nxt is None else nxt if nxt in view["admissible_commands"] else "look"

    def expert_action(self) -> str | None:
        if not self.expert:
            raise RuntimeError("this AlfWorldEnv was made without expert=True")
        return to_published(self._expert_next) if self._expert_next else None

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def make_env(expert: bool = False, **options) -> AlfWorldEnv:
    return AlfWorldEnv(expert=expert, **options)


INSTRUCTION = (
    "You are an agent in a household. Solve the task given below by interacting with the room, one action "
    "per turn. At the start you get a description of the room and your task; after each action you get an "
    "observation of what happened.\n"
    "In every turn, first reason about the situation and your plan, then choose one action. Reply in exactly "
    "this format:\nThought: <your reasoning>\nAction: <one action>\n\n"
    "Available actions:\n"
    "1. go to {recep}\n2. take {obj} from {recep}\n3. put {obj} in/on {recep}\n4. open {recep}\n"
    "5. close {recep}\n6. use {obj} (e.g. turn on a desklamp)\n7. clean {obj} with {recep}\n"
    "8. heat {obj} with {recep}\n9. cool {obj} with {recep}\n10. look, inventory, examine {obj or recep}\n"
    "Use the names the observations give, e.g. \"take mug 1 from countertop 1\". If the observation is "
    "\"Nothing happens.\", your action was not valid: try another one."
)

ICL_EXAMPLE = Trajectory(
    task_text=(
        "You are in the middle of a room. Looking quickly around you, you see a bed 1, a desk 1, a drawer 2, "
        "a drawer 1, a garbagecan 1, a shelf 1, and a sidetable 1.\n\nYour task is to: put a pen in drawer."
    ),
    steps=[
        Step.expert("To put a pen in a drawer, I first need a pen. Pens are usually on a desk, a sidetable or "
                    "a shelf. I will check the desk 1 first.", "go to desk 1",
                    "On the desk 1, you see a book 1, a laptop 1, and a pencil 1."),
        Step.expert("There is no pen on the desk 1. Next I will check the sidetable 1.", "go to sidetable 1",
                    "On the sidetable 1, you see a keychain 1, and a pen 2."),
        Step.expert("I found a pen 2 on the sidetable 1. I will take it.", "take pen 2 from sidetable 1",
                    "You pick up the pen 2 from the sidetable 1."),
        Step.expert("Now I need to put the pen 2 in a drawer. I will go to the drawer 1.", "go to drawer 1",
                    "The drawer 1 is closed."),
        Step.expert("The drawer 1 is closed, so I open it first.", "open drawer 1",
                    "You open the drawer 1. The drawer 1 is open. In it, you see a cd 1."),
        Step.expert("The drawer 1 is open. I put the pen 2 in it.", "put pen 2 in/on drawer 1",
                    "You put the pen 2 in/on the drawer 1."),
    ],
    success=True,
    reward=1.0,
    termination="success",
)
