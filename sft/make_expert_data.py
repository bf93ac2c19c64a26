"""Stage 1 data: expert trajectories for SFT, as JSONL of `Trajectory.to_dict()` + `key`.

ALFWorld: alfworld's handcoded expert plays every game of the split through the episode runner (real
observations, templated thoughts, only won games kept). VirtualHome: the expert trajectories
scripts/make_vh_tasks.py wrote, checked and copied. Writes the run directory's expert data (or --out);
resumable. `--export` also writes the published alfworld_sft.json format. docs/sft.md has the details.

    python -m sft.make_expert_data --task_family alfworld --split train --run_dir outputs/alfworld
"""
from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path

from eval_agent.envs import add_task_family_arg, get_task_family
from eval_agent.expert_data import alfworld_expert_trajectory, load_expert_data, to_published
from eval_agent.layout import RunDir
from eval_agent.run_card import write_run_card
from eval_agent.runner import MAX_STEPS, Episode, ExpertPolicy, run_episodes
from eval_agent.store import JsonlStore, write_json

log = logging.getLogger("sft.make_expert_data")


def alfworld(args: argparse.Namespace, store: JsonlStore) -> dict[str, int]:
    family = get_task_family("alfworld")
    tasks = family.load_tasks(args.split, data_root=args.data_root, limit=args.limit)
    todo = [t for t in tasks if t.key not in store]
    failed = 0

    def keep(ep: Episode) -> None:
        nonlocal failed
        if not ep.traj.success:
            failed += 1
            log.warning("%s: the expert did not win (%s); not kept", ep.task.key, ep.traj.termination)
            return
        store.append({"key": ep.task.key, **alfworld_expert_trajectory(ep.traj, ep.task.key).to_dict()})

    log.info("alfworld/%s: %d games, %d already done, %d to run", args.split, len(tasks), len(tasks) - len(todo), len(todo))
    run_episodes(todo, ExpertPolicy(), partial(family.make_env, expert=True), keep,
                 max_steps=args.max_steps, concurrency=args.concurrency)
    return {"tasks": len(tasks), "run": len(todo), "failed": failed}


def virtualhome(args: argparse.Namespace, store: JsonlStore) -> dict[str, int]:
    family = get_task_family("virtualhome")
    source = family.find_data_root(args.data_root) / f"vh_{args.split}_trajectories.jsonl"
    if not source.is_file():
        raise SystemExit(f"error: {source} not found (scripts/make_vh_tasks.py writes the training trajectories)")
    trajs = load_expert_data(source)[: args.limit]
    failed = 0
    for traj in trajs:
        if not traj.success:
            failed += 1
        elif traj.meta["key"] not in store:
            store.append({"key": traj.meta["key"], **traj.to_dict()})
    return {"tasks": len(trajs), "run": len(trajs), "failed": failed}


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the stage's (docs/ lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_family_arg(p)
    p.add_argument("--split", default="train")
    p.add_argument("--data_root", help="task data folder (default: the task family's own lookup)")
    p.add_argument("--run_dir", help="the run directory: writes its expert data of --split")
    p.add_argument("--out", help="JSONL of expert trajectories (appended to; resumable; default: from --run_dir)")
    p.add_argument("--limit", type=int, help="first N tasks of the split only")
    p.add_argument("--max_steps", type=int, default=MAX_STEPS)
    p.add_argument("--concurrency", type=int, default=2, help="games played together (one engine each)")
    p.add_argument("--export", help="also write the trajectories in the published alfworld_sft.json format here")
    p.add_argument("--overwrite", action="store_true", help="start a fresh --out (the old file is kept as .old)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if not (args.out or args.run_dir):
        raise SystemExit("error: pass --run_dir (writes RUN_DIR's expert data) or --out")
    out = Path(args.out) if args.out else RunDir(args.run_dir).expert_data(args.split)
    write_run_card(out.parent, "sft.make_expert_data", vars(args))
    store = JsonlStore(out, overwrite=args.overwrite)
    t0 = time.perf_counter()
    stats = (alfworld if args.task_family == "alfworld" else virtualhome)(args, store)
    if args.export:
        trajs = load_expert_data(out)
        write_json(args.export, to_published(trajs, get_task_family(args.task_family).INSTRUCTION, args.task_family))
    summary = {**stats, "kept": len(store), "seconds": round(time.perf_counter() - t0, 1)}
    log.info("%s/%s: %d tasks, %d run now, %d not won by the expert, %d trajectories in %s (%.1fs)",
             args.task_family, args.split, stats["tasks"], stats["run"], stats["failed"], len(store), out, summary["seconds"])
    return summary


if __name__ == "__main__":
    main()
