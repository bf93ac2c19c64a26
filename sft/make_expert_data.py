"""Stage 1 data: expert trajectories for SFT, as JSONL of `Trajectory.to_dict()` + `key`.

ALFWorld: alfworld's handcoded expert plays every game of the split through the episode runner (real
observations, templated thoughts, only won games kept). VirtualHome: the published training conversations
when the data root has the published training tasks (new_train_conversation.jsonl, with new_train_sft.json /
virtualhome_sft.json when present), else the trajectories scripts/make_vh_tasks.py wrote, checked and copied.
`--source FILE` imports an expert file instead (the published `alfworld_sft.json` for PRESET=paper), its
instruction kept; `--check_replay` replays each in the real environment (sft/check_expert_data.py) and
`--replay_keep` drops those that do not replay or succeed. Writes the run directory's expert data (or --out);
resumable. `--export` also writes the published alfworld_sft.json format. docs/sft.md has the details.

    python -m sft.make_expert_data --task_family alfworld --split train --run_dir outputs/alfworld
"""
from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path

from eval_agent.cli import count, run_main
from eval_agent.envs import add_task_family_arg, get_task_family
from eval_agent.expert_data import alfworld_expert_trajectory, check_tasks_matched, load_expert_data, to_published
from eval_agent.guard import RunGuard, fingerprint, identity, require_output, settings_of
from eval_agent.layout import RunDir
from eval_agent.published import training_data
from eval_agent.run_card import write_run_card
from eval_agent.runner import MAX_STEPS, Episode, ExpertPolicy, run_episodes
from eval_agent.store import BadRecord, JsonlStore, write_json
from eval_agent.trajectory import Trajectory
from sft.check_expert_data import KEEP, check, kept, summarize

log = logging.getLogger("sft.make_expert_data")
CODE_VERSION = 1  # raise it when a change makes the stage give other results for the same settings


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


def vh_trajectories(args: argparse.Namespace) -> Path:
    """The VirtualHome expert trajectories of the split: for train, those of the training data the stages use
    (eval_agent.published.training_data: the published conversations when the data root has the published
    training tasks, else the generated set's); for another split, the data root's."""
    if args.split == "train":
        return training_data("virtualhome", args.data_root).expert
    family = get_task_family("virtualhome")
    path = family.find_data_root(args.data_root) / f"vh_{args.split}_trajectories.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: no {path} (scripts/make_vh_tasks.py writes the training trajectories; or pass --source)")
    return path


def read_source(args: argparse.Namespace, source: Path) -> list[Trajectory]:
    """The trajectories of an expert file asked for (the first --limit), each playing a task of the split."""
    try:
        trajs = load_expert_data(source)[: args.limit]
    except (BadRecord, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    check_tasks_matched(trajs, args.task_family, args.split, args.data_root, source)
    return trajs


def imported(args: argparse.Namespace, store: JsonlStore, trajs: list[Trajectory], out: Path) -> dict[str, int]:
    """Trajectories of an expert file (published or ours), optionally checked by replay, into the store."""
    todo = [t for t in trajs if t.meta["key"] not in store]
    failed, dropped = sum(not t.success for t in todo), 0
    todo = [t for t in todo if t.success]
    if args.check_replay and todo:
        results = check(todo, args.task_family, args.split, args.data_root)
        report = JsonlStore(out.parent / "replay.jsonl")
        for result in results:
            report.append(result)
        log.info("replay check of %d trajectories: %s", len(todo), summarize(results))
        keep = [kept(r, args.replay_keep) for r in results]
        dropped = keep.count(False)
        todo = [t for t, k in zip(todo, keep) if k]
    for traj in todo:
        store.append({"key": traj.meta["key"], **traj.to_dict()})
    return {"tasks": len(trajs), "run": len(todo) + dropped, "failed": failed, "dropped_by_replay": dropped}


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the stage's (docs/ lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_family_arg(p)
    p.add_argument("--split", default="train")
    p.add_argument("--data_root", help="task data folder (default: the task family's own lookup)")
    p.add_argument("--run_dir", help="the run directory: writes its expert data of --split")
    p.add_argument("--out", help="JSONL of expert trajectories (appended to; resumable; default: from --run_dir)")
    p.add_argument("--limit", type=count, help="first N tasks of the split only (default: all)")
    p.add_argument("--max_steps", type=count, default=MAX_STEPS)
    p.add_argument("--concurrency", type=count, default=2, help="games played together (one engine each)")
    p.add_argument("--export", help="also write the trajectories in the published alfworld_sft.json format here")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh --out, whatever settings made the old one (moved aside as .old)")
    p.add_argument("--source", help="import this expert file (published alfworld_sft.json or ours) instead of "
                                    "playing the expert / copying the generated VirtualHome trajectories")
    p.add_argument("--check_replay", action="store_true",
                   help="replay every imported trajectory in the real environment (writes replay.jsonl beside the data)")
    p.add_argument("--replay_keep", choices=KEEP, default="all",
                   help="with --check_replay: keep all, only those that replay exactly, or only those that succeed")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if not (args.out or args.run_dir):
        raise SystemExit("error: pass --run_dir (writes RUN_DIR's expert data) or --out")
    out = Path(args.out) if args.out else RunDir(args.run_dir).expert_data(args.split)
    source = Path(args.source) if args.source else vh_trajectories(args) if args.task_family == "virtualhome" else None
    inputs = {"source": identity(source)} if source else {}
    if source is None or args.check_replay:  # the games the expert plays, or the replay checks in
        inputs["tasks"] = get_task_family(args.task_family).data_identity(args.split, args.data_root)
    fp = fingerprint("sft.make_expert_data", CODE_VERSION, settings_of(args, drop={"data_root", "source"}), inputs)
    trajs = read_source(args, source) if source else []  # refused before anything is written
    with RunGuard({out: fp}, folder=False, overwrite=args.overwrite):
        write_run_card(out.parent, "sft.make_expert_data", vars(args))
        store = JsonlStore(out)
        t0 = time.perf_counter()
        stats = imported(args, store, trajs, out) if source else alfworld(args, store)
        require_output(len(store), f"no expert trajectory was kept in {out} ({stats['tasks']} "
                                   f"{args.task_family}/{args.split} tasks, {stats['failed']} not won)")
        if args.export:
            trajs = load_expert_data(out)
            write_json(args.export, to_published(trajs, get_task_family(args.task_family).INSTRUCTION, args.task_family))
    summary = {**stats, "kept": len(store), "seconds": round(time.perf_counter() - t0, 1)}
    log.info("%s/%s: %d tasks, %d run now, %d not won by the expert, %d trajectories in %s (%.1fs)",
             args.task_family, args.split, stats["tasks"], stats["run"], stats["failed"], len(store), out, summary["seconds"])
    return summary


if __name__ == "__main__":
    run_main(main)
