"""Generate a small ALFWorld game set for the real alfworld engine, so the whole project runs offline.

Writes <out>/json_2.1.1/{train,valid_seen,valid_unseen}/<task_dir>/<trial_dir>/{game.tw-pddl,traj_data.json}
in the official layout: own PDDL problems over alfworld's domain and grammar, all six task types (per type:
train 4, or --train_per_type; valid_seen and valid_unseen 2), valid_seen in the train rooms, valid_unseen in
rooms train never uses. Output is a pure function of --seed. Placements are drawn so that alfworld's handcoded
expert (0.4.2) solves every game within MAX_EXPERT_STEPS: `expert_steps` mirrors its search, so no engine runs
(`--verify` plays every game). In pick_two_obj_and_place one target already lies in the parent receptacle:
that expert tracks a put only for commands saying "put", the grammar says "move", so it cannot finish the
two-object search.

    .venv/bin/python scripts/make_alfworld_games.py --out data/alfworld [--seed 0] [--verify]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import alfworld.gen.constants as C
import alfworld.gen.goal_library as glib
from alfworld.agents.utils.misc import add_task_to_grammar
from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from eval_agent.envs.alfworld import TASK_TYPES  # noqa: E402

GAMES_PER_TYPE = {"train": 4, "valid_seen": 2, "valid_unseen": 2}
MAX_EXPERT_STEPS = 30  # the promise: the handcoded expert wins every game within this many steps
STEP_BUDGET = 26       # what generation aims for (estimate), leaving slack under MAX_EXPERT_STEPS
TRIAL_PREFIX = "trial_T20260101_000000_"

# ----------------------------------------------------------------------------------------------------------
# Data tables: rooms and task specs.
# ----------------------------------------------------------------------------------------------------------

# Objects that plausibly lie around in each kind of room (targets and distractors are drawn from these).
KIND_OBJECTS: dict[str, tuple[str, ...]] = {
    "Kitchen": ("Apple", "Bread", "ButterKnife", "Bowl", "Cup", "DishSponge", "Egg", "Fork", "Kettle", "Knife",
                "Ladle", "Lettuce", "Mug", "Pan", "PepperShaker", "Plate", "Pot", "Potato", "SaltShaker",
                "SoapBottle", "Spatula", "Spoon", "Tomato", "WineBottle"),
    "LivingRoom": ("Book", "Box", "Candle", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Newspaper",
                   "Pillow", "RemoteControl", "Statue", "TissueBox", "Vase", "Watch", "WateringCan"),
    "Bedroom": ("AlarmClock", "BaseballBat", "BasketBall", "Book", "Bowl", "CD", "CellPhone", "CreditCard",
                "KeyChain", "Laptop", "Mug", "Pen", "Pencil", "Pillow", "TennisRacket", "TissueBox", "Watch"),
    "Bathroom": ("Candle", "Cloth", "DishSponge", "HandTowel", "Plunger", "SoapBar", "SoapBottle",
                 "SprayBottle", "TissueBox", "ToiletPaper", "Towel"),
}


@dataclass(frozen=True)
class Room:
    """One room layout: its receptacles (type, count) and, for lamp rooms, where the desk lamp stands."""
    scene: int
    kind: str
    split: str                      # "train" (also used by valid_seen) or "unseen"
    receptacles: tuple[tuple[str, int], ...]
    lamp_on: str | None = None


ROOMS: tuple[Room, ...] = (
    # train layouts (valid_seen reuses them)
    Room(901, "Kitchen", "train", (("Cabinet", 3), ("CounterTop", 2), ("DiningTable", 1), ("Drawer", 2),
                                   ("Fridge", 1), ("GarbageCan", 1), ("Microwave", 1), ("SinkBasin", 1))),
    Room(902, "Kitchen", "train", (("Cabinet", 2), ("CoffeeMachine", 1), ("CounterTop", 1), ("Drawer", 1),
                                   ("Fridge", 1), ("Microwave", 1), ("SinkBasin", 1), ("StoveBurner", 2))),
    Room(903, "LivingRoom", "train", (("ArmChair", 1), ("CoffeeTable", 1), ("Drawer", 2), ("GarbageCan", 1),
                                      ("Shelf", 2), ("SideTable", 1), ("Sofa", 1)), lamp_on="SideTable"),
    Room(904, "Bedroom", "train", (("Bed", 1), ("Desk", 1), ("Drawer", 3), ("GarbageCan", 1), ("Shelf", 2),
                                   ("SideTable", 1)), lamp_on="Desk"),
    Room(905, "Bathroom", "train", (("Cabinet", 2), ("CounterTop", 1), ("Drawer", 1), ("GarbageCan", 1),
                                    ("HandTowelHolder", 1), ("SinkBasin", 1), ("Toilet", 1),
                                    ("TowelHolder", 1))),
    Room(906, "Bedroom", "train", (("Bed", 1), ("Drawer", 2), ("Dresser", 1), ("Safe", 1),
                                   ("SideTable", 2)), lamp_on="SideTable"),
    # unseen layouts (valid_unseen only)
    Room(951, "Kitchen", "unseen", (("Cabinet", 4), ("CounterTop", 1), ("Drawer", 1), ("Fridge", 1),
                                    ("GarbageCan", 1), ("Microwave", 1), ("Shelf", 1), ("SinkBasin", 1))),
    Room(952, "LivingRoom", "unseen", (("Cabinet", 1), ("CoffeeTable", 1), ("Dresser", 1), ("GarbageCan", 1),
                                       ("Safe", 1), ("Sofa", 1)), lamp_on="Dresser"),
    Room(953, "Bedroom", "unseen", (("ArmChair", 1), ("Bed", 1), ("Desk", 1), ("Drawer", 2), ("Shelf", 1),
                                    ("SideTable", 1)), lamp_on="Desk"),
    Room(954, "Bathroom", "unseen", (("BathtubBasin", 1), ("Cabinet", 2), ("CounterTop", 1),
                                     ("GarbageCan", 1), ("SinkBasin", 1), ("Toilet", 1),
                                     ("ToiletPaperHanger", 1))),
)


@dataclass(frozen=True)
class TaskSpec:
    """Candidate targets of one task type; a (object, parent) pair is used where the parent can hold it."""
    appliance: str | None             # receptacle the state change needs (Microwave / Fridge / SinkBasin)
    objects: tuple[str, ...]
    parents: tuple[str, ...]          # parent receptacle types; the toggle object for look_at_obj_in_light


TASK_SPECS: dict[str, TaskSpec] = {
    "pick_and_place_simple": TaskSpec(None, (
        "AlarmClock", "Book", "Bowl", "Candle", "CD", "CellPhone", "CreditCard", "Kettle", "KeyChain", "Mug",
        "Pencil", "PepperShaker", "Pillow", "Plate", "RemoteControl", "SaltShaker", "SoapBottle", "Spatula",
        "SprayBottle", "ToiletPaper", "Vase", "Watch"), (
        "ArmChair", "Bed", "Cabinet", "CoffeeMachine", "CoffeeTable", "CounterTop", "Desk", "DiningTable",
        "Drawer", "Dresser", "Safe", "Shelf", "Sofa", "StoveBurner", "Toilet", "ToiletPaperHanger")),
    "look_at_obj_in_light": TaskSpec(None, (
        "AlarmClock", "Book", "Bowl", "CD", "CellPhone", "CreditCard", "KeyChain", "Laptop", "Mug",
        "Newspaper", "Pen", "Pencil", "RemoteControl", "Statue", "Vase", "Watch"), ("DeskLamp",)),
    "pick_clean_then_place_in_recep": TaskSpec("SinkBasin", (
        "Apple", "Bowl", "ButterKnife", "Cloth", "Cup", "DishSponge", "Fork", "Knife", "Ladle", "Lettuce",
        "Mug", "Pan", "Plate", "Pot", "SoapBar", "Spatula", "Spoon", "Tomato"), (
        "BathtubBasin", "Cabinet", "CounterTop", "DiningTable", "Drawer", "Fridge", "Shelf", "StoveBurner",
        "Toilet")),
    "pick_heat_then_place_in_recep": TaskSpec("Microwave", (
        "Apple", "Bread", "Cup", "Egg", "Mug", "Plate", "Potato", "Tomato"), (
        "Cabinet", "CoffeeMachine", "CounterTop", "DiningTable", "Fridge", "GarbageCan", "Shelf")),
    "pick_cool_then_place_in_recep": TaskSpec("Fridge", (
        "Apple", "Bowl", "Bread", "Cup", "Egg", "Lettuce", "Mug", "Pan", "Plate", "Pot", "Potato", "Tomato",
        "WineBottle"), (
        "Cabinet", "CoffeeMachine", "CounterTop", "DiningTable", "GarbageCan", "Microwave", "Shelf",
        "StoveBurner")),
    "pick_two_obj_and_place": TaskSpec(None, (
        "Book", "Candle", "CD", "CellPhone", "CreditCard", "DishSponge", "KeyChain", "Pencil", "Pillow",
        "RemoteControl", "SaltShaker", "SoapBar", "SoapBottle", "Spatula", "SprayBottle", "TissueBox",
        "ToiletPaper", "Watch"), (
        "ArmChair", "Bed", "Cabinet", "CoffeeTable", "CounterTop", "Desk", "DiningTable", "Drawer", "Dresser",
        "GarbageCan", "Safe", "Shelf", "SideTable", "Sofa", "Toilet")),
}

# ----------------------------------------------------------------------------------------------------------
# Game model
# ----------------------------------------------------------------------------------------------------------

OPENABLE = set(C.OPENABLE_CLASS_LIST)
CAN_CONTAIN = {r: set(objs) for r, objs in C.VAL_RECEPTACLE_OBJECTS.items()}
ACTION_PROPS = {"heatable": "Heatable", "coolable": "Coolable", "cleanable": "Cleanable",
                "toggleable": "Toggleable", "sliceable": "Sliceable"}
NOT_PICKUPABLE = set(C.VAL_ACTION_OBJECTS["Toggleable"])  # the lamps
EXPERT_PRIORS = {o.lower(): {r.lower() for r, objs in C.VAL_RECEPTACLE_OBJECTS.items() if o in objs}
                 for o in C.OBJECTS}


@dataclass(frozen=True)
class Thing:
    """A receptacle or an object: PDDL id, type, and its location (objects: the receptacle they are in)."""
    pddl_id: str
    type: str
    coords: tuple[float, float, float]
    loc: str = ""       # receptacles: their location id
    parent: str = ""    # objects: the pddl id of the receptacle holding them


@dataclass
class Layout:
    """A room instantiated: receptacles (in the order the engine's intro lists them), the agent's start."""
    room: Room
    receptacles: list[Thing]
    agent_loc: str


@dataclass
class Game:
    """One generated game: its room, task parameters and the objects placed in the room."""
    split: str
    index: int
    task_type: str
    layout: Layout
    obj: str
    parent: str       # parent receptacle type ("" for look_at_obj_in_light)
    toggle: str       # toggle object type ("" unless look_at_obj_in_light)
    objects: list[Thing]

    @property
    def trial(self) -> str:
        return f"{TRIAL_PREFIX}{self.index:06d}"

    @property
    def task_dir(self) -> str:
        return f"{self.task_type}-{self.obj}-None-{self.parent or self.toggle}-{self.layout.room.scene}"


def mangle(name: str, *parts: float | int | str) -> str:
    """An ALFRED-style PDDL id: 'Apple|-00.59|+00.83|-00.40' written with _bar_/_minus_/_plus_/_dot_."""
    def fmt(p: float | int | str) -> str:
        return f"{p:+06.2f}" if isinstance(p, float) else str(p)
    text = "|".join([name, *map(fmt, parts)])
    for a, b in (("|", "_bar_"), ("-", "_minus_"), ("+", "_plus_"), (".", "_dot_")):
        text = text.replace(a, b)
    return text


def thing_id(kind: str, coords: tuple[float, float, float]) -> str:
    """Sink and bathtub basins carry their basin suffix, as in ALFRED ('Sink|x|y|z|SinkBasin')."""
    if kind in ("SinkBasin", "BathtubBasin"):
        return mangle(kind.replace("Basin", ""), *coords, kind)
    return mangle(kind, *coords)


def make_layout(room: Room, seed: int) -> Layout:
    """Receptacle ids and locations of a room; fixed for the room (valid_seen shares train's layouts)."""
    rng = random.Random(f"layout:{seed}:{room.scene}")
    taken: set[tuple[int, int]] = set()

    def free_cell() -> tuple[int, int]:
        while True:
            cell = (rng.randint(-12, 12), rng.randint(-12, 12))
            if cell not in taken:
                taken.add(cell)
                return cell

    receptacles = []
    for rtype, count in room.receptacles:
        for _ in range(count):
            x, z = free_cell()
            coords = (x / 4 + rng.randint(0, 24) / 100, rng.randint(0, 220) / 100,
                      z / 4 + rng.randint(0, 24) / 100)
            loc = mangle("loc", x, z, rng.choice((0, 1, 2, 3)), rng.choice((0, 30, 45, 60)))
            receptacles.append(Thing(thing_id(rtype, coords), rtype, coords, loc=loc))
    x, z = free_cell()
    receptacles.sort(key=lambda r: r.pddl_id.lower())  # the engine lists them in this order
    return Layout(room, receptacles, agent_loc=mangle("loc", x, z, rng.choice((0, 1, 2, 3)), 30))


def expert_choice(layout: Layout, rtype: str) -> Thing:
    """The receptacle of a type the expert walks to: the last one of the intro."""
    return [r for r in layout.receptacles if r.type == rtype][-1]


# ----------------------------------------------------------------------------------------------------------
# The expert's search, mirrored (alfworld.agents.expert.handcoded_expert, 0.4.2)
# ----------------------------------------------------------------------------------------------------------

def expert_steps(game: Game) -> int | None:
    """Steps the handcoded expert takes to win `game`, or None where it would not manage.

    What the expert does (and this mirrors): it knows the receptacles from the intro, listed in the
    order of their PDDL ids. To find an object class it walks the receptacles its priors allow, then the
    others, both lists from the end (a class that is itself a receptacle type, like mug or pan, has no
    priors); it skips the receptacle it stands at, opens what is closed and closes it before moving on,
    and walks straight to a class it has seen. The 'close' of the receptacle it took the object from is
    still on its backlog and costs one step later. Heat, cool and clean are 'go to' + the action; the
    parent is the last receptacle of its type in the intro (go to, open if closed, move).
    """
    receps = game.layout.receptacles
    contents: dict[str, list[str]] = defaultdict(list)
    for o in game.objects:
        contents[o.parent].append(o.type)
    seen: dict[str, str] = {}  # class -> receptacle id where the expert last saw it
    visited: list[str] = []
    steps = 1  # the wrapper's initial 'look'
    at = ""

    def search(cls: str) -> bool:
        nonlocal steps, at
        if cls in seen:  # it walks there, but does not reopen a receptacle it has closed again
            host = next(r for r in receps if r.pddl_id == seen[cls])
            steps += host.pddl_id != at
            at = host.pddl_id
            return host.type not in OPENABLE
        # receptacle classes (mug, bowl, pan, ...) are searched among receptacles *of that type*: none
        prior = [] if cls in C.RECEPTACLES else [r for r in receps if r.type.lower() in EXPERT_PRIORS[cls.lower()]]
        order = prior[::-1] + [r for r in receps if r not in prior][::-1]
        start = at
        for r in order:
            if r.pddl_id == start:
                continue  # just checked
            steps += 1
            at = r.pddl_id
            visited.append(at)
            for t in contents[at]:
                seen[t] = at
            if cls in contents[at]:
                # open it; its 'close' stays on the expert's backlog and costs a step at the next search
                steps += 2 * (r.type in OPENABLE)
                return True
            steps += 2 * (r.type in OPENABLE)  # open, close
        return False

    if game.task_type == "pick_two_obj_and_place":
        # one target already lies in the parent: the expert must not come across it before the other
        if not search(game.obj) or expert_choice(game.layout, game.parent).pddl_id in visited:
            return None
    elif not search(game.obj):
        return None
    steps += 1  # take
    seen.pop(game.obj, None)
    spec = TASK_SPECS[game.task_type]
    if spec.appliance:
        steps += 2  # go to the appliance, heat/cool/clean
        at = [r for r in receps if r.type == spec.appliance][0].pddl_id
    if game.task_type == "look_at_obj_in_light":
        if not search(game.toggle):
            return None
        return steps + 1  # use the lamp
    return steps + 1 + (game.parent in OPENABLE) + 1  # go to the parent, open it, move the object


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------

def hosts(layout: Layout, otype: str, exclude: set[str]) -> list[Thing]:
    """Receptacles of the room that can hold `otype`, except the excluded types."""
    return [r for r in layout.receptacles if otype in CAN_CONTAIN.get(r.type, ()) and r.type not in exclude]


def candidate_pairs(task_type: str, layout: Layout) -> list[tuple[str, str]]:
    """(object, parent-or-toggle) pairs of the task spec that fit this room."""
    spec, room = TASK_SPECS[task_type], layout.room
    rtypes = {r.type for r in layout.receptacles}
    if spec.appliance and spec.appliance not in rtypes:
        return []
    pairs = []
    for obj in spec.objects:
        if obj not in KIND_OBJECTS[room.kind]:
            continue
        for parent in spec.parents:
            if task_type == "look_at_obj_in_light":
                ok = room.lamp_on is not None
            else:
                ok = parent in rtypes and parent != spec.appliance and obj in CAN_CONTAIN.get(parent, ())
            if ok and hosts(layout, obj, {parent, spec.appliance or ""}):
                pairs.append((obj, parent))
    return pairs


def place(rng: random.Random, layout: Layout, otype: str, host: Thing, used: set[str]) -> Thing:
    """An object of `otype` in `host`, at a fresh position near it."""
    while True:
        x, y, z = (round(c + rng.randint(-20, 20) / 100, 2) for c in host.coords)
        pddl_id = mangle(otype, x, y, z)
        if pddl_id not in used:
            used.add(pddl_id)
            return Thing(pddl_id, otype, (x, y, z), parent=host.pddl_id)


def sample_game(rng: random.Random, split: str, index: int, task_type: str, layout: Layout) -> Game:
    """Draw the task target and the room's objects until the expert's estimate fits STEP_BUDGET."""
    spec = TASK_SPECS[task_type]
    pairs = candidate_pairs(task_type, layout)
    if not pairs:
        raise ValueError(f"room {layout.room.scene} cannot host {task_type}")
    for _ in range(500):
        obj, target = rng.choice(pairs)
        parent, toggle = ("", target) if task_type == "look_at_obj_in_light" else (target, "")
        used: set[str] = set()
        objects: list[Thing] = []
        exclude = {parent, spec.appliance or ""}
        # targets: 1-2 anywhere but in the parent (and the appliance); pick_two has one more already in
        # the parent the expert will pick (see the module docstring)
        for _ in range(rng.randint(1, 2)):
            objects.append(place(rng, layout, obj, rng.choice(hosts(layout, obj, exclude)), used))
        if task_type == "pick_two_obj_and_place":
            objects.append(place(rng, layout, obj, expert_choice(layout, parent), used))
        if toggle:
            lamp_host = next(r for r in layout.receptacles if r.type == layout.room.lamp_on)
            objects.append(place(rng, layout, toggle, lamp_host, used))
        # distractors: other kinds of the room, none whose name starts with the target's (the expert
        # matches 'take pen' inside 'take pencil 1 ...')
        pool = [o for o in KIND_OBJECTS[layout.room.kind]
                if not o.lower().startswith(obj.lower()) and hosts(layout, o, set())]
        for otype in rng.sample(pool, k=min(len(pool), rng.randint(5, 9))):
            for _ in range(rng.choice((1, 1, 2))):
                objects.append(place(rng, layout, otype, rng.choice(hosts(layout, otype, set())), used))
        game = Game(split, index, task_type, layout, obj, parent, toggle, objects)
        steps = expert_steps(game)
        if steps is not None and steps <= STEP_BUDGET:
            return game
    raise RuntimeError(f"no placement within {STEP_BUDGET} expert steps for {task_type} in {layout.room.scene}")


def plan_games(seed: int, games_per_type: dict[str, int] = GAMES_PER_TYPE) -> list[Game]:
    """All games of all splits: rooms taken in turn among those that can host the task type."""
    layouts = {room.scene: make_layout(room, seed) for room in ROOMS}
    games = []
    index = 0
    for split, per_type in games_per_type.items():
        pool = "unseen" if split == "valid_unseen" else "train"
        for t, task_type in enumerate(TASK_TYPES):
            rooms = [layouts[r.scene] for r in ROOMS if r.split == pool
                     and r.kind in C.GOALS_VALID[task_type] and candidate_pairs(task_type, layouts[r.scene])]
            for i in range(per_type):
                index += 1
                rng = random.Random(f"game:{seed}:{split}:{task_type}:{i}")
                layout = rooms[(i + t + (split == "valid_seen")) % len(rooms)]
                games.append(sample_game(rng, split, index, task_type, layout))
    return games


# ----------------------------------------------------------------------------------------------------------
# Writing: PDDL problem, grammar, traj_data
# ----------------------------------------------------------------------------------------------------------

def goal_pddl(game: Game) -> str:
    """The goal exactly as alfworld writes it: its goal library's template ('#' stands for '-'); the
    template also closes the problem's (define ...)."""
    template = glib.gdict[game.task_type]["pddl"]
    return template.format(obj=game.obj, recep=game.parent, toggle=game.toggle).replace("#", "-")


def problem_pddl(game: Game) -> str:
    """The PDDL problem, laid out like the official json_2.1.1 problems."""
    receps, objects = game.layout.receptacles, game.objects
    otypes = sorted({o.type for o in objects} | {game.obj} | ({game.toggle} - {""}))
    rtypes = sorted({r.type for r in receps})
    locs = [r.loc for r in receps] + [game.layout.agent_loc]
    loc_of = {r.pddl_id: r.loc for r in receps}
    objs = sorted(objects, key=lambda o: o.pddl_id)
    init = [f"(receptacleType {r.pddl_id} {r.type}Type)" for r in receps]
    init += [f"(objectType {o.pddl_id} {o.type}Type)" for o in objs]
    init += [f"(canContain {rt}Type {ot}Type)" for rt in rtypes for ot in otypes if ot in CAN_CONTAIN.get(rt, ())]
    init += [f"(pickupable {o.pddl_id})" for o in objs if o.type not in NOT_PICKUPABLE]
    init += [f"(isReceptacleObject {o.pddl_id})" for o in objs if o.type in C.MOVABLE_RECEPTACLES_SET]
    for prop, key in ACTION_PROPS.items():
        init += [f"({prop} {o.pddl_id})" for o in objs if o.type in C.VAL_ACTION_OBJECTS[key]]
    init += [f"(openable {r.pddl_id})" for r in receps if r.type in OPENABLE]
    init.append(f"(atLocation agent1 {game.layout.agent_loc})")
    init += [f"(inReceptacle {o.pddl_id} {o.parent})" for o in objs]
    init += [f"(receptacleAtLocation {r.pddl_id} {r.loc})" for r in receps]
    init += [f"(objectAtLocation {o.pddl_id} {loc_of[o.parent]})" for o in objs]
    decl = (["agent1 - agent"] + [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
            + [f"{o.pddl_id} - object" for o in objs] + [f"{r.pddl_id} - receptacle" for r in receps]
            + [f"{loc} - location" for loc in locs])
    ind = "\n        "
    return (f"\n(define (problem plan_{game.trial})\n(:domain alfred)\n(:objects{ind}" + ind.join(decl)
            + f"\n    )\n(:init{ind}" + ind.join(init) + "\n    )\n" + goal_pddl(game))


@contextmanager
def seeded_global_random(seed: str) -> Iterator[None]:
    """alfworld's add_task_to_grammar draws its template with the global `random`: seed it, then restore."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def traj_data(game: Game) -> dict:
    """The traj_data.json fields alfworld reads (task type, pddl_params, scene, annotations)."""
    return {
        "task_id": game.trial,
        "task_type": game.task_type,
        "pddl_params": {"mrecep_target": "", "object_sliced": False, "object_target": game.obj,
                        "parent_target": game.parent, "toggle_target": game.toggle},
        "scene": {"dirty_and_empty": False, "floor_plan": f"FloorPlan{game.layout.room.scene}",
                  "scene_num": game.layout.room.scene, "random_seed": game.index},
        "turk_annotations": {"anns": []},
    }


def write_game(game: Game, out: Path, seed: int, domain: str, grammar: str) -> Path:
    """Write game.tw-pddl and traj_data.json of one game; returns the game file."""
    traj = traj_data(game)
    with seeded_global_random(f"desc:{seed}:{game.index}"):
        game_grammar = add_task_to_grammar(grammar, traj)
    desc = re.search(r"Your task is to: (.*?)\.\"", game_grammar).group(1)
    traj["turk_annotations"]["anns"] = [{"task_desc": f"{desc[0].upper()}{desc[1:]}."}]
    folder = out / "json_2.1.1" / game.split / game.task_dir / game.trial
    folder.mkdir(parents=True, exist_ok=True)
    data = {"pddl_domain": domain, "grammar": game_grammar, "pddl_problem": problem_pddl(game), "solvable": True}
    (folder / "game.tw-pddl").write_text(json.dumps(data, indent=1) + "\n")
    (folder / "traj_data.json").write_text(json.dumps(traj, indent=2) + "\n")
    return folder / "game.tw-pddl"


def generate(out: str | Path, seed: int = 0, games_per_type: dict[str, int] = GAMES_PER_TYPE) -> list[Path]:
    """Generate the whole set under `out`; returns the game files in generation order.

    An existing <out>/json_2.1.1 is an error (it could be the official data). The set is written in a
    staging folder and renamed into place, so an interrupted run leaves no half set behind."""
    out = Path(out)
    final = out / "json_2.1.1"
    if final.exists():
        raise FileExistsError(f"{final} exists: move it away to generate a new set there")
    staging = out / f".staging-{os.getpid()}"
    domain = Path(ALFRED_PDDL_PATH).read_text()
    grammar = Path(ALFRED_TWL2_PATH).read_text()
    files = [write_game(game, staging, seed, domain, grammar) for game in plan_games(seed, games_per_type)]
    (staging / "json_2.1.1").rename(final)
    staging.rmdir()
    return [final / f.relative_to(staging / "json_2.1.1") for f in files]


# ----------------------------------------------------------------------------------------------------------
# Verification with the real engine and expert
# ----------------------------------------------------------------------------------------------------------

def play_expert(game_file: str | Path, max_steps: int = MAX_EXPERT_STEPS, seed: int = 0) -> tuple[bool, int]:
    """Play one game with alfworld's handcoded expert; returns (won, steps)."""
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos

    random.seed(seed)  # the expert falls back on random.choice when stuck
    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile", "expert_plan"])
    env = textworld.start(str(game_file), request_infos=infos,
                          wrappers=[AlfredDemangler(), AlfredInfos, AlfredExpert("handcoded")])
    try:
        env.load(str(game_file))
        state, done, steps = env.reset(), False, 0
        while not done and steps < max_steps:
            state, _, done = env.step(state["extra.expert_plan"][0])
            steps += 1
        return bool(state["won"]), steps
    finally:
        env.close()


def verify(files: list[Path]) -> bool:
    """Play every game with the expert; print one line per game and a summary per split."""
    results: dict[str, list[tuple[bool, int]]] = defaultdict(list)
    for f in files:
        won, steps = play_expert(f)
        split = f.parts[-4]
        results[split].append((won, steps))
        print(f"{'won ' if won else 'LOST'} {steps:3d}  {'/'.join(f.parts[-4:-1])}", flush=True)
    ok = True
    for split, res in results.items():
        wins = sum(w for w, _ in res)
        steps = [s for w, s in res if w]
        mean = sum(steps) / max(len(steps), 1)
        print(f"{split}: {wins}/{len(res)} won, expert steps mean {mean:.1f} max {max(steps, default=0)}")
        ok &= wins == len(res)
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/alfworld", help="folder that receives json_2.1.1/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true", help="play every game with the handcoded expert")
    p.add_argument("--train_per_type", type=int, default=GAMES_PER_TYPE["train"],
                   help="train games per task type (more data for a longer CPU SFT run); the other splits keep "
                        "their sizes, though their trial names and task wordings shift with the game numbering")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        files = generate(args.out, args.seed, {**GAMES_PER_TYPE, "train": args.train_per_type})
    except FileExistsError as e:
        print(e, file=sys.stderr)
        return 1
    counts = Counter(f.parts[-4] for f in files)
    where = Path(args.out) / "json_2.1.1"
    print(f"wrote {len(files)} games to {where} ({dict(counts)}) in {time.time() - t0:.2f}s")
    if args.verify:
        return 0 if verify(files) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
