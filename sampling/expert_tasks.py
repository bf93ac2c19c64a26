"""What the sampling stages share: the command line, expert trajectories matched to environment tasks,
sharding by task, and the policy."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass

from eval_agent.cli import count, input_file
from eval_agent.envs import Task, add_task_family_arg, get_task_family
from eval_agent.expert_data import check_task_family, load_expert_data, task_of, task_tail
from eval_agent.layout import RunDir
from eval_agent.runner import MAX_STEPS, add_model_args
from eval_agent.store import BadRecord
from eval_agent.trajectory import Trajectory

log = logging.getLogger("sampling")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    add_task_family_arg(p)
    p.add_argument("--split", default="train", help="the split the expert trajectories play")
    p.add_argument("--kind", choices=("expert", "explore", "both"), default="both")
    p.add_argument("--data_root", help="task data folder (default: the task family's own lookup)")
    p.add_argument("--env_args", type=json.loads, default={}, help="JSON object of environment options")
    add_model_args(p)
    p.add_argument("--max_steps", type=count, default=MAX_STEPS, help="episode budget, replayed prefix included")
    p.add_argument("--num_shards", type=count, default=1)
    p.add_argument("--shard_id", type=int, default=0)
    p.add_argument("--limit", type=count, help="first N expert trajectories only, before sharding (default: all)")
    p.add_argument("--concurrency", type=count, help="episodes in flight (default: 16 in-process, 1024 over HTTP)")
    p.add_argument("--run_dir", required=True, help="the run directory (eval_agent/layout.py): reads its SFT model, "
                                                     "writes its sampling/ folder")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh output files, whatever settings made the old ones (moved aside as .old)")


def resolve_run_paths(args: argparse.Namespace) -> RunDir:
    """The run directory, and the inputs a flag did not name taken from it: the SFT model, the expert data."""
    run = RunDir(args.run_dir)
    args.model = args.model or str(run.sft_model)
    if "expert_data" in vars(args):
        args.expert_data = args.expert_data or str(run.expert_data(args.split))
    return run


def check_shards(args: argparse.Namespace) -> None:
    if args.num_shards < 1 or not 0 <= args.shard_id < args.num_shards:
        raise SystemExit(f"error: need 0 <= --shard_id < --num_shards, got {args.shard_id} and {args.num_shards}")


def kinds(kind: str) -> list[str]:
    return ["expert", "explore"] if kind == "both" else [kind]


def shard_of(task_key: str, num_shards: int) -> int:
    """A stable shard for a task (the same on every machine and Python): all its steps go together."""
    return int.from_bytes(hashlib.sha1(task_key.encode()).digest()[:8], "big") % num_shards


@dataclass
class ExpertTask:
    task: Task
    expert: Trajectory

    @property
    def replies(self) -> list[str]:
        return [s.text for s in self.expert.steps]


def load_expert_tasks(args: argparse.Namespace) -> tuple[list[ExpertTask], int]:
    """Expert trajectories (first `--limit`) matched to the split's tasks, in file order, and the
    number without a task (skipped and counted). A malformed file raises naming file, line, field."""
    try:
        trajs = load_expert_data(input_file(args.expert_data, "expert data"))
    except (BadRecord, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    check_task_family(trajs, args.task_family, args.expert_data)
    trajs = trajs[: args.limit]
    family = get_task_family(args.task_family)
    by_tail = {task_tail(t.key): t for t in family.load_tasks(args.split, data_root=args.data_root)}
    out, unmatched, seen = [], 0, {}
    for traj in trajs:
        key = traj.meta["key"]
        task = task_of(traj, by_tail)
        if task is None:
            unmatched += 1
            log.warning("expert trajectory %r matches no %s/%s task: skipped", key, args.task_family, args.split)
            continue
        if task.key in seen:
            raise SystemExit(f"error: {args.expert_data}: expert trajectories {seen[task.key]!r} and {key!r} both play {task.key}")
        seen[task.key] = key
        out.append(ExpertTask(task, traj))
    return out, unmatched


def in_shard(items: list[ExpertTask], args: argparse.Namespace) -> list[ExpertTask]:
    return [x for x in items if shard_of(x.task.key, args.num_shards) == args.shard_id]

