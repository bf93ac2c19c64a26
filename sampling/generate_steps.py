"""Stage 2a: expert and explored step records.

For every expert trajectory and step t: replay the expert's steps 0..t-1 in a fresh environment, then take
step t, the expert's own (kind `expert`) or the SFT policy's greedy one, continued greedily to the end of the
episode (kind `explore`). Writes `eval_agent.records.StepRecord`s to RUN_DIR/sampling/ (eval_agent/layout.py);
resumable, each record fsynced as it is written. docs/sampling.md has the details.

    python -m sampling.generate_steps --task_family alfworld --kind both --run_dir outputs/alfworld
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval_agent.async_runner import run_for_policy
from eval_agent.cli import check_policy_model, input_file, run_main
from eval_agent.envs import get_task_family
from eval_agent.guard import RunGuard, fingerprint, identity, model_arg_names, policy_fingerprint, require_output, settings_of
from eval_agent.layout import RunDir
from eval_agent.llm import BackendUnavailable, GenerationConfig
from eval_agent.run_card import write_run_card
from eval_agent.records import StepRecord, step_key
from eval_agent.runner import Episode, ModelPolicy, start_episode
from eval_agent.store import JsonlStore
from sampling.expert_tasks import (ExpertTask, add_sampling_args, check_shards, in_shard, kinds, load_expert_tasks, log,
                                   resolve_run_paths)

CODE_VERSION = 1  # raise it when a change makes the stage give other results for the same settings


def step_record(x: ExpertTask, t: int, kind: str, ep: Episode) -> StepRecord:
    """The record of step t of `ep` (an episode that replayed expert steps 0..t-1 first)."""
    traj = ep.traj
    ended = traj.termination is not None and len(traj.steps) <= t + 1  # at step t, or earlier in the replay
    slim = {k: traj.meta[k] for k in ("key", "task_type", "error") if k in traj.meta}
    return StepRecord(
        key=step_key(x.task.key, t, kind), task_key=x.task.key, expert_key=x.expert.meta["key"], env=x.task.env,
        task_type=x.task.meta.get("task_type"), t=t, kind=kind, task_text=traj.task_text, prefix=x.replies[:t],
        step=asdict(traj.steps[t]) if len(traj.steps) > t else None,
        done=ended, step_success=ended and traj.success, step_termination=traj.termination if ended else None,
        success=traj.success, termination=traj.termination,
        trajectory={**traj.to_dict(), "meta": slim} if kind == "explore" else None,
        error=traj.meta.get("error"),
    )


def expert_records(todo: list[tuple[ExpertTask, int]], args: argparse.Namespace, store: JsonlStore) -> dict[str, Any]:
    """Replay expert steps 0..t in one environment, one record at a time (no model involved)."""
    env = get_task_family(args.task_family).make_env(**args.env_args)
    try:
        for x, t in tqdm(todo, desc="expert steps", unit="rec"):
            ep = start_episode(x.task, env, x.replies[: t + 1], args.max_steps)
            store.append(step_record(x, t, "expert", ep).to_dict())
    finally:
        env.close()
    return {}


def explore_records(todo: list[tuple[ExpertTask, int]], args: argparse.Namespace, store: JsonlStore) -> dict[str, Any]:
    """Expert prefix, then the greedy policy from step t to the end; all episodes advance together (over HTTP,
    the episodes of one task go to one replica, whose prefix cache holds their common expert prefix)."""
    by_task = {x.task.key: x for x, _ in todo}
    policy = ModelPolicy.from_args(args, GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0))

    def save(ep: Episode) -> None:
        store.append(step_record(by_task[ep.task.key], len(ep.prefix), "explore", ep).to_dict())

    make_env = partial(get_task_family(args.task_family).make_env, **args.env_args)
    stats = run_for_policy([(x.task, x.replies[:t]) for x, t in todo], policy, make_env, save,
                           max_steps=args.max_steps, concurrency=args.concurrency, env_workers=args.env_workers)
    return {"chat_format": policy.chat_format.name, "generated_tokens": stats.generated_tokens}


def fingerprints(args: argparse.Namespace, run: RunDir) -> dict[Path, dict[str, Any]]:
    """One per output file: expert records depend on the expert data and the tasks only, explored ones on the
    policy too."""
    settings = settings_of(args, drop=model_arg_names() | {"kind", "expert_data", "data_root"})
    inputs = {"expert_data": identity(args.expert_data),
              "tasks": get_task_family(args.task_family).data_identity(args.split, args.data_root)}
    out = {}
    for kind in kinds(args.kind):
        policy_settings, policy_inputs = policy_fingerprint(args) if kind == "explore" else ({}, {})
        out[run.steps(kind, args.num_shards, args.shard_id)] = fingerprint(
            "sampling.generate_steps", CODE_VERSION, {**settings, **policy_settings, "kind": kind},
            {**inputs, **policy_inputs})
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line; its defaults are the stage's (docs/ lists them)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(p)
    p.add_argument("--expert_data", help="expert trajectories (JSONL of Trajectory.to_dict + key, or published); "
                                         "default: the run directory's")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_shards(args)
    run = resolve_run_paths(args)
    input_file(args.expert_data, "expert data")
    if args.kind != "expert":
        check_policy_model(args)
    with RunGuard(fingerprints(args, run), folder=False, overwrite=args.overwrite):
        return generate(args, run)


def generate(args: argparse.Namespace, run: RunDir) -> dict[str, Any]:
    items, unmatched = load_expert_tasks(args)
    require_output(len(items), f"none of the {unmatched} expert trajectories of {args.expert_data} matches a task of "
                               f"{args.task_family}/{args.split}: pass the --split / --data_root they were made on")
    mine = in_shard(items, args)
    write_run_card(run.sampling, "sampling.generate_steps", vars(args))
    summary: dict[str, Any] = {}
    for kind in kinds(args.kind):
        t0 = time.perf_counter()
        path = run.steps(kind, args.num_shards, args.shard_id)
        store = JsonlStore(path)
        expected = [(x, t) for x in mine for t in range(len(x.expert.steps))]
        todo = [(x, t) for x, t in expected if step_key(x.task.key, t, kind) not in store]
        try:
            extra = (expert_records if kind == "expert" else explore_records)(todo, args, store) if todo else {}
        except BackendUnavailable as e:
            raise SystemExit(f"error: {e}") from None
        new = [store.records[k] for k in (step_key(x.task.key, t, kind) for x, t in todo) if k in store]
        written, errors = len(new), sum(1 for r in new if r["error"])
        summary[kind] = {"trajectories_in": len(items), "unmatched": unmatched, "in_shard": len(mine),
                         "records_expected": len(expected), "skipped_done": len(expected) - len(todo),
                         "written": written, "env_errors": errors, "seconds": round(time.perf_counter() - t0, 1),
                         "out": str(path), **extra}
        log.info("steps_%s: %d expert trajectories (%d without a task), %d in shard %d/%d; %d records: %d done before, "
                 "%d written now (%d env errors) in %.1fs -> %s", kind, len(items), unmatched, len(mine), args.shard_id,
                 args.num_shards, len(expected), len(expected) - len(todo), written, errors, summary[kind]["seconds"], path)
    return summary


if __name__ == "__main__":
    run_main(main)
