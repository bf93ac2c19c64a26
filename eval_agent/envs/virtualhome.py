"""VirtualHome on the pure-Python evolving-graph simulator (PyPI virtualhome 2.3.0, no Unity), with the scene
graphs and programs PyPI virtualhome-eval 0.1.1 ships (scene 1) or the official download.

A task is one row of the STeCa test-file format (`task`, `description`, `path`, `new_program_lines`,
`revised_graph`, `object_id_dict`), or of the published training file `new_train_conversation.jsonl` (the same
fields, with the expert's `conversations` in place of `new_program_lines`); its initial scene graph is found by
the tail of `path`. The training split is the published one when the data root has it, else ours. The original's
action templates, grounding order, observation content, `Nothing happens.` for a failed action, success check
and task text are kept; every `reset` restores the initial graph, grounding is seeded and observations are
sorted, so an episode is the same in every process (docs/fidelity.md, B10 and B11). Two bugs of virtualhome
2.3.0 itself are repaired at import (`_WalkFind`, `_current_char_node`): the test sets' expert programs need both.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval_agent.cli import UserError
from eval_agent.envs.base import StepResult, Task
from eval_agent.store import BadRecord
from eval_agent.trajectory import Step, Trajectory

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "data" / "virtualhome"
TASK_FILES = {"train": "vh_train.jsonl", "seen": "vh_seen_test.jsonl", "unseen": "vh_unseen_test.jsonl"}
PUBLISHED_TRAIN = "new_train_conversation.jsonl"  # the paper's training tasks (original-code.md 2.7), when supplied
FEEDBACK = ("original", "reason")
TASK_TEXT = ("original", "spaced")
NOTHING_HAPPENS = "Nothing happens."

# The original's action templates (EvolveGraphAction), one per simulator action; `release` fixed.
ACTIONS: dict[str, str] = {
    "CLOSE": "close {}", "DRINK": "drink {}", "FIND": "find {}", "WALK": "walk to {}", "GRAB": "grab {}",
    "LOOKAT": "look at {}", "OPEN": "open {}", "POINTAT": "point at {}", "PUTBACK": "put {} on {}",
    "PUTIN": "put {} in {}", "PUTOBJBACK": "put back {}", "RUN": "run to {}", "SIT": "sit on {}",
    "STANDUP": "stand up", "SWITCHOFF": "switch off {}", "SWITCHON": "switch on {}", "TOUCH": "touch {}",
    "TURNTO": "turn to {}", "WATCH": "watch {}", "WIPE": "wipe {}", "PUTON": "put on {}", "PUTOFF": "take off {}",
    "GREET": "greet {}", "DROP": "drop {}", "READ": "read {}", "LIE": "lie on {}", "POUR": "pour {} into {}",
    "TYPE": "type on {}", "PUSH": "push {}", "PULL": "pull {}", "MOVE": "move {}", "WASH": "wash {}",
    "RINSE": "rinse {}", "SCRUB": "scrub {}", "SQUEEZE": "squeeze {}", "PLUGIN": "plug in {}",
    "PLUGOUT": "plug out {}", "CUT": "cut {}", "EAT": "eat {}", "SLEEP": "sleep", "WAKEUP": "wake up",
    "RELEASE": "release {}",
}
_PATTERNS = {a: re.compile(re.escape(t).replace(re.escape("{}"), "(.+?)")) for a, t in ACTIONS.items()}
_PROGRAM_LINE = re.compile(r"^\[(\w+)\]((?:\s*<[^<>]+>\s*\(\d+\))*)\s*$")
_PROGRAM_ARG = re.compile(r"<([^<>]+)>\s*\((\d+)\)")
_PATH_TAIL = re.compile(r"(TrimmedTestScene\d+_graph/[^/]+/[^/]+)\.txt$")
RELATIONS = ("ON", "INSIDE", "BETWEEN", "CLOSE", "FACING", "HOLDS_RH", "HOLDS_LH", "SITTING")
_SHOWN_RELATIONS = ("ON", "BETWEEN", "SITTING")  # the original hides CLOSE, FACING, INSIDE, HOLDS_*


# ---- the simulator ------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # a top-level find_spec does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed: run scripts/setup.sh "
                          "(pip install --no-deps virtualhome==2.3.0 virtualhome-eval==0.1.1)")
    return Path(spec.submodule_search_locations[0])


def simulator() -> types.SimpleNamespace:
    """The evolving-graph modules. virtualhome's own `__init__` imports the Unity client and crashes, so
    its parent packages are registered as empty namespace modules first. utils seeds the global `random`
    at import; the caller's random state is put back."""
    if "virtualhome.simulation.evolving_graph.execution" not in sys.modules:
        root = _package_dir("virtualhome")
        for name, path in (("virtualhome", root), ("virtualhome.simulation", root / "simulation")):
            if name not in sys.modules:
                module = types.ModuleType(name)
                module.__path__ = [str(path)]
                sys.modules[name] = module
        saved = random.getstate()
        import virtualhome.simulation.evolving_graph.utils  # noqa: F401  (seeds random with 123)
        random.setstate(saved)
        from virtualhome.simulation.evolving_graph import environment, execution

        execution._walk_find_executor = _WalkFind(execution.WalkExecutor(), execution._FindExecutor())
        environment.EnvironmentState.get_char_node = _current_char_node
    from virtualhome.simulation.evolving_graph import environment, execution, scripts, utils

    return types.SimpleNamespace(environment=environment, execution=execution, scripts=scripts, utils=utils)


class _WalkFind:
    """virtualhome 2.3.0's FIND of an object the agent is not close to calls its walk-then-find executor
    with arguments that executor does not take (a TypeError, every time). This one takes them: such a FIND
    walks to the object, as the simulator means it to and the expert programs need."""

    def __init__(self, *executors: Any):
        self.executors = executors

    def execute(self, script, state, info, char_index, modify=True, in_place=False):
        for executor in self.executors:
            yield from executor.execute(script, state, info, char_index, modify, in_place)


def _current_char_node(self, char_index: int):
    """virtualhome 2.3.0's `EnvironmentState.get_char_node` returns the character of the *initial* graph,
    so every executor sees its initial states: a character that starts sitting can never stand up and
    walk, one that sat down can still walk. This returns the character as the state has it."""
    for node in self._graph.get_char_node(char_index):
        yield self.get_node(node.id)


def shipped_data_dir() -> Path:
    """virtualhome-eval's copy of `programs_processed_precond_nograb_morepreconds` (scene 1 only)."""
    return _package_dir("virtualhome_eval") / "dataset" / "programs_processed_precond_nograb_morepreconds"


_NAME_EQUIVALENCE: dict[str, list[str]] | None = None


def name_equivalence() -> dict[str, list[str]]:
    global _NAME_EQUIVALENCE
    if _NAME_EQUIVALENCE is None:
        path = _package_dir("virtualhome_eval") / "resources" / "class_name_equivalence.json"
        _NAME_EQUIVALENCE = json.loads(path.read_text())
    return _NAME_EQUIVALENCE


def load_init_graph(path: str | Path) -> dict[str, Any]:
    """A task's `init_graph` without INSIDE 2-cycles (a inside b and b inside a), which make visibility
    loop forever. Both edges of a cycle go, as the original meant (its loop skipped some while removing)."""
    graph = json.loads(Path(path).read_text())["init_graph"]
    inside = {(e["from_id"], e["to_id"]) for e in graph["edges"] if e["relation_type"] == "INSIDE"}
    edges = [e for e in graph["edges"]
             if not (e["relation_type"] == "INSIDE" and (e["to_id"], e["from_id"]) in inside)]
    return {"nodes": graph["nodes"], "edges": edges}


# ---- actions: words <-> script lines --------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A parsed action: the simulator action name and its object names (class names, underscores)."""

    action: str
    args: tuple[str, ...]


def parse_action(text: str) -> Command | None:
    """Action text → Command, as the original's `str2program_list`: lowercase, drop anything up to a
    `:`, exactly one template must match; else the original's word-split fallback (`walk kitchen` →
    WALK kitchen), which only counts when the first word names an action. None when nothing parses."""
    line = text.lower().strip()
    if ":" in line:
        line = line[line.index(":") + 1:].strip()
    if not line:
        return None
    found = [(a, m.groups()) for a, p in _PATTERNS.items() if (m := p.fullmatch(line))]
    if len(found) == 1:
        action, args = found[0]
        return Command(action, tuple(a.strip().replace(" ", "_") for a in args))
    words = line.split(" ")
    if len(found) > 1 or words[0].upper() not in ACTIONS:
        return None
    args = words[1:] if len(words) <= 3 else ["_".join(words[1:])]
    return Command(words[0].upper(), tuple(args))


def parse_program_line(line: str) -> tuple[str, list[tuple[str, int]]]:
    """`[PUTBACK] <cup> (1001) <table> (240)` → ("PUTBACK", [("cup", 1001), ("table", 240)])."""
    m = _PROGRAM_LINE.match(line.strip())
    if m is None or m[1] not in ACTIONS:
        raise ValueError(f"cannot parse program line {line!r}")
    return m[1], [(name, int(i)) for name, i in _PROGRAM_ARG.findall(m[2])]


def program_line_to_words(line: str) -> str:
    """A program line as the expert data says it: `[WALK] <dining_room> (163)` → `Walk to dining room`."""
    action, args = parse_program_line(line)
    words = ACTIONS[action].format(*(name.replace("_", " ") for name, _ in args))
    return words[0].upper() + words[1:]


def arity(action: str) -> int:
    return ACTIONS[action].count("{}")


# ---- tasks --------------------------------------------------------------------------------------------

_FIELDS: dict[str, type] = {"task": str, "description": str, "path": str, "revised_graph": dict, "object_id_dict": dict}
_GOAL_FIELDS = ("nodes", "revised_nodes", "revised_add_edges")


def path_tail(path: str) -> str:
    """`.../TrimmedTestScene2_graph/<dir>/split61_1.txt` → `TrimmedTestScene2_graph/<dir>/split61_1`."""
    m = _PATH_TAIL.search(path.replace("\\", "/"))
    if m is None:
        raise ValueError(f"path {path!r} does not end in TrimmedTestScene<K>_graph/<results_dir>/<file>.txt")
    return m[1]


def read_task_file(file: str | Path) -> list[dict[str, Any]]:
    """Task rows of a JSONL file in the STeCa test-file format, checked field by field; a bad row is an
    error naming the file, the line and the field. A published training row carries its expert as
    `conversations` and may lack `new_program_lines` (its program is then empty: no built-in expert)."""
    rows = []
    for lineno, text in enumerate(Path(file).read_text().splitlines(), 1):
        if not text.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise BadRecord(f"{where}: a row must be a JSON object")
        for field, kind in _FIELDS.items():
            if not isinstance(row.get(field), kind):
                raise BadRecord(f"{where}: field {field!r} is missing or not a {kind.__name__}")
        try:
            row["key"] = path_tail(row["path"])
        except ValueError as e:
            raise BadRecord(f"{where}: field 'path': {e}") from None
        if "new_program_lines" not in row and isinstance(row.get("conversations"), list):
            row["new_program_lines"] = []
        if not isinstance(row.get("new_program_lines"), list):
            raise BadRecord(f"{where}: field 'new_program_lines' is missing or not a list (a training row may have "
                             "'conversations' instead)")
        for i, line in enumerate(row["new_program_lines"]):
            try:
                parse_program_line(line)
            except (TypeError, AttributeError, ValueError):
                raise BadRecord(f"{where}: field 'new_program_lines' item {i}: cannot parse {line!r}") from None
        for field in _GOAL_FIELDS:
            items = row["revised_graph"].get(field)
            if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
                raise BadRecord(f"{where}: field 'revised_graph.{field}' is missing or not a list of objects")
        for x in row["revised_graph"]["revised_nodes"] + row["revised_graph"]["revised_add_edges"]:
            if not {"from_id", "relation_type", "to_id"} <= x.keys() or x["relation_type"] not in RELATIONS:
                raise BadRecord(f"{where}: field 'revised_graph' has a bad edge {x} (from_id, relation_type in "
                                 f"{RELATIONS}, to_id)")
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in row["object_id_dict"].items()):
            raise BadRecord(f"{where}: field 'object_id_dict' must map names to integer node ids")
        row["source"] = where
        rows.append(row)
    return rows


def find_data_root(root: str | Path | None = None) -> Path:
    """`root`, else $VH_DATA, else the generated task sets in data/virtualhome (scripts/setup.sh)."""
    return Path(root or os.environ.get("VH_DATA") or GENERATED)


def graph_roots(root: Path) -> list[Path]:
    """Where initial graphs are looked up: the data root's `init_and_final_graphs/` (the official
    download), then what virtualhome-eval ships (scene 1)."""
    roots = [root / "init_and_final_graphs"] if (root / "init_and_final_graphs").is_dir() else []
    return roots + [shipped_data_dir() / "init_and_final_graphs"]


def task_file(split: str, root: Path) -> Path:
    if split not in TASK_FILES:
        raise UserError(f"unknown VirtualHome split {split!r}; choose from {sorted(TASK_FILES)}")
    if split == "train":
        return train_task_file(root)
    file = root / TASK_FILES[split]
    if file.is_file():
        return file
    raise FileNotFoundError(f"{file} not found: run scripts/setup.sh (generated tasks in {GENERATED}) or set VH_DATA "
                            "to a folder with vh_seen_test.jsonl / vh_unseen_test.jsonl (scripts/download_data.sh)")


def train_task_file(root: Path) -> Path:
    """The training tasks: the published ones under the data root (`new_train_conversation.jsonl`), else ours
    there (`vh_train.jsonl`), else the generated scene-1 set, which a data root without either is told loudly."""
    for name in (PUBLISHED_TRAIN, TASK_FILES["train"]):
        if (root / name).is_file():
            return root / name
    generated = GENERATED / TASK_FILES["train"]
    if not generated.is_file():
        raise FileNotFoundError(f"no {PUBLISHED_TRAIN} or {TASK_FILES['train']} under {root}, and no generated "
                                f"{generated}: run scripts/setup.sh, or supply the published training data")
    if root.resolve() != GENERATED.resolve():
        _warn_generated_train(str(root))
    return generated


@functools.lru_cache(maxsize=None)
def _warn_generated_train(root: str) -> None:
    """Once per process and data root: training on the generated split is never silent."""
    log.warning("%s has no %s (the published VirtualHome training tasks) or %s: sampling and MC use the %s "
                "generated scene-1 training tasks (docs/fidelity.md)", root, PUBLISHED_TRAIN, TASK_FILES["train"],
                GENERATED / TASK_FILES["train"])


def read_split(split: str, data_root: str | Path | None = None) -> tuple[list[Task], list[str]]:
    """(tasks whose initial graph exists, keys of the tasks without one), in file order."""
    root = find_data_root(data_root)
    file, roots = task_file(split, root), graph_roots(root)
    tasks, missing = [], []
    for row in read_task_file(file):
        graph = next((r / (row["key"] + ".json") for r in roots if (r / (row["key"] + ".json")).is_file()), None)
        if graph is None:
            missing.append(row["key"])
            continue
        meta = {k: row[k] for k in ("task", "description", "object_id_dict", "revised_graph")}
        meta.update(task_type=row["task"], program=row["new_program_lines"], graph_file=str(graph),
                    id=row.get("id"), source=row["source"])
        tasks.append(Task(key=row["key"], env="virtualhome", split=split, meta=meta))
    return tasks, missing


def data_identity(split: str, data_root: str | Path | None = None) -> dict[str, Any]:
    """What the tasks of a split are, for a stage's fingerprint: the task file's content."""
    root = find_data_root(data_root)
    file = task_file(split, root)
    return {"path": str(root.resolve()), "tasks": hashlib.sha256(file.read_bytes()).hexdigest()[:16]}


def load_tasks(split: str, data_root: str | Path | None = None, limit: int | None = None) -> list[Task]:
    """Tasks of a split (`train`, `seen`, `unseen`) keyed by their path tail (ids repeat). Tasks whose
    scene graph is not available are counted and logged, never dropped silently."""
    tasks, missing = read_split(split, data_root)
    if missing:
        log.warning("virtualhome/%s: %d of %d tasks have no initial scene graph (virtualhome-eval ships scene 1 "
                    "only; scripts/download_data.sh fetches the rest): running %d", split, len(missing),
                    len(missing) + len(tasks), len(tasks))
    if not tasks:
        raise FileNotFoundError(f"virtualhome/{split}: no task has an initial scene graph")
    return tasks[:limit] if limit is not None else tasks


# ---- the environment ----------------------------------------------------------------------------------


class Scene:
    """A task's initial graph, built once per graph file: the simulator graph, the character, the rooms,
    and the reverse edge index the simulator lacks (it only looks edges up by their source)."""

    def __init__(self, file: str | Path, sim: types.SimpleNamespace):
        data = load_init_graph(file)
        self.graph = sim.environment.EnvironmentGraph(data)
        self.agent = next(n["id"] for n in data["nodes"] if n["class_name"] == "character")
        self.rooms = frozenset(n["id"] for n in data["nodes"] if n["category"] == "Rooms")
        self.into: dict[tuple[int, str], set[int]] = {}
        for e in data["edges"]:
            self.into.setdefault((e["to_id"], e["relation_type"]), set()).add(e["from_id"])


class View:
    """The simulator state read through its own API, plus reverse lookups (the scene's index and the
    edges the state added). Reading only what an action needs keeps a step at a few milliseconds;
    `to_dict()` alone costs ~10 ms."""

    def __init__(self, state: Any, scene: Scene, relation: Any):
        self.state, self.scene, self._relation = state, scene, relation
        self._added: dict[tuple[int, str], set[int]] = {}
        for (f, r), targets in state._new_edges_from.items():  # where the simulator keeps added edges
            for t in targets:
                self._added.setdefault((t, r.name), set()).add(f)

    def out(self, node: int, relation: str) -> set[int]:
        return set(self.state.get_node_ids_from(node, self._relation[relation]))

    def into(self, node: int, relation: str) -> set[int]:
        sources = self.scene.into.get((node, relation), set()) | self._added.get((node, relation), set())
        return {f for f in sources if self.has_edge(f, relation, node)}

    def has_edge(self, source: int, relation: str, target: int) -> bool:
        return target in self.state.get_node_ids_from(source, self._relation[relation])

    def related(self, node: int, *relations: str) -> set[int]:
        """Nodes linked to `node` by any of `relations`, in either direction."""
        return set().union(*(self.out(node, r) | self.into(node, r) for r in relations))

    def held(self, agent: int) -> set[int]:
        return self.out(agent, "HOLDS_RH") | self.out(agent, "HOLDS_LH")

    def of_class(self, name: str) -> list[int]:
        return sorted(n.id for n in self.state.get_nodes_by_attr("class_name", name))

    def container(self, node: int) -> int | None:
        """The INSIDE target `utils.get_visible_nodes` judges `node` by: the last one the simulator lists
        (it lists one node's targets from a set of ints, so the order is the same in every process)."""
        return next(reversed(list(self.state.get_node_ids_from(node, self._relation.INSIDE))), None)

    def visible(self, agent: int) -> set[int]:
        """`utils.get_visible_nodes` as a set of ids: what is in the agent's room and not inside a closed
        container, all rooms, what the agent holds. The walk keeps a visited set, so an INSIDE cycle the
        simulator creates cannot hang it (the original loops forever on one)."""
        rooms = self.scene.rooms
        seen: set[int] = set()
        todo = list(self.into(self.container(agent), "INSIDE"))
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo.extend(self.into(i, "INSIDE") - seen)

        def hidden(i: int) -> bool:
            box = self.container(i)
            return box not in rooms and "OPEN" not in self.states(box)

        return {i for i in seen if not hidden(i)} | rooms | self.held(agent)

    def states(self, node: int) -> list[str]:
        """State names in the simulator's declaration order (its sets iterate in per-process hash order)."""
        return [s.name for s in sorted(self.state.get_node(node).states, key=lambda s: s.value)]


@dataclass
class Goal:
    """`revised_graph`: `nodes` must match the current nodes (lists compared as sets), `revised_nodes`
    are, despite the name, edges that must be absent, `revised_add_edges` edges that must be present."""

    nodes: list[dict[str, Any]]
    absent: list[tuple[int, str, int]]
    present: list[tuple[int, str, int]]

    @classmethod
    def of(cls, revised_graph: dict[str, Any]) -> "Goal":
        def edges(field: str) -> list[tuple[int, str, int]]:
            return [(e["from_id"], e["relation_type"], e["to_id"]) for e in revised_graph[field]]

        return cls(revised_graph["nodes"], edges("revised_nodes"), edges("revised_add_edges"))

    def met(self, view: View) -> bool:
        for want in self.nodes:
            node = view.state.get_node(want["id"])
            have = node.to_dict() if node is not None else None
            if have is None or any(set(v) != set(have.get(k) or ()) if isinstance(v, list) else v != have.get(k)
                                   for k, v in want.items()):
                return False
        return (not any(view.has_edge(*e) for e in self.absent)) and all(view.has_edge(*e) for e in self.present)


class VirtualHomeEnv:
    """One task at a time on the evolving graph. `reset` starts a fresh simulator state on the task's
    initial graph (built once per graph file and never modified), so every episode starts alike.

    Options: `feedback` "original" (a failed action shows `Nothing happens.`) or "reason" (`Nothing
    happens.` and why); `task_text` "original" (`The task is X(desc).`, how the original evaluated) or
    "spaced" (`The task is X (desc).`, how its in-context example reads); `seed` for random grounding.
    The ground-truth program is always at hand, so `expert` (the registry's common option) changes nothing.
    """

    name = "virtualhome"

    def __init__(self, expert: bool = False, feedback: str = "original", task_text: str = "original",
                 seed: int = 0, cache_size: int = 8):
        if feedback not in FEEDBACK:
            raise ValueError(f"feedback must be one of {FEEDBACK}, got {feedback!r}")
        if task_text not in TASK_TEXT:
            raise ValueError(f"task_text must be one of {TASK_TEXT}, got {task_text!r}")
        self.feedback, self.task_text, self.seed = feedback, task_text, seed
        self._sim = simulator()
        self._scenes: OrderedDict[str, Scene] = OrderedDict()
        self._cache_size = cache_size
        self._state = None

    # -- episode ------------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        meta = task.meta
        self._scene = self._load_scene(meta["graph_file"])
        self._agent = self._scene.agent
        environment = self._sim.environment
        self._state = environment.EnvironmentState(self._scene.graph, name_equivalence(), instance_selection=True)
        self._executor = self._sim.execution.ScriptExecutor(self._scene.graph, name_equivalence())
        self._view: View | None = None
        self._key = task.key
        self._known = {name: int(i) for name, i in meta["object_id_dict"].items()}  # a copy (B10)
        self._last: int | None = None
        self._program: list[str] = meta["program"]
        self._steps = 0
        self.goal = Goal.of(meta["revised_graph"])
        sep = "" if self.task_text == "original" else " "
        return f"The task is {meta['task']}{sep}({meta['description']})."

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise RuntimeError("step() before reset()")
        self._steps += 1
        reason = self._act(action)
        view = self.view()
        if reason is None:
            observation = self._observe(view)
        else:
            observation = NOTHING_HAPPENS if self.feedback == "original" else f"{NOTHING_HAPPENS} {reason}"
        done = self.goal.met(view)
        return StepResult(observation, done=done, success=done, reward=float(done), valid=reason is None)

    def expert_action(self) -> str | None:
        """The next line of the task's ground-truth program, in words (None once it is used up)."""
        if self._state is None:
            raise RuntimeError("expert_action() before reset()")
        return program_line_to_words(self._program[self._steps]) if self._steps < len(self._program) else None

    def close(self) -> None:
        self._scenes.clear()
        self._state = None

    # -- state --------------------------------------------------------------------------------------
    def _load_scene(self, file: str) -> Scene:
        if file not in self._scenes:
            self._scenes[file] = Scene(file, self._sim)
            while len(self._scenes) > self._cache_size:
                self._scenes.popitem(last=False)
        self._scenes.move_to_end(file)
        return self._scenes[file]

    def view(self) -> View:
        """The current simulator state (a new View after every change)."""
        if self._view is None:
            self._view = View(self._state, self._scene, self._sim.environment.Relation)
        return self._view

    def state_dict(self) -> dict[str, Any]:
        """The current scene graph (nodes, edges) as the simulator writes it."""
        return self._state.to_dict()

    # -- one action ---------------------------------------------------------------------------------
    def _act(self, text: str) -> str | None:
        """Parse, ground and execute one action; None on success, else why it failed."""
        cmd = parse_action(text)
        if cmd is None:
            return f"'{text}' is not one of the available actions."
        if len(cmd.args) != arity(cmd.action):
            return f"{cmd.action} needs {arity(cmd.action)} parameters. But there are {len(cmd.args)} parameters."
        ids = self._ground(cmd)
        if isinstance(ids, str):
            return ids
        scripts = self._sim.scripts
        line = scripts.ScriptLine(scripts.Action[cmd.action],
                                  [scripts.ScriptObject(n, i) for n, i in zip(cmd.args, ids)], 0)
        self._executor.info = self._sim.execution.ExecutionInfo()  # its messages pile up otherwise
        try:
            ok, state = self._executor.execute_one_step(scripts.Script([line]), self._state)
        except Exception as e:  # the simulator raises on some odd requests: a failed action, not a crash
            log.debug("simulator error on %s: %s", line, e)
            return f"The simulator cannot execute {cmd.action.lower()} here ({e})."
        if not ok:
            messages = [m.split(' when executing "')[0] for m in self._executor.info.messages]
            return "; ".join(messages) + "." if messages else "The action is not possible now."
        self._state, self._view = state, None
        return None

    def _ground(self, cmd: Command) -> list[int] | str:
        """Object names → node ids as the original's `change_obj_index`, or why that fails."""
        if not cmd.args:
            return []
        view = self.view()
        near = view.related(self._agent, "CLOSE")
        near_last = view.related(self._last, "CLOSE", "INSIDE") if self._last is not None else set()
        if len(cmd.args) == 1:
            name = cmd.args[0]
            if cmd.action in ("FIND", "WALK") and not view.of_class(name):
                return f"{name} isn't available in the environment."
            ids = [self._resolve(name, view, near, near_last)]
        else:
            obj, target = cmd.args
            in_hand = [i for i in view.of_class(obj) if i in view.held(self._agent)]
            if not in_hand:
                return f"{obj} not in hand. Robot agent should hold {obj} firstly."
            self._known[obj] = self._choice(obj, in_hand)
            if not view.of_class(target):
                return f"{target} isn't available in the environment."
            ids = [self._known[obj], self._resolve(target, view, near, near_last)]
            if ids[0] == ids[1]:
                return f"{obj} can't be put or pour into itself."
        if isinstance(ids[-1], str):
            return ids[-1]
        self._last = ids[-1]
        return ids

    def _resolve(self, name: str, view: View, near: set[int], near_last: set[int]) -> int | str:
        """Ground-truth id, else an object of that class close to the last object, else one close to
        the agent, else a seeded random one; the choice is remembered for the episode."""
        if name not in self._known:
            of_class = view.of_class(name)
            if not of_class:
                return f"{name} isn't available in the environment."
            close = [i for i in of_class if i in near_last] or [i for i in of_class if i in near]
            self._known[name] = close[0] if close else self._choice(name, of_class)
        return self._known[name]

    def _choice(self, name: str, ids: list[int]) -> int:
        """A random pick that depends only on the seed, the task and the name: the same in every process."""
        return ids[0] if len(ids) == 1 else random.Random(f"{self.seed}/{self._key}/{name}").choice(sorted(ids))

    # -- what the agent sees --------------------------------------------------------------------------
    def _observe(self, view: View) -> str:
        """The original's observation text, sorted: the objects close to the agent (every node of their
        classes, with states), the relations among them, then what the agent holds."""
        close = view.out(self._agent, "CLOSE")
        name = {i: view.state.get_node(i).class_name for i in close}
        classes = {name[i] for i in close & view.visible(self._agent)}
        shown = {i for i in close if name[i] in classes}
        relations = sorted({f"{name[f]} {r} {name[t]}" for f in shown for r in _SHOWN_RELATIONS
                            for t in view.out(f, r) & shown})
        objects = set()
        for i in (i for c in classes for i in view.of_class(c)):
            states = view.states(i)
            objects.add(f"{view.state.get_node(i).class_name} is {' and '.join(states)}" if states
                        else view.state.get_node(i).class_name)
        text = ", ".join(sorted(objects) + relations) + ". " if objects or relations else ""
        if held := view.held(self._agent):
            text += f"You have {', '.join(sorted(view.state.get_node(i).class_name for i in held))}. "
        return text


def make_env(expert: bool = False, **options) -> VirtualHomeEnv:
    return VirtualHomeEnv(expert=expert, **options)


INSTRUCTION = (
    "You are a household robot. Complete the task given below by acting in the house, one action per turn. "
    "After each action you get an observation: the objects close to you with their states (e.g. \"fridge is "
    "CLOSED and CLEAN\"), how they rest on each other, and what you hold (\"You have cup.\"). An empty "
    "observation means there is nothing close to you; \"Nothing happens.\" means your action failed, so try "
    "another one.\n"
    "In every turn, first reason about the situation and your plan, then choose one action. Reply in exactly "
    "this format:\nThought: <your reasoning>\nAction: <one action>\n\n"
    "Available actions, where {obj} is an object or a room named as in the observations (\"water glass\" and "
    "\"water_glass\" both work):\n"
    "walk to {obj}, run to {obj}, find {obj}, turn to {obj}, look at {obj}, point at {obj}, grab {obj}, "
    "open {obj}, close {obj}, put {obj} on {obj}, put {obj} in {obj}, put back {obj}, pour {obj} into {obj}, "
    "drop {obj}, release {obj}, switch on {obj}, switch off {obj}, plug in {obj}, plug out {obj}, "
    "put on {clothes}, take off {clothes}, sit on {obj}, lie on {obj}, stand up, sleep, wake up, "
    "watch {obj}, read {obj}, type on {obj}, touch {obj}, push {obj}, pull {obj}, move {obj}, wipe {obj}, "
    "wash {obj}, rinse {obj}, scrub {obj}, squeeze {obj}, cut {obj}, eat {obj}, drink {obj}, greet {person}.\n"
    "You can only use objects close to you: walk to them or find them first. To put or pour something, hold "
    "it first."
)

# A training task of the generated set (scene 1, file203_1), replayed in this environment; the
# observations are what it prints (tests/test_virtualhome_env.py checks them), the thoughts are ours.
ICL_EXAMPLE = Trajectory(
    task_text="The task is Put groceries in Fridge(Putting groceries in refridgerator).",
    steps=[
        Step.expert("Groceries usually wait in the kitchen area, and the fridge is there too. I go to the dining "
                    "room first.", "Walk to dining room", ""),
        Step.expert("Nothing is close to me yet. The groceries are food, so I walk to the food.",
                    "Walk to food food", "food_food is CLEAN, food_food is DIRTY. "),
        Step.expert("I am next to the food. I make sure I have found it before I take it.", "Find food food",
                    "food_food is CLEAN, food_food is DIRTY. "),
        Step.expert("The food is right here. I grab it.", "Grab food food",
                    "character, food_food is CLEAN, food_food is DIRTY. You have food_food. "),
        Step.expert("I hold the food. Now I need the fridge, which is called freezer here.", "Find freezer",
                    "floor is CLEAN, floor is DIRTY, food_food is CLEAN, food_food is DIRTY, freezer is CLOSED and "
                    "CLEAN and PLUGGED_IN, freezer ON floor. You have food_food. "),
        Step.expert("The freezer is closed. I open it before putting anything in.", "Open freezer",
                    "floor is CLEAN, floor is DIRTY, food_food is CLEAN, food_food is DIRTY, freezer is OPEN and "
                    "CLEAN and PLUGGED_IN, freezer ON floor. You have food_food. "),
        Step.expert("The freezer is open and I still hold the food. I put the food in the freezer.",
                    "Put food food in freezer",
                    "floor is CLEAN, floor is DIRTY, food_food is CLEAN, food_food is DIRTY, freezer is OPEN and "
                    "CLEAN and PLUGGED_IN, freezer ON floor. "),
    ],
    success=True,
    reward=1.0,
    termination="success",
    meta={"key": "TrimmedTestScene1_graph/results_intentions_march-13-18/file203_1",
          "object_id_dict": {"dining_room": 201, "food_food": 1000, "freezer": 289}},
)
